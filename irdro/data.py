"""Token shards on disk and the deterministic order in which training reads them.

Owns:
  * the shard directory format (``manifest.json`` + ``shard_NNNNN.{tokens,index,mask}.npy``,
    format_version 1) and its writer (:class:`ShardWriter`) and reader (:class:`ShardDataset`);
  * the seeded, index-based global sample order (:class:`GlobalOrder`,
    :func:`sample_positions`) that makes resume exact;
  * batching of samples into padded tensors (:func:`collate`) or into packed rows that keep
    documents apart (:func:`collate_packed`).

Turning input files into shards (formats, masks, bad input) is irdro.prepare's job.

Must not: call torch.distributed or import deepspeed (rank/world come in as plain ints), hold a
whole corpus in memory, or print (it logs).

Layout of a shard directory (format_version 1)::

    manifest.json              dataset metadata, per-shard counts and sha256 (see ShardWriter)
    shard_00000.tokens.npy     (num_tokens,) uint16|uint32, all samples' tokens concatenated
    shard_00000.index.npy      (num_samples, 4) int64 rows [start, end, doc_id, chunk_id]
    shard_00000.mask.npy       optional: np.packbits of per-token "supervised" flags; absent
                               means every token is supervised
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import operator
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irdro import __version__, fsio

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
IGNORE_INDEX = -100

# Why a document (input record) was not written, counted per reason in manifest["num_skipped"].
SKIP_REASONS = {
    "bad_json": "a malformed JSON line or file, skipped with --skip-bad",
    "bad_record": "a record with a missing or mistyped field, skipped with --skip-bad",
    "empty": "empty or whitespace-only text",
    "too_short": "fewer than 2 supervised tokens (e.g. an empty response)",
    "truncated_response": "--long-docs truncate cut away the response (fewer than 2 supervised "
    "tokens left)",
}

_REQUIRED_KEYS = ("format_version", "dtype", "vocab_size", "num_samples", "num_tokens", "shards")


class DataError(Exception):
    """One-line, user-facing message naming the file/line/key and what to do."""


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
        manifest: the parsed ``manifest.json``.
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
        self.manifest = _load_manifest(self.path)
        counts = [int(s["num_samples"]) for s in self.manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if int(self._offsets[-1]) != int(self.manifest["num_samples"]):
            raise DataError(
                f"{self.path / MANIFEST_NAME}: num_samples is {self.manifest['num_samples']} but "
                f"the shards list {int(self._offsets[-1])}; re-run tools/prepare_data.py"
            )
        self._shards: list[_Shard] | None = None
        self._open()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def tokenizer_name(self) -> str | None:
        """Name of the tokenizer the shards were made with (manifest ``tokenizer.name``)."""
        return self.manifest.get("tokenizer", {}).get("name")

    @property
    def tokenizer_hash(self) -> str | None:
        """:func:`tokenizer_fingerprint` of that tokenizer (manifest ``tokenizer.hash``)."""
        return self.manifest.get("tokenizer", {}).get("hash")

    @property
    def chat_template_sha256(self) -> str | None:
        """:func:`chat_template_sha256` of the template ``chat`` shards were rendered with; None
        for the other formats."""
        return self.manifest.get("chat_template_sha256")

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        """That template (manifest ``chat_template``: the Jinja text, or a dict of named templates
        as transformers keeps them); None for the other formats and for chat shards prepared
        before irdro recorded the text (they have only the hash)."""
        return self.manifest.get("chat_template")

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
        for entry, shard in zip(self.manifest["shards"], self._open(), strict=True):
            for suffix, expected in entry["sha256"].items():
                file = self.path / f"{entry['name']}.{suffix}"
                actual = _sha256_file(file)
                if actual != expected:
                    raise DataError(
                        f"{file}: sha256 {actual[:12]}... does not match the manifest "
                        f"({expected[:12]}...); the file is corrupt, re-run tools/prepare_data.py"
                    )
            _check_index(self.path / f"{entry['name']}.index.npy", shard.index, len(shard.tokens))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ShardDataset({str(self.path)!r}, samples={len(self)}, "
            f"tokens={self.manifest['num_tokens']}, seq_len={self.manifest.get('seq_len')})"
        )

    def _open(self) -> list[_Shard]:
        if self._shards is None:
            self._shards = [
                _open_shard(self.path, self.manifest, e) for e in self.manifest["shards"]
            ]
        return self._shards


def _load_manifest(path: Path) -> dict[str, Any]:
    hint = f"create it with: python tools/prepare_data.py --output {path} ..."
    if not path.is_dir():
        raise DataError(f"dataset directory {path} does not exist; {hint}")
    file = path / MANIFEST_NAME
    if not file.is_file():
        splits = [s for s in ("train", "eval") if (path / s / MANIFEST_NAME).is_file()]
        if splits:
            raise DataError(
                f"{path} holds split datasets ({', '.join(splits)}), not shards; "
                f"pass {path / splits[0]} instead"
            )
        raise DataError(f"{file} not found, so {path} is not a shard directory; {hint}")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e}); re-run tools/prepare_data.py") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{file}: expected a JSON object; re-run tools/prepare_data.py")
    for key in _REQUIRED_KEYS:
        if key not in manifest:
            raise DataError(f"{file}: missing key '{key}'; re-run tools/prepare_data.py")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{file}: format_version {manifest['format_version']!r} is not supported by this irdro "
            f"(reads {FORMAT_VERSION}); re-run tools/prepare_data.py with this version"
        )
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{file}: dtype {manifest['dtype']!r} must be 'uint16' or 'uint32'")
    for i, entry in enumerate(manifest["shards"]):
        for key in ("name", "num_samples", "num_tokens", "sha256"):
            if key not in entry:
                raise DataError(f"{file}: shards[{i}] is missing key '{key}'")
    if not isinstance(manifest.get("tokenizer", {}), dict):
        raise DataError(
            f"{file}: 'tokenizer' must be an object {{name, hash}}; re-run tools/prepare_data.py"
        )
    template = manifest.get("chat_template")
    if template is not None and (
        not isinstance(template, (str, dict))
        or chat_template_sha256(template) != manifest.get("chat_template_sha256")
    ):
        raise DataError(
            f"{file}: 'chat_template' does not match 'chat_template_sha256' (edited by hand?); "
            "re-run tools/prepare_data.py"
        )
    return manifest


def _open_shard(path: Path, manifest: dict[str, Any], entry: dict[str, Any]) -> _Shard:
    name = entry["name"]
    num_tokens, num_samples = int(entry["num_tokens"]), int(entry["num_samples"])
    tokens = _load_npy(path / f"{name}.tokens.npy", np.dtype(manifest["dtype"]), (num_tokens,))
    index = _load_npy(path / f"{name}.index.npy", np.dtype(np.int64), (num_samples, 4))
    mask = None
    if "mask.npy" in entry["sha256"]:
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
        raise DataError(
            f"{file}: not a readable .npy file ({e}); re-run tools/prepare_data.py"
        ) from None
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
    bad = np.flatnonzero(
        (starts >= ends) | (rows[:, 2] < 0) | (rows[:, 3] < 0) | (ends > num_tokens)
    ).tolist()
    bad += (np.flatnonzero(starts[1:] != ends[:-1]) + 1).tolist()
    if starts[0] != 0:
        bad.append(0)
    if bad:
        row = min(bad)
        raise DataError(
            f"{file}: row {row} {rows[row].tolist()} is inconsistent with its neighbours or the "
            f"{num_tokens} tokens; re-run tools/prepare_data.py"
        )


_sha256_file = fsio.sha256_file


# --------------------------------------------------------------------------- order and batching


def sample_positions(
    step: int, micro: int, rank: int, dp: int, ga: int, micro_batch_size: int
) -> np.ndarray:
    """Global stream positions read by one rank for one micro-batch.

    The global batch of an optimizer step is ``G = dp * ga * B`` consecutive positions; within
    it micro-batch ``micro`` owns a block of ``dp * B`` and rank ``rank`` a block of ``B`` inside
    that. So the step's positions are covered exactly once over (micro, rank), and a fixed
    global batch is independent of how it is split into dp and ga.

    Args:
        step: optimizer step (0-based).
        micro: micro-batch within the step, in [0, ga).
        rank: data-parallel rank, in [0, dp).
        dp: data-parallel world size.
        ga: gradient-accumulation steps.
        micro_batch_size: B, samples per rank per micro-batch.

    Returns:
        (B,) int64 positions ``step*G + micro*dp*B + rank*B + arange(B)``; map them to dataset
        indices with :class:`GlobalOrder`.
    """
    if not (0 <= micro < ga and 0 <= rank < dp and micro_batch_size > 0 and step >= 0):
        raise ValueError(
            f"need step >= 0, 0 <= micro < ga, 0 <= rank < dp, B > 0; got step={step} "
            f"micro={micro} ga={ga} rank={rank} dp={dp} B={micro_batch_size}"
        )
    b = micro_batch_size
    base = step * dp * ga * b + micro * dp * b + rank * b
    return base + np.arange(b, dtype=np.int64)


class GlobalOrder:
    """Deterministic map from global stream position to dataset index, over epochs.

    Position ``p`` is in epoch ``p // N`` and reads ``perm(seed, epoch)[p % N]``, where ``perm``
    is ``np.random.Generator(np.random.PCG64([seed, epoch])).permutation(N)`` (identity when
    shuffle is off). Being a pure function of the position, resuming at a step is exact: no
    sampler state beyond the step counter. The last two epoch permutations are cached.
    """

    _CACHE_SIZE = 2

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        """Args:
        num_samples: N, the dataset length (> 0).
        seed: non-negative seed shared by all ranks.
        shuffle: permute each epoch; if False position p reads index p % N.
        """
        if num_samples <= 0:
            raise ValueError(f"GlobalOrder needs num_samples > 0, got {num_samples}")
        if seed < 0:
            raise ValueError(f"GlobalOrder needs a non-negative seed, got {seed}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        """Map positions to dataset indices.

        Args:
            positions: (...) non-negative integer stream positions.

        Returns:
            (...) int64 dataset indices, same shape as positions.
        """
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and int(pos.min()) < 0:
            raise ValueError("GlobalOrder positions must be non-negative")
        if not self.shuffle:
            return pos % self.num_samples
        epochs, offsets = np.divmod(pos, self.num_samples)
        out = np.empty_like(pos)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = self.permutation(epoch)[offsets[sel]]
        return out

    def permutation(self, epoch: int) -> np.ndarray:
        """Return the (N,) int64 order of ``epoch`` (cached; treat as read-only)."""
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            perm = rng.permutation(self.num_samples).astype(np.int64, copy=False)
            self._perms[epoch] = perm
            while len(self._perms) > self._CACHE_SIZE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm


def collate(
    samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 8
) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch.

    Args:
        samples: B samples of lengths L_i.
        pad_id: token id written into padding (never supervised, masked out of attention).
        pad_to_multiple_of: T is max(L_i) rounded up to a multiple of this (1 = no rounding).

    Returns:
        input_ids: (B, T) int64, pad_id on padding.
        labels: (B, T) int64, -100 on padding.
        attention_mask: (B, T) int64, 1 on real tokens.
        sample_ids: (B,) int64.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(samples), width), dtype=np.int64)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = s.input_ids
        labels[row, :n] = s.labels
        attention_mask[row, :n] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention_mask),
        "sample_ids": torch.tensor(
            [s.sample_id for s in samples], dtype=torch.int64, device="cpu"
        ),  # host side
    }


def packed_row_capacity(seq_len: int, pad_to_multiple_of: int = 8) -> int:
    """Tokens one packed row may hold: ``seq_len`` rounded up to ``pad_to_multiple_of``."""
    if seq_len < 1 or pad_to_multiple_of < 1:
        raise ValueError(f"need seq_len >= 1 and pad_to_multiple_of >= 1, got {seq_len}, "
                         f"{pad_to_multiple_of}")  # fmt: skip
    return -(-seq_len // pad_to_multiple_of) * pad_to_multiple_of


def collate_packed(
    samples: list[Sample], pad_id: int, seq_len: int, pad_to_multiple_of: int = 8
) -> dict[str, torch.Tensor]:
    """Pack samples first-fit-decreasing into as few rows as fit, keeping them apart.

    Each sample becomes one contiguous segment of a row. Segments never see each other: position
    ids restart at 0 per segment and ``segment_ids`` tell the model side which tokens may attend
    to which (irdro.model builds the block-diagonal mask or the flash-attn varlen layout from
    them). The first token of every segment gets label -100, so the last token of one document is
    never trained to predict the first token of the next; a segment's own first label is never a
    target anyway (labels are unshifted), so per-segment losses equal the unpacked ones.

    The packing is a pure function of the samples (lengths, then position in ``samples`` break
    ties), so every rank and every resume packs a micro-batch identically.

    Args:
        samples: B samples of lengths L_i.
        pad_id: token id written into padding (never supervised, attends only to padding).
        seq_len: row capacity before rounding; normally the manifest's ``seq_len``. A sample
            longer than the capacity gets a row of its own.
        pad_to_multiple_of: capacity and T are rounded up to a multiple of this.

    Returns:
        input_ids: (R, T) int64, pad_id on padding.
        labels: (R, T) int64, -100 on padding and on each segment's first token.
        position_ids: (R, T) int64, 0..L_i-1 within each segment; a row's trailing padding counts
            0, 1, ... as a segment of its own.
        segment_ids: (R, T) int64, index i into ``samples`` of the token's sample, -1 on padding.
        sample_ids: (B,) int64, in the order of ``samples`` (per-sample losses use this order).
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    capacity = packed_row_capacity(seq_len, pad_to_multiple_of)
    lengths = [len(s.input_ids) for s in samples]
    rows: list[list[int]] = []  # sample indices per row, in placement order
    fill: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: (-lengths[i], i)):
        for r in range(len(rows)):
            if fill[r] + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    width = -(-max(fill) // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.full(shape, -1, dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            s, n = samples[i], lengths[i]
            input_ids[r, at : at + n] = s.input_ids
            labels[r, at + 1 : at + n] = s.labels[1:]
            position_ids[r, at : at + n] = np.arange(n)
            segment_ids[r, at : at + n] = i
            at += n
        position_ids[r, at:] = np.arange(width - at)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "sample_ids": torch.tensor(
            [s.sample_id for s in samples], dtype=torch.int64, device="cpu"
        ),  # host side
    }


