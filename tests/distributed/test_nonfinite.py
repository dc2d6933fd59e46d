"""A non-finite loss on one rank makes every rank skip the step together; repeated ones abort."""

from __future__ import annotations

import pytest

from irdro.testing import run_ranks

pytestmark = pytest.mark.distributed


def test_nan_on_one_rank_skips_the_step_on_both(base_recipe):
    one_step = run_ranks(base_recipe(micro_batch_size=2, max_steps=1), 2)
    skipped = run_ranks(base_recipe(micro_batch_size=2, max_steps=2), 2, nan_at=[(1, 1)])
    for rank in skipped.ranks:
        assert rank.returncode == 0, rank.log[-2000:]
        assert [r["skipped"] for r in rank.records] == [0, 1]  # every rank agrees
    # the skipped step applied nothing: parameters equal those after the first step, bit for bit
    a, b = one_step.state_dict, skipped.state_dict
    assert all(float((a[k] - b[k]).abs().max()) == 0.0 for k in a)


def test_consecutive_non_finite_steps_abort_on_every_rank(base_recipe):
    recipe = base_recipe(micro_batch_size=2, max_steps=6, max_consecutive_skips=2)
    run = run_ranks(recipe, 2, nan_at=[(s, 1) for s in range(6)], timeout=180)
    for rank in run.ranks:
        assert rank.returncode == 1
        assert "aborting: 2 consecutive steps had a non-finite loss" in rank.error
