"""Corpus preparation: input files -> token shards (the library behind tools/prepare_data.py).

Owns: finding inputs (.txt/.jsonl/.json/.parquet files, directories, globs, ``save_to_disk``
datasets), the input formats and their loss masks (``text``, ``alpaca``, ``chat``), the
long-document and bad-input policies (what a sample is, why a document is skipped:
:data:`SKIP_REASONS`), the train/eval split (:func:`is_eval_document`), and the tokenisation
pipeline. Must not: define the shard format (irdro.shards owns it; ShardWriter writes it), import
torch, or hold the corpus in memory.

Pipeline (memory stays flat in the corpus size; every stage streams):

1. read: the main process streams records in input order, validates them (errors name
   ``file:line`` and the field) and appends the normalised ones to an Arrow file in a work
   directory next to the output. Failing here is fast: nothing has been tokenised yet.
2. tokenise: ``datasets.Dataset.map(num_proc=N)`` over that file in batches of about 1 MiB of text
   writes token ids (and supervision masks) to Arrow files.
3. write: the main process streams those files in order (plain reads, no memory map), applies
   ``long_docs`` and the too-short rule, and feeds one ShardWriter per split. Writers build in
   temporary directories that are renamed into place only when complete.

Formats:

* ``text``: a document's text, tokenised without special tokens, EOS appended; every token
  supervised.
* ``alpaca``: ``instruction`` and ``output`` (required) and ``input`` (optional) rendered as
  :data:`ALPACA_TEMPLATE` (:data:`ALPACA_TEMPLATE_NO_INPUT` when input is empty); the prompt and
  ``output + EOS`` are tokenised separately and concatenated; only the response is supervised.
* ``chat``: ``messages``, a list of ``{"role", "content"}``, rendered with the tokenizer's chat
  template. Every assistant turn is supervised, everything else masked. The mask comes from
  rendering prefixes: the text of assistant turn i is what ``messages[:i+1]`` adds to
  ``messages[:i]`` rendered with ``add_generation_prompt=True`` (so the end-of-turn marker is
  supervised, the generation prompt is not); the rendered pieces are tokenised separately, as the
  prompt is at inference. Templates whose prefixes are not prefixes of the whole rendering are
  refused for that record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irdro import fsio
from irdro.shards import (
    DataError,
    Manifest,
    ShardWriter,
    chat_template_sha256,
    check_output_dir,
    publish_dir,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

FORMATS = ("text", "alpaca", "chat")
LONG_DOCS = ("split", "truncate")
INPUT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
MIN_SUPERVISED = 2
"""A sample needs at least this many supervised tokens (and one supervised target) to be kept."""

# Why a document (input record) was not written, counted per reason in the manifest's num_skipped.
SKIP_REASONS = {
    "bad_json": "a malformed JSON line or file, skipped with --skip-bad",
    "bad_record": "a record with a missing or mistyped field, skipped with --skip-bad",
    "empty": "empty or whitespace-only text",
    "too_short": "fewer than 2 supervised tokens (e.g. an empty response)",
    "truncated_response": "--long-docs truncate cut away the response (fewer than 2 supervised tokens left)",
}

_MAP_BATCH_CHARS = 1 << 20  # text per tokenisation batch: bounds a worker's memory
_RECORD_BATCH_ROWS = 1000
_FORMAT_COLUMNS = {
    "text": ("text",),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
}


def is_eval_document(doc_id: int, seed: int, eval_fraction: float) -> bool:
    """Deterministic, platform-independent train/eval assignment of document ``doc_id``."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < eval_fraction


def default_long_docs(format: str) -> str:
    """``split`` for pre-training text, ``truncate`` for instruction data (a chunk of a response
    without its prompt teaches little)."""
    return "split" if format == "text" else "truncate"


# --------------------------------------------------------------------------- inputs


