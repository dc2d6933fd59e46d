"""The `step` window with a deferred normaliser (`reweight.scoring_pass: auto`) trains exactly as the
scored window (`always`): same parameters after 3 SGD steps (<= 1e-6), same logged statistics and
per-sample weights, on 1 and 2 ranks, GA 1 and 4, and when a later micro-batch overflows the
deferred exponents (that step is discarded and scored, and says so in `scoring_pass`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import trained as train

pytestmark = pytest.mark.distributed
TOL = 1e-6
STATS = ("loss", "weighted_loss", "ess", "max_weight")


def sample_rows(recipe: dict) -> list[dict]:
    out = []
    for f in sorted((Path(recipe["output_dir"]) / "samples").glob("*.jsonl")):
        out += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return out


def assert_same_training(deferred: dict, scored: dict, ws: int, **kw) -> list[dict]:
    """Train both recipes on `ws` ranks; parameters, statistics and sample dumps must agree."""
    a, b = train(deferred, ws, **kw), train(scored, ws, **kw)
    diff = max(float((a.state_dict[k] - b.state_dict[k]).abs().max()) for k in a.state_dict)
    print(f"\nmax |dparam| deferred vs scored: {diff:.3e}")
    assert diff <= TOL
    for x, y in zip(a.records, b.records, strict=True):
        for key in STATS:
            assert abs(x[key] - y[key]) <= 1e-6 * max(1.0, abs(y[key])), (x["step"], key, x[key], y[key])
    rows_a, rows_b = sample_rows(deferred), sample_rows(scored)
    assert len(rows_a) == len(rows_b) > 0
    for x, y in zip(rows_a, rows_b, strict=True):
        assert (x["step"], x["sample_id"], x["rank"]) == (y["step"], y["sample_id"], y["rank"])
        assert abs(x["loss"] - y["loss"]) <= 1e-6 and abs(x["weight"] - y["weight"]) <= 1e-6
    assert all(r["scoring_pass"] == 1 for r in b.records)
    return a.records


@pytest.mark.parametrize(
    "ws, micro, ga",
    [(1, 4, 1), (1, 1, 4), pytest.param(2, 2, 1, marks=pytest.mark.slow), (2, 1, 4)],
    ids=["ws1-ga1", "ws1-ga4", "ws2-ga1", "ws2-ga4"],
)
def test_deferred_equals_scored(base_recipe, ws, micro, ga):
    common = dict(micro_batch_size=micro, grad_accum_steps=ga, log__samples_every=1)
    records = assert_same_training(base_recipe(**common), base_recipe(**common, reweight__scoring_pass="always"), ws)
    assert [r["scoring_pass"] for r in records] == [0, 0, 0]  # no scoring pass at all


def test_overflow_is_discarded_and_scored(base_recipe):
    """Step 1, micro-batch 2 of 4: losses + 100 with lam 0.5 pass the exponent bound (60 x lam)."""
    common = dict(micro_batch_size=1, grad_accum_steps=4, log__samples_every=1)
    kw = dict(add_at=[(1, 2, 100.0)])
    records = assert_same_training(
        base_recipe(**common), base_recipe(**common, reweight__scoring_pass="always"), 2, **kw
    )
    assert [r["scoring_pass"] for r in records] == [0, 1, 0]
    assert [r["skipped"] for r in records] == [0, 0, 0]  # the discarded attempt is not a skipped step
    assert records[1]["ess"] < 0.26  # the shifted micro-batch (2 of 8 samples) took all the weight
