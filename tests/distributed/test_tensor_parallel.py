"""Tensor parallelism (DeepSpeed AutoTP, `parallel.tensor_parallel`) on CPU gloo ranks.

TP 2 must train exactly like TP 1 on the same global batch: the same per-sample losses on every
rank of a TP group (the LM head is gathered, so logits are full), the same weights after 3 SGD
steps (fp32, gathered over TP and ZeRO), and an export whose logits equal the training engine's.
"""

from __future__ import annotations

import pytest
import torch
from helpers import max_abs_diff, ok, save_tiny_model

from irdro.testing import run_ranks

pytestmark = pytest.mark.distributed
TOL = 1e-5


def assert_same_losses(got, want) -> None:
    """Two ranks' recorded forwards (step, micro, grad_enabled, per-sample losses) agree to TOL."""
    a = {(s, m, g): losses for s, m, g, losses in got.losses}
    b = {(s, m, g): losses for s, m, g, losses in want.losses}
    assert a.keys() == b.keys() and a
    worst = max(abs(x - y) for k in b for x, y in zip(a[k], b[k], strict=True))
    assert worst <= TOL, worst


@pytest.mark.parametrize(
    "ds_config", ["ds_configs/zero3_fp32.json", "ds_configs/zero2_fp32.json"], ids=["zero3", "zero2"]
)
def test_tp2_equals_tp1(base_recipe, ds_config):
    """2 ranks as one TP group (DP 1) == 1 rank: per-sample losses and weights after 3 SGD steps."""
    kw = dict(micro_batch_size=4, ds_config=ds_config)
    if "zero2" in ds_config:
        kw["ds_overrides"] = {}  # no stage-3 keys
    ref = ok(run_ranks(base_recipe(**kw), 1, record=True))
    tp = ok(run_ranks(base_recipe(parallel__tensor_parallel=2, **kw), 2, record=True))
    for rank in tp.ranks:  # both TP ranks hold the whole batch and the full logits
        assert_same_losses(rank, ref.ranks[0])
    diff = max_abs_diff(ref.state_dict, tp.state_dict)
    print(f"\nmax |dparam| TP2 vs TP1 ({ds_config}): {diff:.3e}")
    assert diff <= TOL
    # Negative control: 3 SGD steps moved the weights far more than the tolerance.
    init = ok(run_ranks(base_recipe(max_steps=1, optim__lr=0.0, **kw), 1)).state_dict
    assert max_abs_diff(init, ref.state_dict) > 100 * TOL


def test_tp2_dp2_equals_tp1_dp2(base_recipe):
    """4 ranks = DP 2 x TP 2 == 2 ranks of DP: the weight gather and the sampler use the DP group
    only (gathering over the world would count each sample twice and change the IR-DRO weights)."""
    ref = ok(run_ranks(base_recipe(micro_batch_size=2), 2, record=True))
    tp = ok(run_ranks(base_recipe(micro_batch_size=2, parallel__tensor_parallel=2), 4, record=True))
    # global rank r is DP rank r // 2 of TP group r // 2: ranks 0, 1 see DP rank 0's samples, 2, 3 DP rank 1's
    for r, rank in enumerate(tp.ranks):
        assert_same_losses(rank, ref.ranks[r // 2])
    for a, b in zip(ref.records, tp.records, strict=True):
        assert abs(a["weighted_loss"] - b["weighted_loss"]) <= TOL
    diff = max_abs_diff(ref.state_dict, tp.state_dict)
    print(f"\nmax |dparam| DP2xTP2 vs DP2: {diff:.3e}")
    assert diff <= TOL


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tp_export_matches_training_logits(base_recipe, tmp_path, tied):
    """A TP 2 checkpoint exports to one HF folder (full weights) whose logits equal the engine's;
    a tied LM head stays replicated and tied."""
    from transformers import AutoModelForCausalLM

    from irdro.export import export_hf, probe_tokens, verify

    model_dir = save_tiny_model(tmp_path / "model", tie_word_embeddings=tied)
    recipe = base_recipe(
        micro_batch_size=4,
        max_steps=2,
        parallel__tensor_parallel=2,
        checkpoint__at_end=True,
        model__path=str(model_dir),
    )
    run = ok(run_ranks(recipe, 2, probe=True))
    out = tmp_path / "hf"
    export_hf(recipe["output_dir"], out, dtype="fp32", progress=False)
    assert verify(recipe["output_dir"], out, dtype="fp32") <= TOL
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tuple(model.lm_head.weight.shape) == (model.config.vocab_size, model.config.hidden_size)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        logits = model.eval()(probe_tokens(model.config.vocab_size)).logits
    diff = float((logits - run.probe_logits).abs().max())
    print(f"\nTP2 export ({'tied' if tied else 'untied'}): max |logit diff| exported vs training engine = {diff:.3e}")
    assert diff <= TOL


def test_tp_resume_equals_uninterrupted_and_refuses_another_tp(base_recipe, tmp_path):
    """A TP 2 run resumed from its step-2 checkpoint ends where the uninterrupted run does; the same
    checkpoint on TP 1 is refused with the key to change (DeepSpeed cannot re-shard it)."""
    import shutil

    recipe = base_recipe(micro_batch_size=4, max_steps=3, checkpoint__every=2, parallel__tensor_parallel=2)
    full = ok(run_ranks(recipe, 2))
    again = dict(recipe, output_dir=str(tmp_path / "resumed"))
    shutil.copytree(recipe["output_dir"], again["output_dir"])
    resumed = ok(run_ranks(again, 2))
    assert [r["step"] for r in resumed.records] == [3]
    diff = max_abs_diff(full.state_dict, resumed.state_dict)
    print(f"\nTP2 resumed vs uninterrupted: max |dparam| = {diff:.3e}")
    assert diff <= TOL
    other = dict(recipe, output_dir=str(tmp_path / "tp1"), parallel={"tensor_parallel": 1})
    shutil.copytree(recipe["output_dir"], other["output_dir"])
    refused = run_ranks(other, 1)
    assert refused.ranks[0].returncode == 1
    layouts = "1 data-parallel x 1 sequence-parallel x 2 tensor-parallel ranks, this launch has 1 x 1 x 1"
    assert layouts in refused.ranks[0].error
