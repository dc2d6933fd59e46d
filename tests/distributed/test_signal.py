"""`reweight.signal: excess`: the weights of l_i - r_i, r_i a reference model's score of sample i.

Softmax is shift-invariant, so IR-DRO on the excess over a constant reference trains exactly as
IR-DRO on the loss; a varying reference changes the weights (the control). The deferred normaliser
exponentiates the excess too: it trains as the scored window does. Missing scores stop every rank
at setup with one line naming the shard directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import max_abs_diff
from helpers import trained as train

from irdro.scores import ScoresMeta, manifest_sha256, write_scores
from irdro.shards import Manifest
from irdro.testing import run_ranks

pytestmark = pytest.mark.distributed
TOL_SHIFT = 1e-7  # constant reference: the same softmax inputs up to the shift
TOL = 5e-7  # deferred vs scored: different fp32 rounding of the weights, a few ulps of an O(1) parameter


def scored_copy(shards: Path, dest: Path, **references: np.ndarray) -> Path:
    """A copy of the shard dir `shards` with score sets `name=(num_samples,) nll`."""
    shutil.copytree(shards, dest)
    for name, nll in references.items():
        meta = ScoresMeta(
            name=name, model={"path": "test"}, dtype="fp32", num_samples=len(nll), manifest_sha256=manifest_sha256(dest)
        )
        write_scores(dest, meta, nll, np.ones(len(nll)))
    return dest


@pytest.mark.slow  # 4 trainings, ~60 s
def test_excess_over_a_constant_is_the_loss_and_deferred_equals_scored(base_recipe, sonnet_shards, tmp_path):
    n = Manifest.read(sonnet_shards / "train").num_samples
    varied = np.random.default_rng(0).uniform(0.0, 4.0, n)
    data = str(scored_copy(sonnet_shards / "train", tmp_path / "train", const=np.full(n, 3.0), varied=varied))

    def recipe(reference: str | None = None, **kw) -> dict:
        excess = {"reweight__signal": "excess", "reweight__reference": reference} if reference else {}
        return base_recipe(micro_batch_size=1, grad_accum_steps=2, data__train=data, **excess, **kw)

    loss = train(recipe(), 2)
    const = train(recipe("const"), 2)
    diff = max_abs_diff(loss.state_dict, const.state_dict)
    print(f"\nmax |dparam| irdro excess (constant reference) vs loss: {diff:.3e}")
    assert diff <= TOL_SHIFT
    assert [r["mean_excess"] for r in const.records] == pytest.approx([r["loss"] - 3.0 for r in loss.records], abs=1e-6)
    assert [r["weighted_loss"] for r in const.records] == pytest.approx([r["weighted_loss"] for r in loss.records])

    dumped = recipe("varied", log__samples_every=1)
    deferred = train(dumped, 2)
    scored = train(recipe("varied", reweight__scoring_pass="always"), 2)
    assert [r["scoring_pass"] for r in deferred.records] == [0, 0, 0]
    assert [r["scoring_pass"] for r in scored.records] == [1, 1, 1]
    diff = max_abs_diff(deferred.state_dict, scored.state_dict)
    print(f"max |dparam| irdro excess (varied reference) deferred vs scored: {diff:.3e}")
    assert diff <= TOL
    gap = max_abs_diff(loss.state_dict, deferred.state_dict)
    print(f"max |dparam| irdro excess (varied reference) vs loss (control): {gap:.3e}")
    assert gap > 100 * TOL
    # the dumps carry r_i (what the weights saw is loss - reference), the log the window's mean excess
    rows = [
        json.loads(x) for x in (Path(dumped["output_dir"]) / "samples" / "step_00000001.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(r["reference"] == pytest.approx(varied[r["sample_id"]], rel=1e-6) for r in rows)
    mean_excess = np.mean([r["loss"] - r["reference"] for r in rows])
    assert deferred.records[0]["mean_excess"] == pytest.approx(mean_excess, abs=1e-6)


def test_missing_reference_scores_stop_every_rank_at_setup(base_recipe, sonnet_shards, tmp_path):
    data = str(scored_copy(sonnet_shards / "train", tmp_path / "train"))
    run = run_ranks(base_recipe(micro_batch_size=2, data__train=data, reweight__signal="excess"), 2)
    for rank in run.ranks:
        assert rank.returncode != 0 and rank.records == []
        assert rank.error.startswith(f"ScoresError: reweight.reference: {data} has no scores named 'reference'")
        assert "\n" not in rank.error and f"tools.score_data --data {data}" in rank.error
    assert run.state_dict is None
