"""Token shards on disk: the format, its manifest, the writer, the reader and the compatibility check.

Owns:
  * the shard directory format (``manifest.json`` + ``shard_NNNNN.{tokens,index,mask}.npy``,
    format_version 1): the typed :class:`Manifest` that the writer and every reader share;
  * the writer (:class:`ShardWriter`) and the memory-mapped reader (:class:`ShardDataset`), with
    content verification;
  * the identity of a tokenizer (:func:`tokenizer_fingerprint`, :func:`chat_template_sha256`) and
    the one check that shards belong to a tokenizer and a model (:func:`check_compatible`).

Must not: import torch or deepspeed (numpy only: tools/prepare_data.py stays light), decide what a
sample is (irdro.prepare) or in which order samples are read (irdro.data), hold a whole corpus in
memory, or print (it logs).

Layout of a shard directory (format_version 1)::

    manifest.json              dataset metadata, per-shard counts and sha256 (see Manifest)
    shard_00000.tokens.npy     (num_tokens,) uint16|uint32, all samples' tokens concatenated
    shard_00000.index.npy      (num_samples, 4) int64 rows [start, end, doc_id, chunk_id]
    shard_00000.mask.npy       optional: np.packbits of per-token "supervised" flags; absent
                               means every token is supervised
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import operator
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from irdro import __version__, fsio

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
IGNORE_INDEX = -100


class DataError(Exception):
    """One-line, user-facing message naming the file/line/key and what to do."""


class ShardMismatch(DataError):
    """Shards that do not belong to a tokenizer or model (raised by :func:`check_compatible`).

    Attributes:
        key: the caller's name for the shard directory (e.g. ``data.train``).
        kind: ``tokenizer`` (fingerprints differ), ``vocab`` (ids past the model's embedding) or
            ``chat_template`` (templates differ, or none is available).
        found: what the shards record (a hash, a vocab size), None when they record nothing.
        expected: what the tokenizer or model has.
    """

    def __init__(self, message: str, *, key: str, kind: str, found: Any, expected: Any) -> None:
        super().__init__(message)
        self.key, self.kind, self.found, self.expected = key, kind, found, expected


@contextlib.contextmanager
def _output_errors() -> Iterator[None]:
    """irdro.fsio's refusals as DataError (the tools' exit code 2)."""
    try:
        yield
    except fsio.OutputError as e:
        raise DataError(str(e)) from None


def check_output_dir(output: Path, overwrite: bool) -> None:
    """:func:`irdro.fsio.check_output_dir`, its refusal as a DataError."""
    with _output_errors():
        fsio.check_output_dir(output, overwrite)


def publish_dir(staging: Path, output: Path, overwrite: bool) -> None:
    """:func:`irdro.fsio.publish_dir`, its refusal as a DataError."""
    with _output_errors():
        fsio.publish_dir(staging, output, overwrite)


# --------------------------------------------------------------------------- tokenizer identity


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash what determines a tokenizer's output, independent of where it was loaded from.

    Fast tokenizers hash ``backend_tokenizer.to_str()`` with the ``truncation`` and ``padding``
    entries removed: the HF wrapper mutates those on calls like ``tokenizer(..., truncation=True)``,
    which must not change the identity. Slow tokenizers hash the sorted vocabulary plus the
    special tokens.

    Args:
        tokenizer: a transformers tokenizer.

    Returns:
        sha256 hex digest.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special_tokens": sorted(str(t) for t in tokenizer.all_special_tokens),
        }
    blob = json.dumps(state, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def chat_template_sha256(template: str | dict[str, str]) -> str:
    """Hash a chat template as the manifest records it (``chat_template_sha256``).

    Args:
        template: a tokenizer's ``chat_template``: the Jinja text, or a dict of named templates.

    Returns:
        sha256 hex digest of the utf-8 text (of the dict's sorted JSON for named templates).
    """
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class ShardEntry:
    """One shard's entry in the manifest.

    Attributes:
        name: file stem (``shard_00000``).
        num_samples: index rows.
        num_tokens: tokens in its tokens.npy.
        sha256: file suffix (``tokens.npy``, ``index.npy``, ``mask.npy``) -> hex digest; a mask
            file exists exactly when ``mask.npy`` is listed.
    """

    name: str
    num_samples: int
    num_tokens: int
    sha256: dict[str, str]


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer the shards were made with: its folder name and :func:`tokenizer_fingerprint`."""

    name: str | None = None
    hash: str | None = None


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """``manifest.json``: what a shard directory holds and what made it (format_version 1).

    Read with :meth:`read` (validates every key: an unknown or misspelt one is refused, naming the
    closest known key), written with :meth:`write`; fields are in file order.

    Attributes:
        format_version: :data:`FORMAT_VERSION`.
        format: input format the samples were made from (``text``, ``alpaca``, ``chat``).
        tokenizer: name and fingerprint of the tokenizer.
        vocab_size: every token id is < vocab_size.
        eos_token_id: the tokenizer's, or None.
        pad_token_id: the tokenizer's, or None.
        dtype: ``uint16`` or ``uint32``, the tokens files' dtype.
        seq_len: maximum sample length the data was prepared for.
        num_docs: distinct source documents written.
        num_samples: samples (index rows) over all shards.
        num_tokens: tokens over all shards.
        num_skipped: documents not written, by reason (irdro.prepare.SKIP_REASONS).
        has_mask: some shard has a mask.npy (some tokens are not supervised).
        shards: the shards in reading order.
        created_by: ``irdro <version>``.
        long_docs: ``split`` or ``truncate`` (irdro.prepare); absent from bare writer output.
        num_truncated: documents truncated to seq_len.
        num_dropped_chunks: chunks dropped for lack of supervised tokens.
        prompt_template: ``alpaca``: {with_input, without_input} prompt templates.
        chat_template_sha256: ``chat``: :func:`chat_template_sha256` of the template used.
        chat_template: ``chat``: that template (Jinja text or named templates); chat shards of an
            irdro older than this field have only the hash.
        train_on_prompt: ``alpaca``/``chat``: prompt tokens are supervised too.
        selection: shards that tools/select_data.py cut from a parent directory: {"parent": its
            path, "parent_manifest_sha256", "scores": the score set's name, "rule": the band kept,
            "parent_ids": "parent_ids.npy" (the parent's sample id of every row), "parent_ids_sha256"}.
    """

    format_version: int
    format: str = "text"
    tokenizer: TokenizerInfo = field(default_factory=TokenizerInfo)
    vocab_size: int
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: str
    seq_len: int | None = None
    num_docs: int = 0
    num_samples: int
    num_tokens: int
    num_skipped: dict[str, int] = field(default_factory=dict)
    has_mask: bool = False
    shards: list[ShardEntry]
    created_by: str | None = None
    long_docs: str | None = None
    num_truncated: int | None = None
    num_dropped_chunks: int | None = None
    prompt_template: dict[str, str] | None = None
    chat_template_sha256: str | None = None
    chat_template: str | dict[str, str] | None = None
    train_on_prompt: bool | None = None
    selection: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> Manifest:
        """Read and validate ``path/manifest.json``.

        Raises:
            DataError: no such directory or manifest (naming train/ and eval/ when ``path`` holds
                a split), invalid JSON, or a key that is missing, unknown or of the wrong type.
        """
        path = Path(path)
        hint = f"create it with: python tools/prepare_data.py --output {path} ..."
        if not path.is_dir():
            raise DataError(f"dataset directory {path} does not exist; {hint}")
        file = path / MANIFEST_NAME
        if not file.is_file():
            splits = [s for s in ("train", "eval") if (path / s / MANIFEST_NAME).is_file()]
            if splits:
                raise DataError(
                    f"{path} holds split datasets ({', '.join(splits)}), not shards; pass {path / splits[0]} instead"
                )
            raise DataError(f"{file} not found, so {path} is not a shard directory; {hint}")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{file}: not valid JSON ({e}); re-run tools/prepare_data.py") from None
        return cls.from_dict(data, file)

    @classmethod
    def from_dict(cls, data: Any, file: str | os.PathLike = MANIFEST_NAME) -> Manifest:
        """Validate a parsed manifest.

        Args:
            data: the parsed JSON.
            file: named in error messages.

        Raises:
            DataError: naming ``file`` and the offending key.
        """
        redo = "re-run tools/prepare_data.py"
        if not isinstance(data, dict):
            raise DataError(f"{file}: expected a JSON object; {redo}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                did_you_mean = f" (did you mean '{close[0]}'?)" if close else ""
                raise DataError(f"{file}: unknown key '{key}'{did_you_mean}; {redo}")
        for key in _REQUIRED_KEYS:
            if key not in data:
                raise DataError(f"{file}: missing key '{key}'; {redo}")
        if data["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{file}: format_version {data['format_version']!r} is not supported by this irdro "
                f"(reads {FORMAT_VERSION}); re-run tools/prepare_data.py with this version"
            )
        if data["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"{file}: dtype {data['dtype']!r} must be 'uint16' or 'uint32'")
        for key, types in _TYPES.items():
            value = data.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool) != (bool in types)):
                raise DataError(f"{file}: '{key}' is {type(value).__name__} {value!r}; {redo}")
        tokenizer = data.get("tokenizer", {})
        if not isinstance(tokenizer, dict) or set(tokenizer) - {"name", "hash"}:
            raise DataError(f"{file}: 'tokenizer' must be an object {{name, hash}}; {redo}")
        if not isinstance(data["shards"], list):
            raise DataError(f"{file}: 'shards' must be a list; {redo}")
        shards = []
        for i, entry in enumerate(data["shards"]):
            if not isinstance(entry, dict):
                raise DataError(f"{file}: shards[{i}] must be an object; {redo}")
            for key in ("name", "num_samples", "num_tokens", "sha256"):
                if key not in entry:
                    raise DataError(f"{file}: shards[{i}] is missing key '{key}'")
            if set(entry) - {"name", "num_samples", "num_tokens", "sha256"}:
                extra = sorted(set(entry) - {"name", "num_samples", "num_tokens", "sha256"})
                raise DataError(f"{file}: shards[{i}] has unknown key '{extra[0]}'; {redo}")
            if not isinstance(entry["sha256"], dict):
                raise DataError(f"{file}: shards[{i}].sha256 must be an object; {redo}")
            shards.append(
                ShardEntry(
                    str(entry["name"]),
                    int(entry["num_samples"]),
                    int(entry["num_tokens"]),
                    dict(entry["sha256"]),
                )
            )
        template = data.get("chat_template")
        if template is not None and chat_template_sha256(template) != data.get("chat_template_sha256"):
            raise DataError(f"{file}: 'chat_template' does not match 'chat_template_sha256' (edited by hand?); {redo}")
        manifest = cls(**{**data, "tokenizer": TokenizerInfo(**tokenizer), "shards": shards})
        total = sum(s.num_samples for s in manifest.shards)
        if total != manifest.num_samples:
            raise DataError(f"{file}: num_samples is {manifest.num_samples} but the shards list {total}; {redo}")
        return manifest

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in field order; optional keys that are None are left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL_KEYS:
                continue
            if f.name == "tokenizer":
                value = {"name": value.name, "hash": value.hash}
            elif f.name == "shards":
                value = [dataclasses.asdict(s) for s in value]
            out[f.name] = value
        return out

    def write(self, path: str | os.PathLike) -> None:
        """Write ``path/manifest.json`` (the writer's staging directory: no temp file needed)."""
        (Path(path) / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        """One line describing the dataset, for logs and CLIs."""
        skipped = ", ".join(f"{k}={v}" for k, v in self.num_skipped.items() if v)
        extra = "".join(
            f", {n} {label}"
            for n, label in (
                (self.num_truncated, "truncated"),
                (self.num_dropped_chunks, "dropped chunks"),
            )
            if n
        )
        return (
            f"{self.num_docs} docs, {self.num_samples} samples, {self.num_tokens} tokens, "
            f"{len(self.shards)} shards{extra} (skipped: {skipped or 'none'})"
        )


_REQUIRED_KEYS = ("format_version", "dtype", "vocab_size", "num_samples", "num_tokens", "shards")
_OPTIONAL_KEYS = frozenset(
    (
        "long_docs",
        "num_truncated",
        "num_dropped_chunks",
        "prompt_template",
        "chat_template_sha256",
        "chat_template",
        "train_on_prompt",
        "selection",
    )
)
_COUNTERS = ("num_truncated", "num_dropped_chunks")
_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "format": (str,),
    "vocab_size": (int,),
    "eos_token_id": (int,),
    "pad_token_id": (int,),
    "seq_len": (int,),
    "num_docs": (int,),
    "num_samples": (int,),
    "num_tokens": (int,),
    "num_skipped": (dict,),
    "has_mask": (bool,),
    "created_by": (str,),
    "long_docs": (str,),
    "num_truncated": (int,),
    "num_dropped_chunks": (int,),
    "prompt_template": (dict,),
    "chat_template_sha256": (str,),
    "chat_template": (str, dict),
    "train_on_prompt": (bool,),
    "selection": (dict,),
}


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True, eq=False)
class Sample:
    """One training sample (a document or a chunk of one).

    Attributes:
        sample_id: global row index in its ShardDataset (stable for a given dataset).
        input_ids: (L,) int64 token ids.
        labels: (L,) int64, equal to input_ids where supervised and -100 elsewhere. Not
            shifted (HF convention): the trainer shifts.
        doc_id: index of the source document in the prepared input stream.
        chunk_id: position of this chunk within its document (0, 1, ...).
    """

    sample_id: int
    input_ids: np.ndarray
    labels: np.ndarray
    doc_id: int
    chunk_id: int