# --------------------------------------------------------------------------- writing


def check_output_dir(output: Path, overwrite: bool) -> None:
    """`irdro.fsio.check_output_dir`, its refusal as a DataError (the tools' exit code 2)."""
    try:
        fsio.check_output_dir(output, overwrite)
    except fsio.OutputError as e:
        raise DataError(str(e)) from None


def install_dir(staging: Path, output: Path, overwrite: bool) -> None:
    """`irdro.fsio.publish_dir`, its refusal as a DataError."""
    check_output_dir(output, overwrite)
    fsio.publish_dir(staging, output, overwrite)


make_staging_dir = fsio.make_staging_dir


class ShardWriter:
    """Stream samples into a new shard directory.

    Files go to a temporary directory next to ``output_dir`` that :meth:`finalize` renames into
    place, so readers never see a half-written dataset and a failed run leaves an existing
    output untouched. Samples never straddle shards; a shard is closed before it would exceed
    ``shard_tokens`` (a single longer sample gets a shard of its own).

    Use as a context manager: leaving the block without :meth:`finalize` calls :meth:`abort`.

    The manifest has: format_version, format, tokenizer {name, hash}, vocab_size, eos_token_id,
    pad_token_id, dtype, seq_len, num_docs (distinct doc_ids written), num_samples, num_tokens,
    num_skipped {reason: documents} (reasons in :data:`SKIP_REASONS`, all present), has_mask (any
    shard has a mask.npy), shards [{name, num_samples, num_tokens, sha256 {file: hex}}],
    created_by, plus the optional keys passed as ``meta`` and the counters bumped with
    :meth:`count`. Readers ignore keys they do not know, so optional keys keep format_version 1.
    ``chat`` shards carry ``chat_template`` (the Jinja text they were rendered with) and its
    ``chat_template_sha256``; a reader refuses a text that does not match its hash.
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
            meta: extra JSON-serialisable manifest keys (e.g. long_docs, prompt_template); they
                must not shadow the keys above.

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
        self._manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "format": format,
            "tokenizer": {"name": tokenizer_name, "hash": tokenizer_hash},
            "vocab_size": int(vocab_size),
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "dtype": "uint16" if self.dtype.itemsize == 2 else "uint32",
            "seq_len": int(seq_len),
            "num_docs": 0,
            "num_samples": 0,
            "num_tokens": 0,
            "num_skipped": dict.fromkeys(SKIP_REASONS, 0),
            "has_mask": False,
            "shards": [],
            "created_by": f"irdro {__version__}",
        }
        clash = sorted(set(meta or {}) & set(self._manifest))
        if clash:
            raise ValueError(f"meta keys {clash} would shadow manifest keys")
        self._manifest.update(meta or {})
        self._num_docs = 0
        self._last_doc_id: int | None = None
        self._tmp: Path | None = make_staging_dir(self.output_dir)
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
            raise ValueError(
                f"tokens must be a non-empty 1-D integer array, got {arr.shape} {arr.dtype}"
            )
        if doc_id < 0 or chunk_id < 0:
            raise ValueError(f"doc_id and chunk_id must be >= 0, got {doc_id}, {chunk_id}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self._manifest["vocab_size"]:
            bad = lo if lo < 0 else hi
            raise DataError(
                f"document {doc_id} chunk {chunk_id}: token id {bad} is outside the vocabulary "
                f"[0, {self._manifest['vocab_size']}); check that --tokenizer matches the data"
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
        return sum(s["num_samples"] for s in self._manifest["shards"]) + len(self._masks)

    @property
    def num_skipped(self) -> dict[str, int]:
        """Documents skipped so far, by reason."""
        return dict(self._manifest["num_skipped"])

    def skip(self, reason: str) -> None:
        """Count one document not written, under ``num_skipped[reason]``."""
        skipped = self._manifest["num_skipped"]
        skipped[reason] = skipped.get(reason, 0) + 1

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the top-level integer manifest counter ``key`` (created at 0)."""
        if not isinstance(self._manifest.get(key, 0), int):
            raise ValueError(f"manifest key {key!r} is not a counter")
        self._manifest[key] = self._manifest.get(key, 0) + n

    def finalize(self) -> dict[str, Any]:
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
        manifest = self._manifest
        manifest["num_docs"] = self._num_docs
        manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
        manifest["num_tokens"] = sum(s["num_tokens"] for s in manifest["shards"])
        manifest["has_mask"] = any("mask.npy" in s["sha256"] for s in manifest["shards"])
        (self._tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            install_dir(self._tmp, self.output_dir, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        logger.info(
            "wrote %s: %d docs, %d samples, %d tokens in %d shards",
            self.output_dir,
            manifest["num_docs"],
            manifest["num_samples"],
            manifest["num_tokens"],
            len(manifest["shards"]),
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
        return f"shard_{len(self._manifest['shards']):05d}"

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
        self._manifest["shards"].append(
            {
                "name": name,
                "num_samples": len(rows),
                "num_tokens": self._num_tokens,
                "sha256": {f: _sha256_file(self._tmp / f"{name}.{f}") for f in files},
            }
        )
        self._rows, self._masks, self._num_tokens = array.array("q"), [], 0


# --------------------------------------------------------------------------- helpers


def is_eval_document(doc_id: int, seed: int, eval_fraction: float) -> bool:
    """Deterministic, platform-independent train/eval assignment of document ``doc_id``."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < eval_fraction


def prepare_text(
    inputs: list[str], tokenizer_dir: str, output: str, **kwargs: Any
) -> dict[str, Any]:
    """Tokenise text documents into shards: :func:`irdro.prepare.prepare` with format="text".

    Kept here for callers of the original API; new code should use irdro.prepare.
    """
    from irdro.prepare import prepare

    return prepare(inputs, tokenizer_dir, output, format="text", **kwargs)


def dataset_summary(manifest: dict[str, Any]) -> str:
    """One line describing a manifest, for logs and CLIs."""
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["num_skipped"].items() if v)
    extra = "".join(
        f", {manifest[k]} {label}"
        for k, label in (("num_truncated", "truncated"), ("num_dropped_chunks", "dropped chunks"))
        if manifest.get(k)
    )
    return (
        f"{manifest['num_docs']} docs, {manifest['num_samples']} samples, "
        f"{manifest['num_tokens']} tokens, {len(manifest['shards'])} shards{extra} "
        f"(skipped: {skipped or 'none'})"
    )


__all__ = [
    "MANIFEST_NAME",
    "SKIP_REASONS",
    "DataError",
    "GlobalOrder",
    "Sample",
    "ShardDataset",
    "ShardWriter",
    "chat_template_sha256",
    "collate",
    "collate_packed",
    "dataset_summary",
    "is_eval_document",
    "packed_row_capacity",
    "prepare_text",
    "sample_positions",
    "tokenizer_fingerprint",
]
