"""Token shards on disk and the deterministic order in which training reads them.

Owns:
  * the shard directory format (``manifest.json`` + ``shard_NNNNN.{tokens,index,mask}.npy``,
    format_version 1) and its writer (:class:`ShardWriter`) and reader (:class:`ShardDataset`);
  * text preparation (:func:`prepare_text`, behind ``tools/prepare_data.py``);
  * the seeded, index-based global sample order (:class:`GlobalOrder`,
    :func:`sample_positions`) that makes resume exact;
  * batching of samples into padded tensors (:func:`collate`).

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
import glob
import hashlib
import json
import logging
import operator
import os
import shutil
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irdro import __version__

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")

_REQUIRED_KEYS = ("format_version", "dtype", "vocab_size", "num_samples", "num_tokens", "shards")
_TOKENIZE_BATCH_DOCS = 256
_TOKENIZE_BATCH_CHARS = 1 << 20


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
        shards = self._open()
        s = int(np.searchsorted(self._offsets, idx, side="right")) - 1
        shard = shards[s]
        start, end, doc_id, chunk_id = (int(v) for v in shard.index[idx - int(self._offsets[s])])
        input_ids = np.array(shard.tokens[start:end], dtype=np.int64)
        if shard.mask is None:
            labels = input_ids.copy()
        else:
            supervised = _unpack_range(shard.mask, start, end)
            labels = np.where(supervised, input_ids, IGNORE_INDEX)
        return Sample(idx, input_ids, labels, doc_id, chunk_id)

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


def _sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
        "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.int64),
    }


# --------------------------------------------------------------------------- writing


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise DataError(
            f"output {output} is not empty; pass --overwrite (overwrite=True) to replace it"
        )


def _install_dir(staging: Path, output: Path, overwrite: bool) -> None:
    """Move a complete ``staging`` dir to ``output``; an old output is removed only afterwards."""
    _check_output(output, overwrite)
    old = None
    if output.is_dir():
        if any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(output, old)
        else:
            output.rmdir()
    try:
        os.rename(staging, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_staging(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the final dir should be shareable
    return staging


class ShardWriter:
    """Stream samples into a new shard directory.

    Files go to a temporary directory next to ``output_dir`` that :meth:`finalize` renames into
    place, so readers never see a half-written dataset and a failed run leaves an existing
    output untouched. Samples never straddle shards; a shard is closed before it would exceed
    ``shard_tokens`` (a single longer sample gets a shard of its own).

    Use as a context manager: leaving the block without :meth:`finalize` calls :meth:`abort`.

    The manifest has: format_version, format, tokenizer {name, hash}, vocab_size, eos_token_id,
    pad_token_id, dtype, seq_len, num_docs (distinct doc_ids written), num_samples, num_tokens,
    num_skipped {reason: documents}, shards [{name, num_samples, num_tokens, sha256 {file: hex}}],
    created_by.
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

        Raises:
            DataError: output_dir is a file, or non-empty without overwrite.
        """
        if not 0 < vocab_size <= 2**32:
            raise ValueError(f"vocab_size must be in (0, 2**32], got {vocab_size}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        _check_output(self.output_dir, overwrite)
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
            "num_skipped": {"empty": 0, "too_short": 0},
            "shards": [],
            "created_by": f"irdro {__version__}",
        }
        self._num_docs = 0
        self._last_doc_id: int | None = None
        self._tmp: Path | None = _make_staging(self.output_dir)
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
        (self._tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            _install_dir(self._tmp, self.output_dir, self.overwrite)
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


# --------------------------------------------------------------------------- text preparation


def split_into_chunks(tokens: list[int] | np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Cut a token sequence into consecutive chunks of at most ``seq_len`` tokens.

    A last chunk shorter than 2 tokens is dropped: after the shift it supervises nothing.

    Args:
        tokens: (L,) token ids.
        seq_len: maximum chunk length (>= 2).

    Returns:
        ceil(L / seq_len) (or one fewer) arrays, each (<= seq_len,) int64.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    chunks = [arr[i : i + seq_len] for i in range(0, len(arr), seq_len)]
    if chunks and len(chunks[-1]) < 2:
        chunks.pop()
    return chunks


def resolve_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand files, directories (recursive) and globs into a sorted, de-duplicated file list.

    Args:
        inputs: paths or glob patterns; directories contribute their .txt/.jsonl/.json files.

    Raises:
        DataError: an input matches nothing or has an unsupported suffix.
    """
    files: dict[Path, None] = {}
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"input directory {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"input {spec} matches no file; check the path or quote the glob")
        for p in found:
            if p.suffix not in TEXT_SUFFIXES:
                raise DataError(
                    f"input {p}: unsupported file type '{p.suffix}' for --format text "
                    f"(use {', '.join(TEXT_SUFFIXES)})"
                )
            files.setdefault(p, None)
    return list(files)