def _is_saved_dataset(path: Path) -> bool:
    """A ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` directory."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if here != root and _is_saved_dataset(here):
            found.append(here)
            dirnames[:] = []
            continue
        found += [here / f for f in filenames if Path(f).suffix in INPUT_SUFFIXES]
    return sorted(found)


def resolve_inputs(inputs: Sequence[str], format: str = "text") -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of sources.

    A directory is a ``save_to_disk`` dataset if it looks like one, else it is searched
    recursively (hidden entries skipped) for .txt/.jsonl/.json/.parquet files and saved datasets.

    Args:
        inputs: paths or glob patterns.
        format: the input format; ``alpaca`` and ``chat`` need records, so .txt is refused.

    Raises:
        DataError: an input matches nothing or has an unsupported type.
    """
    files: dict[Path, None] = {}
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = [path] if _is_saved_dataset(path) else _walk(path)
            if not found:
                raise DataError(
                    f"input directory {path} has no {'/'.join(INPUT_SUFFIXES)} files and is not a save_to_disk dataset"
                )
        elif path.is_file():
            found = [path]
        else:
            import glob

            found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            found = [p for p in found if p.is_file() or _is_saved_dataset(p)]
            if not found:
                raise DataError(f"input {spec} matches no file; check the path or quote the glob")
        for p in found:
            if p.is_file() and p.suffix not in INPUT_SUFFIXES:
                raise DataError(
                    f"input {p}: unsupported file type '{p.suffix}' (use "
                    f"{', '.join(INPUT_SUFFIXES)} or a save_to_disk dataset directory)"
                )
            if p.suffix == ".txt" and format != "text":
                raise DataError(
                    f"input {p}: a .txt file is plain text; --format {format} needs records "
                    "(.jsonl, .json, .parquet or a dataset)"
                )
            files.setdefault(p, None)
    return list(files)


@dataclass(frozen=True)
class Malformed:
    """A record that could not be parsed; ``message`` says why (it already names the place)."""

    message: str


def iter_records(sources: Sequence[Path], split: str = "train") -> Iterator[tuple[str, Any]]:
    """Stream records in input order: a .txt file is one string record, a .jsonl line, a .json
    list item, a parquet row or a dataset row is one dict record. Blank .jsonl lines are skipped.

    Args:
        sources: from :func:`resolve_inputs`.
        split: the split to read from a saved ``DatasetDict``.

    Yields:
        (location, record) with location like ``file:line`` or ``file[row 3]``; record is
        :class:`Malformed` for a line that is not JSON.

    Raises:
        DataError: unreadable file (not UTF-8, a .json that is not a list, missing split).
    """
    for source in sources:
        try:
            if source.is_dir():
                yield from _dataset_records(source, split)
            elif source.suffix == ".txt":
                yield str(source), source.read_text(encoding="utf-8")
            elif source.suffix == ".jsonl":
                with open(source, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, start=1):
                        if not line.strip():
                            continue
                        where = f"{source}:{lineno}"
                        try:
                            yield where, json.loads(line)
                        except json.JSONDecodeError as e:
                            yield where, Malformed(f"{where}: malformed JSON ({e.msg})")
            elif source.suffix == ".json":
                yield from _json_records(source)
            else:
                yield from _parquet_records(source)
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_records(file: Path) -> Iterator[tuple[str, Any]]:
    try:  # one JSON document: read whole (use .jsonl for large inputs)
        records = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        yield f"{file}:{e.lineno}", Malformed(f"{file}:{e.lineno}: malformed JSON ({e.msg})")
        return
    if not isinstance(records, list):
        raise DataError(f"{file}: a .json input must be a list of records; use .jsonl for one record per line")
    for i, record in enumerate(records):
        yield f"{file}[record {i}]", record