@dataclass
class _Shard:
    name: str
    tokens: np.ndarray  # (num_tokens,) uint16|uint32, memory-mapped
    index: np.ndarray  # (num_samples, 4) int64, memory-mapped
    mask: np.ndarray | None  # (ceil(num_tokens / 8),) uint8 packed bits, memory-mapped


class ShardDataset:
    """Read-only, memory-mapped view of a shard directory.

    Sample ``i`` is global row ``i`` over the shards in manifest order. Opening checks the
    manifest and every shard's shape and dtype (cheap); :meth:`verify` also checks content hashes.
    Pickling keeps only the path, so DataLoader workers re-map the files instead of copying them.

    Attributes:
        path: the shard directory.
        manifest: the validated ``manifest.json``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        """Open a shard directory.

        Args:
            path: directory written by :class:`ShardWriter` / ``tools/prepare_data.py``.

        Raises:
            DataError: missing directory or manifest, unsupported format_version, missing shard
                file, or a shard whose size or dtype disagrees with the manifest.
        """
        self.path = Path(path)
        self.manifest = Manifest.read(self.path)
        counts = [s.num_samples for s in self.manifest.shards]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._shards: list[_Shard] | None = None
        self._open()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def seq_len(self) -> int | None:
        """The manifest's ``seq_len`` (the packing capacity); None when it has none."""
        return self.manifest.seq_len

    @property
    def tokenizer_name(self) -> str | None:
        """Name of the tokenizer the shards were made with (manifest ``tokenizer.name``)."""
        return self.manifest.tokenizer.name

    @property
    def tokenizer_hash(self) -> str | None:
        """:func:`tokenizer_fingerprint` of that tokenizer (manifest ``tokenizer.hash``)."""
        return self.manifest.tokenizer.hash

    @property
    def chat_template_sha256(self) -> str | None:
        """:func:`chat_template_sha256` of the template ``chat`` shards were rendered with; None
        for the other formats."""
        return self.manifest.chat_template_sha256

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """That template (manifest ``chat_template``: the Jinja text, or a dict of named templates
        as transformers keeps them); None for the other formats and for chat shards prepared
        before irdro recorded the text (they have only the hash)."""
        return self.manifest.chat_template

    def __getitem__(self, idx: int) -> Sample:
        """Return sample ``idx`` (negative indices count from the end).

        Raises:
            IndexError: idx out of range.
        """
        idx = operator.index(idx)
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sample index {idx} out of range for {n} samples in {self.path}")
        shard, (start, end, doc_id, chunk_id) = self._index_row(idx)
        input_ids = np.array(shard.tokens[start:end], dtype=np.int64)
        if shard.mask is None:
            labels = input_ids.copy()
        else:
            supervised = _unpack_range(shard.mask, start, end)
            labels = np.where(supervised, input_ids, IGNORE_INDEX)
        return Sample(idx, input_ids, labels, doc_id, chunk_id)

    def _index_row(self, idx: int) -> tuple[_Shard, tuple[int, int, int, int]]:
        """The shard holding sample `idx` (0 <= idx < len) and its [start, end, doc, chunk] row."""
        shards = self._open()
        s = int(np.searchsorted(self._offsets, idx, side="right")) - 1
        row = shards[s].index[idx - int(self._offsets[s])]
        return shards[s], tuple(int(v) for v in row)

    def describe(self, idx: int) -> dict[str, int]:
        """doc_id, chunk_id and num_tokens of sample `idx` from the index alone (no token reads;
        called for every dumped sample)."""
        _, (start, end, doc_id, chunk_id) = self._index_row(idx)
        return {"doc_id": doc_id, "chunk_id": chunk_id, "num_tokens": end - start}

    def verify(self) -> None:
        """Recompute every shard file's sha256 and check the index rows are consistent.

        Raises:
            DataError: naming the first file whose hash or index does not match.
        """
        for entry, shard in zip(self.manifest.shards, self._open(), strict=True):
            for suffix, expected in entry.sha256.items():
                file = self.path / f"{entry.name}.{suffix}"
                actual = fsio.sha256_file(file)
                if actual != expected:
                    raise DataError(
                        f"{file}: sha256 {actual[:12]}... does not match the manifest "
                        f"({expected[:12]}...); the file is corrupt, re-run tools/prepare_data.py"
                    )
            _check_index(self.path / f"{entry.name}.index.npy", shard.index, len(shard.tokens))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ShardDataset({str(self.path)!r}, samples={len(self)}, "
            f"tokens={self.manifest.num_tokens}, seq_len={self.manifest.seq_len})"
        )

    def _open(self) -> list[_Shard]:
        if self._shards is None:
            self._shards = [_open_shard(self.path, self.manifest, e) for e in self.manifest.shards]
        return self._shards


