"""Selecting samples by a score band: a new shard directory holding the parent's samples whose score
lies in a band of percentiles (tools/select_data.py).

Owns: the band rule (`Rule`: keep a:b, or drop the top/bottom fractions), which sample ids it keeps
(`band`), and writing the selection (`select_shards`): the kept samples' shards with the parent's
tokenizer info, `parent_ids.npy` (the parent's sample id of every row), the manifest's `selection`
record, and the kept samples' scores re-indexed under OUT/scores/NAME.
Must not: import torch, compute scores (irdro.scoring), or print.

Band. The n scores are ranked low -> high, ties broken by sample id (so the selection is
deterministic); `keep a:b` keeps ranks [floor(a*n), floor(b*n)). `drop-bottom F` is a = F,
`drop-top G` is b = 1 - G.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from irdro import fsio
from irdro.scores import ScoresMeta, manifest_sha256, read_scores, write_scores
from irdro.shards import DataError, Manifest, ShardDataset, ShardWriter

PARENT_IDS = "parent_ids.npy"
# the parent's optional manifest keys the selection keeps (counters of the parent's preparation are not
# the selection's; its own selection record is replaced)
_INHERITED = ("long_docs", "prompt_template", "chat_template_sha256", "chat_template", "train_on_prompt")


@dataclass(frozen=True)
class Rule:
    """A band of score percentiles, low -> high: keep ranks [floor(lo*n), floor(hi*n)).

    Attributes:
        lo: lower edge in [0, 1).
        hi: upper edge in (lo, 1].
        text: the rule as given (recorded in the manifest).
    """

    lo: float
    hi: float
    text: str


def parse_rule(keep: str | None, drop_top: float | None, drop_bottom: float | None) -> Rule:
    """The band of `--keep A:B`, or of `--drop-top G` and/or `--drop-bottom F` (exactly one kind).

    Raises:
        DataError: none or both kinds, a malformed or out-of-range fraction, or an empty band.
    """
    if keep is not None and (drop_top is not None or drop_bottom is not None):
        raise DataError("give either --keep A:B or --drop-top/--drop-bottom, not both")
    if keep is None and drop_top is None and drop_bottom is None:
        raise DataError("give a rule: --keep A:B (e.g. 0.25:0.75), --drop-top F and/or --drop-bottom F")
    if keep is not None:
        try:
            lo, hi = (float(x) for x in keep.split(":"))
        except ValueError:
            raise DataError(f"--keep {keep}: expected A:B with 0 <= A < B <= 1, e.g. 0.25:0.75") from None
        if not (0.0 <= lo < hi <= 1.0):
            raise DataError(f"--keep {keep}: expected A:B with 0 <= A < B <= 1, e.g. 0.25:0.75")
        return Rule(lo, hi, f"keep {keep}")
    for flag, v in (("--drop-top", drop_top), ("--drop-bottom", drop_bottom)):
        if v is not None and not (0.0 <= v < 1.0 and math.isfinite(v)):
            raise DataError(f"{flag} {v}: expected a fraction in [0, 1)")
    lo, hi = drop_bottom or 0.0, 1.0 - (drop_top or 0.0)
    if lo >= hi:
        raise DataError(f"--drop-bottom {drop_bottom} and --drop-top {drop_top} drop everything; keep their sum < 1")
    parts = [
        f"drop-top {drop_top}" if drop_top is not None else "",
        f"drop-bottom {drop_bottom}" if drop_bottom else "",
    ]
    return Rule(lo, hi, ", ".join(p for p in parts if p))


def band(scores: np.ndarray, rule: Rule) -> np.ndarray:
    """Sorted sample ids whose rank (scores low -> high, ties by id) is in the rule's band.

    Args:
        scores: (n,) one score per sample id.

    Returns:
        (k,) int64 sample ids, ascending.

    Raises:
        DataError: the band holds no sample.
    """
    n = len(scores)
    order = np.lexsort((np.arange(n), scores))  # by score, then by id
    lo, hi = math.floor(rule.lo * n), math.floor(rule.hi * n)
    if hi <= lo:
        raise DataError(f"{rule.text}: the band [{rule.lo}, {rule.hi}) of {n} samples holds none; widen it")
    return np.sort(order[lo:hi]).astype(np.int64)


@dataclass(frozen=True)
class Selection:
    """What `select_shards` wrote.

    Attributes:
        output: the new shard directory.
        kept: (k,) int64 parent sample ids, in the order of the new rows.
        scores: (n,) float64 the parent's scores.
        thresholds: (lowest, highest) score kept.
        manifest: the new manifest.
    """

    output: Path
    kept: np.ndarray
    scores: np.ndarray
    thresholds: tuple[float, float]
    manifest: Manifest


def select_shards(
    data_dir: str | Path, scores_name: str, rule: Rule, output: str | Path, *, overwrite: bool = False
) -> Selection:
    """Write the samples of `data_dir` in the score band of `rule` as a shard directory `output`.

    Written to a staging dir beside `output` and renamed into place: the shards (tokens, masks,
    doc_id, chunk_id copied; the parent's tokenizer, vocab, seq_len, format and templates),
    `parent_ids.npy`, the manifest's `selection` record and OUT/scores/NAME (the kept samples'
    scores by their new ids, tied to OUT's manifest).

    Raises:
        DataError: a bad shard dir, missing or stale scores, an empty band, or an output that exists
            without `overwrite`.
    """
    parent = ShardDataset(data_dir)
    scores = read_scores(data_dir, scores_name, key="--scores")
    kept = band(scores.nll, rule)
    output = Path(output)
    if output.resolve() == parent.path.resolve():
        raise DataError(f"--output {output} is the --data directory; choose another")
    m = parent.manifest
    meta = {k: getattr(m, k) for k in _INHERITED if getattr(m, k) is not None}
    ids_blob = kept.astype("<i8")
    try:
        fsio.check_output_dir(output, overwrite)
        with fsio.staged_dir(output, overwrite=overwrite) as tmp:
            np.save(tmp / PARENT_IDS, ids_blob)
            meta["selection"] = {
                "parent": str(parent.path.resolve()),
                "parent_manifest_sha256": manifest_sha256(parent.path),
                "scores": scores_name,
                "rule": rule.text,
                "band": [rule.lo, rule.hi],
                "parent_ids": PARENT_IDS,
                "parent_ids_sha256": fsio.sha256_file(tmp / PARENT_IDS),
            }
            shards = tmp / "shards.tmp"
            with ShardWriter(
                shards,
                vocab_size=m.vocab_size,
                tokenizer_name=m.tokenizer.name or "",
                tokenizer_hash=m.tokenizer.hash or "",
                seq_len=m.seq_len if m.seq_len is not None else max(parent.describe(0)["num_tokens"], 1),
                eos_token_id=m.eos_token_id,
                pad_token_id=m.pad_token_id,
                format=m.format,
                meta=meta,
            ) as writer:
                for i in kept.tolist():
                    s = parent[i]
                    writer.add(s.input_ids, s.doc_id, s.chunk_id, mask=(s.labels != -100) if m.has_mask else None)
                manifest = writer.finalize()
            for f in shards.iterdir():
                f.rename(tmp / f.name)
            shards.rmdir()
            sub = ScoresMeta(
                **{
                    **dataclasses.asdict(scores.meta),
                    "num_samples": len(kept),
                    "manifest_sha256": manifest_sha256(tmp),
                    "extra": {**scores.meta.extra, "selected_from": meta["selection"]},
                }
            )
            write_scores(tmp, sub, scores.nll[kept], scores.tokens[kept])
    except fsio.OutputError as e:
        raise DataError(str(e)) from None
    chosen = scores.nll[kept]
    return Selection(output, kept, scores.nll, (float(chosen.min()), float(chosen.max())), manifest)


__all__ = ["PARENT_IDS", "Rule", "Selection", "band", "parse_rule", "select_shards"]