def _parquet_records(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{file}: not a readable parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=_RECORD_BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{file}[row {row}]", record
            row += 1


def _dataset_records(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a bad directory
        raise DataError(f"{path}: cannot load the saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: dataset has splits {', '.join(ds)}, not '{split}'; pass --split")
        ds = ds[split]
    row = 0
    for batch in ds.with_format("arrow").iter(batch_size=_RECORD_BATCH_ROWS):
        for record in batch.to_pylist():
            yield f"{path}[row {row}]", record
            row += 1


class _BadRecord(Exception):
    """A record that parsed but does not fit the format; the message names the field."""


def _fields(record: dict) -> str:
    return ", ".join(sorted(record)) or "none"


def _string_field(record: Any, field: str, *, required: bool = True, hint: str = "") -> str:
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if field not in record or (record[field] is None and not required):
        if not required:
            return ""
        raise _BadRecord(f"record has no field '{field}' (fields: {_fields(record)}){hint}")
    value = record[field]
    if not isinstance(value, str):
        raise _BadRecord(f"field '{field}' is {type(value).__name__}, expected a string")
    return value


def normalize_record(record: Any, format: str, text_field: str = "text") -> dict[str, Any] | None:
    """Validate one record and return the format's columns, or None if it is empty.

    Returns:
        text: {"text"}; alpaca: {"instruction", "input", "output"}; chat: {"messages":
        [{"role", "content"}, ...]}. None when there is no non-whitespace text at all.

    Raises:
        _BadRecord: naming the missing or mistyped field.
    """
    if format == "text":
        text = record if isinstance(record, str) else _string_field(record, text_field, hint="; pass --text-field")
        return {"text": text} if text.strip() else None
    if format == "alpaca":
        hint = "; an alpaca record needs 'instruction' and 'output' ('input' is optional)"
        row = {
            "instruction": _string_field(record, "instruction", hint=hint),
            "input": _string_field(record, "input", required=False),
            "output": _string_field(record, "output", hint=hint),
        }
        return row if any(v.strip() for v in row.values()) else None
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else f"a {type(messages).__name__}"
        raise _BadRecord(
            f"field 'messages' is {got}; a chat record needs 'messages': a non-empty list of "
            f"{{'role', 'content'}} (fields: {_fields(record)})"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _BadRecord(f"field 'messages[{i}]' is {type(m).__name__}, expected an object")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if key not in m else type(m[key]).__name__
                raise _BadRecord(f"field 'messages[{i}].{key}' is {got}, expected a string")
        out.append({"role": m["role"], "content": m["content"]})
    return {"messages": out} if any(m["content"].strip() for m in out) else None


# --------------------------------------------------------------------------- tokenisation


def _render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, supervised) pieces, assistant turns supervised."""

    def render(msgs: list[dict[str, str]], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (before.startswith(done) and through.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"the chat template is not prefix-stable at messages[{i}] (rendering the "
                "conversation up to an assistant turn is not a prefix of the whole), so the "
                "assistant tokens cannot be located; use a template that renders turns in order"
            )
        pieces += [(before[len(done) :], False), (through[len(before) :], True)]
        done = through
    pieces.append((full[len(done) :], False))
    return [(text, sup) for text, sup in pieces if text]


class Encoder:
    """Tokenises one ``datasets`` batch of normalised records (picklable for ``num_proc``).

    Returns per record: ``input_ids`` (L,) int32, ``mask`` (L,) bool supervised flags (alpaca and
    chat only), ``error`` (None, or a message for a record the chat template cannot render).
    """

    def __init__(self, tokenizer: Any, format: str, train_on_prompt: bool) -> None:
        self.tokenizer, self.format, self.train_on_prompt = tokenizer, format, train_on_prompt
        self.eos = tokenizer.eos_token_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        eos = [] if self.eos is None else [self.eos]
        if self.format == "text":
            ids = [np.asarray(x + eos, dtype=np.int32) for x in self._encode(batch["text"])]
            return {"input_ids": ids, "error": [None] * len(ids)}
        if self.format == "alpaca":
            prompts = [
                (ALPACA_TEMPLATE if inp.strip() else ALPACA_TEMPLATE_NO_INPUT).format(instruction=ins, input=inp)
                for ins, inp in zip(batch["instruction"], batch["input"], strict=True)
            ]
            n = len(prompts)
            encoded = self._encode(prompts + list(batch["output"]))
            docs = [[(encoded[i], False), (encoded[n + i] + eos, True)] for i in range(n)]
            errors: list[str | None] = [None] * n
        else:
            docs, errors, texts = [], [], []
            for messages in batch["messages"]:
                try:
                    pieces = _render_chat(self.tokenizer, messages)
                    errors.append(None)
                except Exception as e:  # jinja errors and raise_exception() in templates
                    pieces = []
                    errors.append(f"chat template failed: {str(e).strip().splitlines()[0]}")
                docs.append(pieces)
                texts += [text for text, _ in pieces]
            flat = iter(self._encode(texts))
            docs = [[(next(flat), sup) for _, sup in pieces] for pieces in docs]
        ids, masks = [], []
        for pieces in docs:
            ids.append(np.asarray([t for p, _ in pieces for t in p], dtype=np.int32))
            masks.append(
                np.concatenate([np.full(len(p), sup or self.train_on_prompt) for p, sup in pieces])
                if pieces
                else np.zeros(0, dtype=bool)
            )
        return {"input_ids": ids, "mask": masks, "error": errors}


# --------------------------------------------------------------------------- long documents


@dataclass(frozen=True)
class Cut:
    """What :func:`cut_document` made of one tokenised document.

    Attributes:
        samples: (chunk_id, tokens, mask or None) to write; chunk_id is the chunk's position in
            the document (0 for a whole or truncated document), so ids stay meaningful when a
            chunk in between is dropped.
        skipped: None, or the SKIP_REASONS key when nothing is written.
        num_dropped_chunks: chunks left out because they had too little supervision.
        truncated: tokens were cut away (``truncate`` only).
    """

    samples: list[tuple[int, np.ndarray, np.ndarray | None]]
    skipped: str | None = None
    num_dropped_chunks: int = 0
    truncated: bool = False


def is_trainable(length: int, mask: np.ndarray | None) -> bool:
    """At least MIN_SUPERVISED supervised tokens, and at least one a target (not the first)."""
    if mask is None:
        return length >= MIN_SUPERVISED
    return int(mask.sum()) >= MIN_SUPERVISED and bool(mask[1:].any())


def cut_document(tokens: np.ndarray, mask: np.ndarray | None, seq_len: int, long_docs: str) -> Cut:
    """Apply the long-document policy and the too-short rule to one document.

    Args:
        tokens: (L,) token ids.
        mask: (L,) bool supervised flags, None = all supervised.
        seq_len: maximum sample length (>= 2).
        long_docs: ``split`` (consecutive chunks of seq_len, each its own sample; chunks that are
            not :func:`is_trainable` are dropped and counted) or ``truncate`` (the first seq_len
            tokens).
    """
    n = len(tokens)
    if not is_trainable(n, mask):
        return Cut([], skipped="too_short")
    if n <= seq_len:
        return Cut([(0, tokens, mask)])
    if long_docs == "truncate":
        head, head_mask = tokens[:seq_len], None if mask is None else mask[:seq_len]
        if not is_trainable(seq_len, head_mask):
            return Cut([], skipped="truncated_response", truncated=True)
        return Cut([(0, head, head_mask)], truncated=True)
    samples, dropped = [], 0
    for chunk_id, start in enumerate(range(0, n, seq_len)):
        chunk, chunk_mask = tokens[start : start + seq_len], None
        if mask is not None:
            chunk_mask = mask[start : start + seq_len]
        if is_trainable(len(chunk), chunk_mask):
            samples.append((chunk_id, chunk, chunk_mask))
        else:
            dropped += 1
    return Cut(samples, skipped=None if samples else "too_short", num_dropped_chunks=dropped)


# --------------------------------------------------------------------------- pipeline


def _record_schema(format: str) -> Any:
    import pyarrow as pa

    cols = [("doc_id", pa.int64()), ("loc", pa.string())]
    if format == "chat":
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        cols.append(("messages", pa.list_(message)))
    else:
        cols += [(c, pa.string()) for c in _FORMAT_COLUMNS[format]]
    return pa.schema(cols)


def _memory_pool() -> Any:
    """The system allocator for the main process's Arrow buffers.

    pyarrow's default mimalloc pool kept the freed buffers of stage 1 and 3 and grew the peak RSS
    with the corpus size (docs/benchmarks.md, "Found on the way"); malloc returns them, and these
    are few, large allocations where the pool's speed does not matter.
    """
    import pyarrow as pa

    return pa.system_memory_pool()


class _RecordFile:
    """Append-only Arrow stream of normalised records, flushed every ~1 MiB or 1000 rows."""

    def __init__(self, path: Path, format: str) -> None:
        import pyarrow as pa

        self.path, self.schema = path, _record_schema(format)
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._rows: list[dict[str, Any]] = []
        self._chars = 0
        self.num_rows = 0
        self.num_chars = 0

    def append(self, row: dict[str, Any], chars: int) -> None:
        self._rows.append(row)
        self._chars += chars
        self.num_rows += 1
        self.num_chars += chars
        if len(self._rows) >= _RECORD_BATCH_ROWS or self._chars >= _MAP_BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            pool = _memory_pool()
            columns = [
                pa.array([row[f.name] for row in self._rows], type=f.type, memory_pool=pool) for f in self.schema
            ]
            self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._rows, self._chars = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


def _num_chars(row: dict[str, Any]) -> int:
    if "messages" in row:
        return sum(len(m["content"]) for m in row["messages"])
    return sum(len(v) for v in row.values())


def _tokenise(records: _RecordFile, encoder: Encoder, work: Path, num_proc: int, progress: bool) -> list[str]:
    """Stage 2: ``datasets.map`` over the record file; returns the output Arrow files in order."""
    import datasets
    from datasets import Features, Sequence, Value

    features = {
        "doc_id": Value("int64"),
        "loc": Value("string"),
        "input_ids": Sequence(Value("int32")),
        "error": Value("string"),
    }
    if encoder.format != "text":
        features["mask"] = Sequence(Value("bool"))
    avg_chars = max(1.0, records.num_chars / max(1, records.num_rows))
    batch_size = int(min(_RECORD_BATCH_ROWS, max(1, _MAP_BATCH_CHARS // avg_chars)))
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    if not progress:
        datasets.utils.logging.disable_progress_bar()
    try:
        ds = datasets.Dataset.from_file(str(records.path))
        out = ds.map(
            encoder,
            batched=True,
            batch_size=batch_size,
            writer_batch_size=batch_size,
            num_proc=min(num_proc, records.num_rows) if num_proc > 1 else None,
            remove_columns=list(_FORMAT_COLUMNS[encoder.format]),
            features=Features(features),
            cache_file_name=str(work / "tokens.arrow"),
            load_from_cache_file=False,
            new_fingerprint=uuid.uuid4().hex,
            desc="tokenizing",
        )
    finally:
        if was_enabled and not progress:
            datasets.utils.logging.enable_progress_bar()
    files = [f["filename"] for f in out.cache_files]
    if not files:
        raise RuntimeError("datasets.map kept its result in memory; expected Arrow cache files")
    return files


def _iter_encoded(
    files: list[str],
) -> Iterator[tuple[int, str, np.ndarray, np.ndarray | None, str | None]]:
    """Stage 3 input: (doc_id, loc, tokens, mask, error) rows, read without a memory map."""
    import pyarrow as pa

    last = -1
    for file in files:
        with pa.OSFile(file, "rb") as src:
            for batch in pa.ipc.open_stream(src, memory_pool=_memory_pool()):
                cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
                doc_ids = cols["doc_id"].to_numpy()
                locs, errors = cols["loc"].to_pylist(), cols["error"].to_pylist()
                ids = cols["input_ids"]
                offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
                masks = None
                if "mask" in cols:
                    m = cols["mask"]
                    m_offsets = m.offsets.to_numpy()
                    m_values = m.values.to_numpy(zero_copy_only=False)
                for j in range(len(doc_ids)):
                    doc_id = int(doc_ids[j])
                    if doc_id <= last:
                        raise RuntimeError(f"tokenised rows out of order in {file}")
                    last = doc_id
                    if "mask" in cols:
                        masks = m_values[m_offsets[j] : m_offsets[j + 1]]
                    yield doc_id, locs[j], values[offsets[j] : offsets[j + 1]], masks, errors[j]


def _load_tokenizer(tokenizer_dir: str, chat_template: str | None, format: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():
        raise DataError(
            f"tokenizer directory {tokenizer_dir} does not exist; for GPT-2 run "
            "python tools/fetch_assets.py gpt2-tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load a tokenizer from {tokenizer_dir}: {first}") from None
    if chat_template is not None:
        try:
            tokenizer.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--chat-template {chat_template}: cannot read it ({e})") from None
    if format == "chat" and not tokenizer.chat_template:
        raise DataError(
            f"tokenizer {tokenizer_dir} has no chat template; pass --chat-template FILE (a Jinja "
            "template) or use a tokenizer whose tokenizer_config.json sets chat_template"
        )
    return tokenizer


def vocab_bound(tokenizer: Any) -> int:
    """One more than the largest id the tokenizer can emit (added tokens may lie past len())."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def prepare(
    inputs: Sequence[str],
    tokenizer_dir: str,
    output: str,
    *,
    seq_len: int,
    format: str = "text",
    text_field: str = "text",
    long_docs: str | None = None,
    train_on_prompt: bool = False,
    chat_template: str | None = None,
    skip_bad: bool = False,
    num_proc: int = 1,
    split: str = "train",
    eval_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    shard_tokens: int = 2**26,
    progress: bool = True,
) -> Manifest | dict[str, Manifest]:
    """Tokenise inputs into shard directories (the library behind tools/prepare_data.py).

    doc_id is a record's index in the input stream (skipped records keep theirs), so it is unique
    across train and eval. Skipped records are counted per split under ``num_skipped``
    (:data:`SKIP_REASONS`); truncated documents under ``num_truncated``; chunks
    dropped for lack of supervision under ``num_dropped_chunks``.

    Args:
        inputs: files, directories or globs (see :func:`resolve_inputs`).
        tokenizer_dir: directory for ``AutoTokenizer.from_pretrained``.
        output: the shard directory, or with eval_fraction > 0 the parent of ``train/`` and
            ``eval/`` shard directories.
        seq_len: maximum tokens per sample (>= 2).
        format: ``text``, ``alpaca`` or ``chat`` (see the module docstring).
        text_field: field holding the text (``text`` format).
        long_docs: ``split`` or ``truncate``; default :func:`default_long_docs`.
        train_on_prompt: supervise prompt tokens too (alpaca, chat).
        chat_template: a Jinja file replacing the tokenizer's chat template.
        skip_bad: skip (and count) malformed JSON and bad records instead of failing.
        num_proc: tokenisation processes.
        split: the split to read from saved ``DatasetDict`` inputs.
        eval_fraction: expected fraction of documents sent to eval, in [0, 1).
        seed: seed of the train/eval assignment.
        overwrite: replace a non-empty output (only after the new one is complete).
        shard_tokens: target tokens per shard file.
        progress: show progress bars.

    Returns:
        The manifest if eval_fraction == 0, else ``{"train": manifest, "eval": manifest}``.

    Raises:
        DataError: bad arguments or inputs (naming file:line and field), a non-empty output
            without overwrite, or an empty split. The output is then left as it was.
    """
    if format not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    long_docs = long_docs or default_long_docs(format)
    if long_docs not in LONG_DOCS:
        raise DataError(f"--long-docs must be one of {', '.join(LONG_DOCS)}, got {long_docs!r}")
    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {num_proc}")
    if chat_template is not None and format != "chat":
        raise DataError("--chat-template only applies to --format chat")
    out = Path(output)
    sources = resolve_inputs(inputs, format)
    check_output_dir(out, overwrite)
    resolved_out = out.resolve()
    for f in sources:
        if overwrite and (resolved_out == f.resolve() or resolved_out in f.resolve().parents):
            raise DataError(f"input {f} is inside --output {out}, which --overwrite would delete")
    tokenizer = _load_tokenizer(tokenizer_dir, chat_template, format)
    name = Path(tokenizer_dir).resolve().name or str(tokenizer.name_or_path)
    if tokenizer.eos_token_id is None and format != "chat":
        logger.warning("tokenizer %s has no EOS token; documents are not terminated", name)
    meta: dict[str, Any] = {
        "long_docs": long_docs,
        "num_truncated": 0,
        "num_dropped_chunks": 0,
    }
    if format == "alpaca":
        meta["prompt_template"] = {
            "with_input": ALPACA_TEMPLATE,
            "without_input": ALPACA_TEMPLATE_NO_INPUT,
        }
    if format == "chat":
        # the text travels with the shards: training gives it to a tokenizer without one (hf/, exports)
        meta["chat_template_sha256"] = chat_template_sha256(tokenizer.chat_template)
        meta["chat_template"] = tokenizer.chat_template
    if format != "text":
        meta["train_on_prompt"] = train_on_prompt
    writer_args = {
        "vocab_size": vocab_bound(tokenizer),
        "tokenizer_name": name,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "format": format,
        "shard_tokens": shard_tokens,
        "meta": meta,
        "skip_reasons": SKIP_REASONS,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    split_mode = eval_fraction > 0.0
    staging = fsio.make_staging_dir(out) if split_mode else None
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    writers: dict[str, ShardWriter] = {}
    try:
        if split_mode:
            assert staging is not None
            writers = {s: ShardWriter(staging / s, **writer_args) for s in ("train", "eval")}
        else:
            writers = {"train": ShardWriter(out, overwrite=overwrite, **writer_args)}

        def writer_of(doc_id: int) -> ShardWriter:
            return writers["eval" if is_eval_document(doc_id, seed, eval_fraction) else "train"]

        records = _read(sources, format, text_field, split, skip_bad, writer_of, work, progress)
        if records.num_rows:
            encoder = Encoder(tokenizer, format, train_on_prompt)
            files = _tokenise(records, encoder, work, num_proc, progress)
            _write(files, records.num_rows, seq_len, long_docs, skip_bad, writer_of, progress)
        for split_name, writer in writers.items():
            if writer.num_samples == 0:
                raise DataError(
                    f"the {split_name} split would be empty ({len(sources)} inputs, skipped "
                    f"{ {k: v for k, v in writer.num_skipped.items() if v} }); "
                    + ("adjust --eval-fraction" if split_mode else "check --input and --format")
                )
        manifests = {s: w.finalize() for s, w in writers.items()}
        if split_mode:
            assert staging is not None
            publish_dir(staging, out, overwrite)
            staging = None
            return manifests
        return manifests["train"]
    finally:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(work, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _read(
    sources: list[Path],
    format: str,
    text_field: str,
    split: str,
    skip_bad: bool,
    writer_of: Any,
    work: Path,
    progress: bool,
) -> _RecordFile:
    """Stage 1: validate records into an Arrow file; skips are counted on the split's writer."""
    from tqdm.auto import tqdm

    records = _RecordFile(work / "records.arrow", format)
    try:
        stream = iter_records(sources, split)
        for doc_id, (loc, record) in enumerate(tqdm(stream, desc="reading", unit="rec", disable=not progress)):
            writer = writer_of(doc_id)
            if isinstance(record, Malformed):
                if not skip_bad:
                    raise DataError(f"{record.message}; fix or remove it, or pass --skip-bad")
                writer.skip("bad_json")
                continue
            try:
                row = normalize_record(record, format, text_field)
            except _BadRecord as e:
                if not skip_bad:
                    raise DataError(f"{loc}: {e}") from None
                writer.skip("bad_record")
                continue
            if row is None:
                writer.skip("empty")
                continue
            records.append({"doc_id": doc_id, "loc": loc, **row}, _num_chars(row))
    finally:
        records.close()
    return records


def _write(
    files: list[str],
    num_rows: int,
    seq_len: int,
    long_docs: str,
    skip_bad: bool,
    writer_of: Any,
    progress: bool,
) -> None:
    """Stage 3: cut documents into samples and write them, in input order."""
    from tqdm.auto import tqdm

    for doc_id, loc, tokens, mask, error in tqdm(
        _iter_encoded(files), total=num_rows, desc="writing", unit="doc", disable=not progress
    ):
        writer = writer_of(doc_id)
        if error is not None:
            if not skip_bad:
                raise DataError(f"{loc}: {error}; fix the record or pass --skip-bad")
            writer.skip("bad_record")
            continue
        cut = cut_document(tokens, mask, seq_len, long_docs)
        if cut.skipped is not None:
            writer.skip(cut.skipped)
        writer.count("num_truncated", int(cut.truncated and cut.skipped is None))
        writer.count("num_dropped_chunks", cut.num_dropped_chunks)
        for chunk_id, chunk, chunk_mask in cut.samples:
            if chunk_mask is not None and chunk_mask.all():
                chunk_mask = None  # fully supervised: no mask bits needed
            try:
                writer.add(chunk, doc_id, chunk_id, mask=chunk_mask)
            except DataError as e:
                raise DataError(f"{loc}: {e}") from None


__all__ = [
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_NO_INPUT",
    "FORMATS",
    "LONG_DOCS",
    "SKIP_REASONS",
    "Cut",
    "Encoder",
    "Malformed",
    "cut_document",
    "default_long_docs",
    "is_eval_document",
    "is_trainable",
    "iter_records",
    "normalize_record",
    "prepare",
    "resolve_inputs",
    "vocab_bound",
]