def _open_shard(path: Path, manifest: Manifest, entry: ShardEntry) -> _Shard:
    name = entry.name
    num_tokens, num_samples = entry.num_tokens, entry.num_samples
    tokens = _load_npy(path / f"{name}.tokens.npy", np.dtype(manifest.dtype), (num_tokens,))
    index = _load_npy(path / f"{name}.index.npy", np.dtype(np.int64), (num_samples, 4))
    mask = None
    if "mask.npy" in entry.sha256:
        mask = _load_npy(path / f"{name}.mask.npy", np.dtype(np.uint8), ((num_tokens + 7) // 8,))
    if num_samples and (int(index[0, 0]) != 0 or int(index[-1, 1]) != num_tokens):
        raise DataError(
            f"{path / f'{name}.index.npy'}: rows do not span the shard's {num_tokens} tokens; "
            "re-run tools/prepare_data.py"
        )
    return _Shard(name, tokens, index, mask)


def _load_npy(file: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not file.is_file():
        raise DataError(f"shard file {file} is missing; re-run tools/prepare_data.py")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{file}: not a readable .npy file ({e}); re-run tools/prepare_data.py") from None
    if array.shape != shape or array.dtype.newbyteorder("=") != dtype.newbyteorder("="):
        raise DataError(
            f"{file}: has shape {array.shape} {array.dtype}, the manifest says {shape} {dtype}; "
            "the file is truncated or from another run, re-run tools/prepare_data.py"
        )
    return array


def _unpack_range(packed: np.ndarray, start: int, end: int) -> np.ndarray:
    """Return (end - start,) bool flags from an np.packbits array of per-token flags."""
    first = start // 8
    bits = np.unpackbits(packed[first : (end + 7) // 8])
    return bits[start - 8 * first : end - 8 * first].astype(bool)


def _check_index(file: Path, index: np.ndarray, num_tokens: int) -> None:
    rows = np.asarray(index)
    if len(rows) == 0:
        return
    starts, ends = rows[:, 0], rows[:, 1]
    bad = np.flatnonzero((starts >= ends) | (rows[:, 2] < 0) | (rows[:, 3] < 0) | (ends > num_tokens)).tolist()
    bad += (np.flatnonzero(starts[1:] != ends[:-1]) + 1).tolist()
    if starts[0] != 0:
        bad.append(0)
    if bad:
        row = min(bad)
        raise DataError(
            f"{file}: row {row} {rows[row].tolist()} is inconsistent with its neighbours or the "
            f"{num_tokens} tokens; re-run tools/prepare_data.py"
        )


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Stream samples into a new shard directory.

    Files go to a temporary directory next to ``output_dir`` that :meth:`finalize` renames into
    place, so readers never see a half-written dataset and a failed run leaves an existing
    output untouched. Samples never straddle shards; a shard is closed before it would exceed
    ``shard_tokens`` (a single longer sample gets a shard of its own).

    Use as a context manager: leaving the block without :meth:`finalize` calls :meth:`abort`.

    It writes a :class:`Manifest`: the keys given here, the counts it makes (num_docs: distinct
    doc_ids written), the optional keys passed as ``meta`` and the counters bumped with
    :meth:`count`. ``chat`` shards carry ``chat_template`` (the Jinja text they were rendered
    with) and its ``chat_template_sha256``; a reader refuses a text that does not match its hash.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        vocab_size: int,
        tokenizer_name: str,
        tokenizer_hash: str,
        seq_len: int,
        eos_token_id: int | None,
        pad_token_id: int | None,
        format: str = "text",
        shard_tokens: int = 2**26,
        overwrite: bool = False,
        meta: dict[str, Any] | None = None,
        skip_reasons: Iterable[str] = (),
    ) -> None:
        """Create the temporary directory; fail fast if the output is not writable as asked.

        Args:
            output_dir: final shard directory.
            vocab_size: every token id must be < vocab_size; <= 65536 stores uint16, else uint32.
            tokenizer_name: recorded in the manifest.
            tokenizer_hash: :func:`tokenizer_fingerprint` of the tokenizer, recorded.
            seq_len: maximum sample length the data was prepared for, recorded.
            eos_token_id: recorded.
            pad_token_id: recorded.
            format: input format name ("text", later "alpaca", "chat"), recorded.
            shard_tokens: target tokens per shard file.
            overwrite: allow replacing a non-empty output_dir (at finalize).
            meta: optional :class:`Manifest` fields (e.g. long_docs, prompt_template); they must
                not shadow the keys above.
            skip_reasons: reasons :meth:`skip` counts, all recorded in ``num_skipped`` (at 0 when
                unused); others are added as they come.

        Raises:
            DataError: output_dir is a file, or non-empty without overwrite.
        """
        if not 0 < vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be in (0, 2**32], got {vocab_size}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        check_output_dir(self.output_dir, overwrite)
        self.dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
        self.shard_tokens = int(shard_tokens)
        meta = dict(meta or {})
        clash = sorted(set(meta) - _OPTIONAL_KEYS)
        if clash:
            known = {f.name for f in dataclasses.fields(Manifest)}
            if set(clash) & known:
                raise ValueError(f"meta keys {clash} would shadow manifest keys")
            raise ValueError(f"meta keys {clash} are not manifest keys ({', '.join(sorted(_OPTIONAL_KEYS))})")
        self._manifest = Manifest(
            format_version=FORMAT_VERSION,
            format=format,
            tokenizer=TokenizerInfo(tokenizer_name, tokenizer_hash),
            vocab_size=int(vocab_size),
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            dtype="uint16" if self.dtype.itemsize == 2 else "uint32",
            seq_len=int(seq_len),
            num_samples=0,
            num_tokens=0,
            shards=[],
            created_by=f"irdro {__version__}",
            **meta,
        )
        self._shards: list[ShardEntry] = []
        self._num_skipped = dict.fromkeys(skip_reasons, 0)
        self._counters = {k: getattr(self._manifest, k) for k in _COUNTERS if getattr(self._manifest, k) is not None}
        self._num_docs = 0
        self._last_doc_id: int | None = None
        self._tmp: Path | None = fsio.make_staging_dir(self.output_dir)
        self._file: Any = None  # open tokens file of the current shard
        self._rows = array.array("q")  # current shard's index, flattened [start, end, doc, chunk]
        self._masks: list[np.ndarray | None] = []
        self._num_tokens = 0  # in the current shard
        self._header_len = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self.abort()

    def add(
        self,
        tokens: np.ndarray | list[int],
        doc_id: int,
        chunk_id: int,
        mask: np.ndarray | None = None,
    ) -> None:
        """Append one sample.

        Args:
            tokens: (L,) integer token ids, L >= 1.
            doc_id: source document index (>= 0). A document's samples must be added one after
                another: num_docs counts runs of equal doc_id (O(1) memory).
            chunk_id: chunk index within the document (>= 0).
            mask: optional (L,) bool, True where the token is supervised. Shards with any masked
                sample get a ``mask.npy``; samples added without one are fully supervised.

        Raises:
            DataError: a token id is negative or >= vocab_size (does not fit the dtype).
        """
        if self._tmp is None:
            raise RuntimeError("ShardWriter is already finalized or aborted")
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be a non-empty 1-D integer array, got {arr.shape} {arr.dtype}")
        if doc_id < 0 or chunk_id < 0:
            raise ValueError(f"doc_id and chunk_id must be >= 0, got {doc_id}, {chunk_id}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self._manifest.vocab_size:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"document {doc_id} chunk {chunk_id}: token id {bad} is outside the vocabulary "
                f"[0, {self._manifest.vocab_size}); check that --tokenizer matches the data"
            )
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != arr.shape:
                raise ValueError(f"mask shape {mask.shape} != tokens shape {arr.shape}")
        if self._rows and self._num_tokens + arr.size > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self._rows.extend((self._num_tokens, self._num_tokens + arr.size, doc_id, chunk_id))
        self._masks.append(mask)
        self._num_tokens += arr.size
        if doc_id != self._last_doc_id:
            self._num_docs += 1
            self._last_doc_id = doc_id

    @property
    def num_samples(self) -> int:
        """Samples added so far."""
        return sum(s.num_samples for s in self._shards) + len(self._masks)

    @property
    def num_skipped(self) -> dict[str, int]:
        """Documents skipped so far, by reason."""
        return dict(self._num_skipped)

    def skip(self, reason: str) -> None:
        """Count one document not written, under ``num_skipped[reason]``."""
        self._num_skipped[reason] = self._num_skipped.get(reason, 0) + 1

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the manifest counter ``key`` (num_truncated, num_dropped_chunks; created at 0)."""
        if key not in _COUNTERS:
            raise ValueError(f"manifest key {key!r} is not a counter ({', '.join(_COUNTERS)})")
        self._counters[key] = self._counters.get(key, 0) + n

    def finalize(self) -> Manifest:
        """Close the last shard, write the manifest and move the directory into place.

        Returns:
            The manifest.

        Raises:
            DataError: the output became non-empty meanwhile and overwrite is off.
        """
        if self._tmp is None:
            raise RuntimeError("ShardWriter is already finalized or aborted")
        if self._rows:
            self._close_shard()
        manifest = dataclasses.replace(
            self._manifest,
            num_docs=self._num_docs,
            num_samples=sum(s.num_samples for s in self._shards),
            num_tokens=sum(s.num_tokens for s in self._shards),
            num_skipped=dict(self._num_skipped),
            has_mask=any("mask.npy" in s.sha256 for s in self._shards),
            shards=list(self._shards),
            **self._counters,
        )
        manifest.write(self._tmp)
        try:
            publish_dir(self._tmp, self.output_dir, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        logger.info(
            "wrote %s: %d docs, %d samples, %d tokens in %d shards",
            self.output_dir,
            manifest.num_docs,
            manifest.num_samples,
            manifest.num_tokens,
            len(manifest.shards),
        )
        return manifest

    def abort(self) -> None:
        """Discard everything written; the output directory is left as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _shard_name(self) -> str:
        return f"shard_{len(self._shards):05d}"

    def _open_shard(self) -> None:
        assert self._tmp is not None
        self._file = open(self._tmp / f"{self._shard_name()}.tokens.npy", "wb")
        self._write_tokens_header(0)
        self._header_len = self._file.tell()

    def _write_tokens_header(self, length: int) -> None:
        # numpy pads 1-D headers so the shape can grow in place: write a placeholder now and
        # rewrite it with the real length at close, streaming the tokens in between.
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(self._file, {**header, "shape": (length,)})

    def _close_shard(self) -> None:
        assert self._tmp is not None and self._file is not None
        name = self._shard_name()
        self._file.seek(0)
        self._write_tokens_header(self._num_tokens)
        if self._file.tell() != self._header_len:
            raise RuntimeError("npy header changed size; cannot finalize the tokens file")
        self._file.close()
        self._file = None
        rows = np.frombuffer(self._rows, dtype=np.int64).reshape(-1, 4)
        np.save(self._tmp / f"{name}.index.npy", rows.astype("<i8"))
        files = ["tokens.npy", "index.npy"]
        if any(m is not None for m in self._masks):
            flags = np.ones(self._num_tokens, dtype=bool)
            for (start, end, _, _), m in zip(rows.tolist(), self._masks, strict=True):
                if m is not None:
                    flags[start:end] = m
            np.save(self._tmp / f"{name}.mask.npy", np.packbits(flags))
            files.append("mask.npy")
        sha256 = {f: fsio.sha256_file(self._tmp / f"{name}.{f}") for f in files}
        self._shards.append(ShardEntry(name, len(rows), self._num_tokens, sha256))
        self._rows, self._masks, self._num_tokens = array.array("q"), [], 0


# --------------------------------------------------------------------------- compatibility


def check_compatible(
    tokenizer: Any,
    shards: Mapping[str, ShardDataset | None],
    *,
    model_vocab: int | None = None,
    chat_template: bool = True,
) -> str | None:
    """Check that shard directories belong to a tokenizer (and model); the one such check.

    In order: the chat template (when ``chat_template``; over all directories), then per
    directory the tokenizer fingerprint and, with ``model_vocab``, the vocabulary bound. A
    tokenizer without a chat template adopts the one ``chat`` shards were rendered with (it is
    modified), so the run's hf/ and every export serve the model with the format it was trained
    on; a different template, or two directories with different ones, is refused naming both.

    Args:
        tokenizer: a transformers tokenizer (duck-typed: ``name_or_path``, ``chat_template`` and
            what :func:`tokenizer_fingerprint` reads).
        shards: the caller's name for each directory (``data.train``) -> its dataset, or None.
        model_vocab: the model's embedding rows; None skips the vocabulary check.
        chat_template: also check (and adopt) the chat template.

    Returns:
        The key whose chat template the tokenizer adopted, or None.

    Raises:
        ShardMismatch: naming the key, both sides and what to do.
    """
    present = {key: d for key, d in shards.items() if d is not None}
    adopted = _check_chat_template(tokenizer, present) if chat_template else None
    want = tokenizer_fingerprint(tokenizer)
    for key, data in present.items():
        got = data.manifest.tokenizer.hash
        if got != want:
            raise ShardMismatch(
                f"{key}: shards were tokenised with {data.manifest.tokenizer.name} "
                f"(hash {str(got)[:12]}) but the model's tokenizer is {tokenizer.name_or_path} "
                f"(hash {want[:12]}); re-run tools/prepare_data.py with the model's tokenizer",
                key=key,
                kind="tokenizer",
                found=got,
                expected=want,
            )
        vocab = data.manifest.vocab_size
        if model_vocab is not None and vocab > model_vocab:
            raise ShardMismatch(
                f"{key}: shard vocab {vocab} > model vocab {model_vocab}",
                key=key,
                kind="vocab",
                found=vocab,
                expected=model_vocab,
            )
    return adopted


def _check_chat_template(tokenizer: Any, shards: dict[str, ShardDataset]) -> str | None:
    """The chat-template part of :func:`check_compatible`; returns the adopting key or None."""
    chat = {key: d for key, d in shards.items() if d.chat_template_sha256}
    if not chat:
        return None
    (key, data), *others = chat.items()
    want = data.chat_template_sha256
    assert want is not None
    for other_key, other in others:
        if other.chat_template_sha256 != want:
            raise ShardMismatch(
                f"{other_key}: shards were prepared with chat template sha256 "
                f"{str(other.chat_template_sha256)[:12]} ({other.path}) but {key}'s with {want[:12]} "
                f"({data.path}); prepare both with the same tokenizer and --chat-template",
                key=other_key,
                kind="chat_template",
                found=other.chat_template_sha256,
                expected=want,
            )
    tok_dir = tokenizer.name_or_path
    if not tokenizer.chat_template:
        template = next((d.chat_template for d in chat.values() if d.chat_template), None)
        if template is None:
            raise ShardMismatch(
                f"{key}: shards were prepared with chat template sha256 {want[:12]}, the tokenizer "
                f"{tok_dir} has none, and {data.path}/manifest.json holds only the hash (an older "
                "irdro); re-run tools/prepare_data.py, or point model.tokenizer at a tokenizer "
                "folder whose tokenizer_config.json has that template",
                key=key,
                kind="chat_template",
                found=want,
                expected=None,
            )
        tokenizer.chat_template = template
        return key
    have = chat_template_sha256(tokenizer.chat_template)
    if have != want:
        raise ShardMismatch(
            f"{key}: shards were prepared with chat template sha256 {want[:12]} ({data.path}) but "
            f"the tokenizer {tok_dir} has chat template sha256 {have[:12]}; point model.tokenizer "
            "at the tokenizer folder the shards were prepared with, or re-run "
            "tools/prepare_data.py --chat-template FILE with this tokenizer's template",
            key=key,
            kind="chat_template",
            found=want,
            expected=have,
        )
    return None


__all__ = [
    "FORMAT_VERSION",
    "IGNORE_INDEX",
    "MANIFEST_NAME",
    "DataError",
    "Manifest",
    "Sample",
    "ShardDataset",
    "ShardEntry",
    "ShardMismatch",
    "ShardWriter",
    "TokenizerInfo",
    "chat_template_sha256",
    "check_compatible",
    "check_output_dir",
    "publish_dir",
    "tokenizer_fingerprint",
]