def iter_text_documents(
    files: Sequence[Path], text_field: str = "text"
) -> Iterator[tuple[str, str]]:
    """Stream documents: a .txt file is one, a .jsonl line is one, a .json list item is one.

    Blank .jsonl lines are not documents.

    Yields:
        (location, text) with location like ``file:line`` for error messages.

    Raises:
        DataError: malformed JSON (naming file:line), a record without ``text_field``, or a
            non-string text.
    """
    for file in files:
        try:
            if file.suffix == ".txt":
                yield str(file), file.read_text(encoding="utf-8")
            elif file.suffix == ".jsonl":
                with open(file, encoding="utf-8") as f:
                    for lineno, line in enumerate(f, start=1):
                        if not line.strip():
                            continue
                        where = f"{file}:{lineno}"
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(
                                f"{where}: malformed JSON ({e.msg}); fix or remove the line"
                            ) from None
                        yield where, _record_text(record, text_field, where)
            else:
                try:
                    records = json.loads(file.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg})") from None
                if not isinstance(records, list):
                    raise DataError(
                        f"{file}: a .json input must be a list of records; use .jsonl for one "
                        "record per line"
                    )
                for i, record in enumerate(records):
                    where = f"{file}[record {i}]"
                    yield where, _record_text(record, text_field, where)
        except UnicodeDecodeError as e:
            raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: record has no field '{field}' (fields: {fields}); pass --text-field"
        )
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{field}' is {type(text).__name__}, expected a string")
    return text


