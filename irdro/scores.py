"""Per-sample scores of a shard directory: one model's mean NLL of every sample, kept beside the shards.

Owns: the scores format (below), its reader and writer, and the check that scores belong to the
shards they sit beside. `tools/score_data.py` writes them; `tools/select_data.py` and
`reweight.signal: excess` (the reference losses r_i of l_i - r_i) read them.
Must not: import torch or deepspeed (numpy only), run a model, or print.

Layout (format_version 1), for scores named NAME of the shard directory DIR::

    DIR/scores/NAME/scores.json  what scored them (see ScoresMeta)
    DIR/scores/NAME/nll.npy      (num_samples,) float64 mean NLL per target token, indexed by sample id
    DIR/scores/NAME/tokens.npy   (num_samples,) int64 target tokens per sample

A sample id is the row index in the ShardDataset (irdro.shards.Sample.sample_id). The scores are
tied to the exact shards by the sha256 of their manifest.json, which lists every shard file's
sha256: re-preparing the data invalidates them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from irdro import __version__, fsio
from irdro.shards import MANIFEST_NAME, DataError, Manifest

FORMAT_VERSION = 1
SCORES_DIR = "scores"
META_NAME = "scores.json"
DEFAULT_NAME = "reference"


class ScoresError(DataError):
    """Missing, broken or stale scores: one line naming the directory and what to do."""


@dataclass(frozen=True, kw_only=True)
class ScoresMeta:
    """``scores.json``.

    Attributes:
        format_version: FORMAT_VERSION.
        name: the scores' name (their folder under DIR/scores/).
        model: the scoring model: {"path": as given, "name": its folder or hub-like name,
            "sha256": hash of its weight files}.
        dtype: fp32 | bf16, the scoring forward's precision.
        num_samples: samples scored (= the shards' num_samples).
        manifest_sha256: sha256 of the shards' manifest.json when scored.
        tokenizer_hash: the shards' tokenizer fingerprint.
        created_by: ``irdro <version>``.
        extra: anything the writer wants to keep (e.g. select_data's parent and rule).
    """

    format_version: int = FORMAT_VERSION
    name: str
    model: dict[str, Any]
    dtype: str
    num_samples: int
    manifest_sha256: str
    tokenizer_hash: str | None = None
    created_by: str = f"irdro {__version__}"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scores:
    """One set of scores, read and checked against its shards.

    Attributes:
        path: DIR/scores/NAME.
        meta: its scores.json.
        nll: (num_samples,) float64 mean NLL by sample id.
        tokens: (num_samples,) int64 target tokens by sample id.
    """

    path: Path
    meta: ScoresMeta
    nll: np.ndarray
    tokens: np.ndarray


def scores_dir(shard_dir: str | Path, name: str = DEFAULT_NAME) -> Path:
    """DIR/scores/NAME."""
    return Path(shard_dir) / SCORES_DIR / name


def manifest_sha256(shard_dir: str | Path) -> str:
    """sha256 of the shards' manifest.json (which holds every shard file's sha256)."""
    return fsio.sha256_file(Path(shard_dir) / MANIFEST_NAME)


def available(shard_dir: str | Path) -> list[str]:
    """Names of the complete score sets of a shard directory, sorted."""
    root = Path(shard_dir) / SCORES_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / META_NAME).is_file())


def read_scores(shard_dir: str | Path, name: str = DEFAULT_NAME, *, key: str = "scores") -> Scores:
    """Read DIR/scores/NAME and check it belongs to the shards in DIR.

    Args:
        shard_dir: the shard directory.
        name: the scores' name.
        key: the caller's name for what needs them (e.g. ``reweight.reference``), for messages.

    Raises:
        ScoresError: missing, unreadable, of another shard directory or of another length.
    """
    shard_dir = Path(shard_dir)
    path = scores_dir(shard_dir, name)
    how = f"score it with: deepspeed --module tools.score_data --data {shard_dir} --model MODEL --name {name}"
    meta_file = path / META_NAME
    if not meta_file.is_file():
        have = available(shard_dir)
        hint = f" (it has: {', '.join(have)})" if have else ""
        raise ScoresError(f"{key}: {shard_dir} has no scores named {name!r}{hint}; {how}")
    try:
        raw = json.loads(meta_file.read_text(encoding="utf-8"))
        meta = ScoresMeta(**raw)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ScoresError(f"{meta_file}: not a valid scores.json ({e}); {how}") from None
    if meta.format_version != FORMAT_VERSION:
        raise ScoresError(f"{meta_file}: format_version {meta.format_version} is not {FORMAT_VERSION}; {how}")
    current = manifest_sha256(shard_dir)
    if meta.manifest_sha256 != current:
        raise ScoresError(
            f"{key}: scores {path} were made for other shards (manifest sha256 {meta.manifest_sha256[:12]}, "
            f"{shard_dir} now has {current[:12]}); {how}"
        )
    try:
        nll = np.load(path / "nll.npy", allow_pickle=False)
        tokens = np.load(path / "tokens.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ScoresError(f"{path}: cannot read nll.npy/tokens.npy ({e}); {how}") from None
    for arr, what in ((nll, "nll.npy"), (tokens, "tokens.npy")):
        if arr.shape != (meta.num_samples,):
            raise ScoresError(f"{path / what}: shape {arr.shape}, expected ({meta.num_samples},); {how}")
    if not np.isfinite(nll).all():
        bad = int(np.flatnonzero(~np.isfinite(nll))[0])
        raise ScoresError(f"{path / 'nll.npy'}: sample {bad} has a non-finite score; {how}")
    return Scores(path=path, meta=meta, nll=nll.astype(np.float64), tokens=tokens.astype(np.int64))


def read_reference(shard_dir: str | Path, name: str = DEFAULT_NAME, *, key: str = "reweight.reference") -> Scores:
    """`read_scores`, and the check that they cover every sample of the shards (the reference losses
    of `reweight.signal: excess`, looked up by sample id).

    Raises:
        ScoresError: as `read_scores`, or scores of another number of samples than the manifest's.
    """
    scores = read_scores(shard_dir, name, key=key)
    num_samples = Manifest.read(shard_dir).num_samples
    if scores.meta.num_samples != num_samples:
        raise ScoresError(
            f"{key}: {scores.path} scores {scores.meta.num_samples} samples, {shard_dir} has {num_samples}; "
            f"score it again with: deepspeed --module tools.score_data --data {shard_dir} --model MODEL --name {name}"
        )
    return scores


def read_reference_table(dirs: list[tuple[str, str | Path]], name: str = DEFAULT_NAME) -> np.ndarray:
    """The reference losses of a mixture by sample id: each source's `read_reference`, concatenated
    in source order (irdro.data.Mixture's ids).

    Args:
        dirs: per source, the label messages name it by (`data.train[1] (bible)`) and its shard directory.
        name: the scores' name (`reweight.reference`).

    Raises:
        ScoresError: as `read_reference`, naming the source.
    """
    tables = []
    for label, shard_dir in dirs:
        key = "reweight.reference" if label == "data.train" else f"reweight.reference of {label}"
        tables.append(read_reference(shard_dir, name, key=key).nll)
    return np.concatenate(tables)


def write_scores(
    shard_dir: str | Path, meta: ScoresMeta, nll: np.ndarray, tokens: np.ndarray, *, overwrite: bool = True
) -> Path:
    """Write DIR/scores/NAME atomically (a staging dir renamed into place). Returns its path."""
    nll, tokens = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.int64)
    if nll.shape != (meta.num_samples,) or tokens.shape != (meta.num_samples,):
        raise ValueError(f"scores of shape {nll.shape}/{tokens.shape} for {meta.num_samples} samples")
    out = scores_dir(shard_dir, meta.name)
    with fsio.staged_dir(out, overwrite=overwrite) as tmp:
        np.save(tmp / "nll.npy", nll)
        np.save(tmp / "tokens.npy", tokens)
        (tmp / META_NAME).write_text(json.dumps(asdict(meta), indent=2) + "\n", encoding="utf-8")
    return out


__all__ = [
    "DEFAULT_NAME",
    "Scores",
    "ScoresError",
    "ScoresMeta",
    "available",
    "manifest_sha256",
    "read_reference",
    "read_reference_table",
    "read_scores",
    "scores_dir",
    "write_scores",
]
