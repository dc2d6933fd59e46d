"""Train mode, dropout and the step window on 2 ZeRO-3 ranks, with a dropout model loaded from a
folder (`from_pretrained` returns it in eval mode).

- Every optimizer step runs in train mode: without eval data, and after a resume (where no step-0
  evaluation happens to switch it back).
- `window: step` (irdro, deferred normaliser by default) trains with one grad forward per
  micro-batch and no scoring forward (the scored path's dropout replay: tests/unit/test_devices.py).
- Kill/resume of that window stays bit-identical with dropout on.
- eval_loss is over the same held-out samples whatever the number of ranks.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ok, save_tiny_opt

from irdro.testing import run_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return save_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))


def test_dropout_model_trains_in_train_mode_and_resumes_exactly(base_recipe, opt_dir, tmp_path, sonnet_shards):
    recipe = dict(max_steps=4, micro_batch_size=2, grad_accum_steps=2, model__path=str(opt_dir))
    full = ok(run_ranks(base_recipe(**recipe), 2, record=True))
    for rank in full.ranks:
        assert rank.modes == [True] * 4, rank.modes  # no eval data: nothing else ever calls train()
        assert [(s, m) for s, m, grad, _ in rank.losses if grad] == [(s, m) for s in range(4) for m in range(2)]
        assert all(grad for *_, grad, _ in rank.losses), "a deferred step ran a no-grad scoring forward"
        assert [r["scoring_pass"] for r in rank.records] == [0] * 4

    # the same run killed after step 2 and resumed (with eval data: it evaluates only at the end)
    out = str(tmp_path / "resumed")
    resumed = {
        **recipe,
        "output_dir": out,
        "data__eval": str(sonnet_shards / "eval"),
        "checkpoint__at_end": True,
    }
    ok(run_ranks(base_recipe(**{**resumed, "max_steps": 2}), 2))
    second = ok(run_ranks(base_recipe(**resumed), 2, record=True))
    for rank in second.ranks:
        assert rank.modes == [True, True], rank.modes
    assert [r["step"] for r in second.records] == [3, 4]
    diff = max(float((full.state_dict[k] - second.state_dict[k]).abs().max()) for k in full.state_dict)
    print(f"\nmax |dparam| resumed vs uninterrupted, dropout 0.1: {diff:.3e}")
    assert diff == 0.0


def test_eval_loss_does_not_depend_on_the_number_of_ranks(base_recipe, sonnet_shards):
    recipe = dict(
        max_steps=1,
        micro_batch_size=2,
        data__eval=str(sonnet_shards / "eval"),
        eval__max_samples=7,
        eval__micro_batch_size=3,
    )
    one = ok(run_ranks(base_recipe(**recipe), 1)).records[0]["eval_loss"]
    two = ok(run_ranks(base_recipe(**{**recipe, "micro_batch_size": 1}), 2)).records[0]["eval_loss"]
    print(f"\neval_loss 1 rank {one:.8f}, 2 ranks {two:.8f}")
    assert abs(one - two) <= 1e-6
    assert torch.isfinite(torch.tensor(one))