def is_eval_document(doc_id: int, seed: int, eval_fraction: float) -> bool:
    """Deterministic, platform-independent train/eval assignment of document ``doc_id``."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < eval_fraction


def prepare_text(
    inputs: list[str],
    tokenizer_dir: str,
    output: str,
    *,
    seq_len: int,
    text_field: str = "text",
    eval_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    shard_tokens: int = 2**26,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise text documents into shard directories (the library behind prepare_data.py).

    Each document is tokenised with ``add_special_tokens=False``, gets EOS appended, and is cut
    into samples of at most ``seq_len`` tokens (chunk_id 0, 1, ...). doc_id is the document's
    index in the input stream, so it is unique across train and eval. Empty (whitespace-only)
    documents are counted as ``num_skipped["empty"]``; documents that leave no sample of >= 2
    tokens as ``num_skipped["too_short"]``.

    Args:
        inputs: files, directories or globs of .txt / .jsonl / .json files.
        tokenizer_dir: directory for ``AutoTokenizer.from_pretrained``.
        output: the shard directory, or with eval_fraction > 0 the parent of ``train/`` and
            ``eval/`` shard directories.
        seq_len: maximum tokens per sample (>= 2).
        text_field: JSON field holding the text.
        eval_fraction: expected fraction of documents sent to eval, in [0, 1).
        seed: seed of the train/eval assignment.
        overwrite: replace a non-empty output (only after the new one is complete).
        shard_tokens: target tokens per shard file.
        progress: show a tqdm bar over documents.

    Returns:
        The manifest if eval_fraction == 0, else ``{"train": manifest, "eval": manifest}``.

    Raises:
        DataError: bad arguments or inputs, a non-empty output without overwrite, or an empty
            split.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    if seq_len < 2:
        raise DataError(f"--seq-len must be >= 2, got {seq_len}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    out = Path(output)
    files = resolve_inputs(inputs)
    _check_output(out, overwrite)
    resolved_out = out.resolve()
    for f in files:
        if overwrite and resolved_out in f.resolve().parents:
            raise DataError(f"input {f} is inside --output {out}, which --overwrite would delete")

    if not Path(tokenizer_dir).is_dir():
        raise DataError(
            f"tokenizer directory {tokenizer_dir} does not exist; for GPT-2 run "
            "python tools/fetch_assets.py gpt2-tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load a tokenizer from {tokenizer_dir}: {first}") from None
    name = Path(tokenizer_dir).resolve().name or str(tokenizer.name_or_path)
    eos = tokenizer.eos_token_id
    if eos is None:
        logger.warning("tokenizer %s has no EOS token; documents are not terminated", name)
    meta = {
        "vocab_size": len(tokenizer),
        "tokenizer_name": name,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer),
        "seq_len": seq_len,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id,
        "format": "text",
        "shard_tokens": shard_tokens,
    }

    split = eval_fraction > 0.0
    staging = _make_staging(out) if split else None
    writers: dict[str, ShardWriter] = {}
    try:
        if split:
            writers = {s: ShardWriter(staging / s, **meta) for s in ("train", "eval")}
        else:
            writers = {"train": ShardWriter(out, overwrite=overwrite, **meta)}
        with tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
            batch: list[tuple[int, str, ShardWriter]] = []
            chars = 0
            for doc_id, (_, text) in enumerate(iter_text_documents(files, text_field)):
                target = writers[
                    "eval" if is_eval_document(doc_id, seed, eval_fraction) else "train"
                ]
                if not text.strip():
                    target.skip("empty")
                    bar.update(1)
                    continue
                batch.append((doc_id, text, target))
                chars += len(text)
                if len(batch) >= _TOKENIZE_BATCH_DOCS or chars >= _TOKENIZE_BATCH_CHARS:
                    _write_batch(batch, tokenizer, seq_len, eos)
                    bar.update(len(batch))
                    batch, chars = [], 0
            if batch:
                _write_batch(batch, tokenizer, seq_len, eos)
                bar.update(len(batch))
        for split_name, writer in writers.items():
            if writer.num_samples == 0:
                raise DataError(
                    f"the {split_name} split would be empty ({len(files)} input files, "
                    f"skipped {writer.num_skipped}); "
                    + ("adjust --eval-fraction" if split else "check --input and --text-field")
                )
        manifests = {s: w.finalize() for s, w in writers.items()}
        if split:
            _install_dir(staging, out, overwrite)
            staging = None
            return manifests
        return manifests["train"]
    finally:
        for writer in writers.values():
            writer.abort()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _write_batch(
    batch: list[tuple[int, str, ShardWriter]], tokenizer: Any, seq_len: int, eos: int | None
) -> None:
    """Tokenise (doc_id, text, writer) documents together and write their chunks."""
    encoded = tokenizer(
        [text for _, text, _ in batch],
        add_special_tokens=False,
        return_attention_mask=False,
        verbose=False,
    )["input_ids"]
    for (doc_id, _, writer), ids in zip(batch, encoded, strict=True):
        if eos is not None:
            ids = [*ids, eos]
        chunks = split_into_chunks(ids, seq_len)
        if not chunks:
            writer.skip("too_short")
        for chunk_id, chunk in enumerate(chunks):
            writer.add(chunk, doc_id, chunk_id)


def dataset_summary(manifest: dict[str, Any]) -> str:
    """One line describing a manifest, for logs and CLIs."""
    skipped = ", ".join(f"{k}={v}" for k, v in manifest["num_skipped"].items())
    return (
        f"{manifest['num_docs']} docs, {manifest['num_samples']} samples, "
        f"{manifest['num_tokens']} tokens, {len(manifest['shards'])} shards "
        f"(skipped: {skipped or 'none'})"
    )


__all__ = [
    "MANIFEST_NAME",
    "DataError",
    "GlobalOrder",
    "Sample",
    "ShardDataset",
    "ShardWriter",
    "collate",
    "dataset_summary",
    "is_eval_document",
    "iter_text_documents",
    "prepare_text",
    "resolve_inputs",
    "sample_positions",
    "split_into_chunks",
    "tokenizer_fingerprint",
]
