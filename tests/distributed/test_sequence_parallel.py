"""Sequence parallelism (DeepSpeed Ulysses) keeps the distributed contract: splitting every sample's
tokens over SP ranks changes nothing a user can see. Prompt-masked ChatterBot pairs of unequal
lengths (labels -100 on the prompt), ZeRO-3, fp32, SGD, IR-DRO window `step`; each comparison is
against the same global batch without SP: per-sample losses, weights (and MidRanking bands),
parameters after 3 steps. Negative controls show that the comparisons can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import max_abs_diff
from helpers import trained as train

pytestmark = pytest.mark.distributed
TOL = 1e-5


def dumps(recipe: dict) -> list[dict]:
    """Every per-sample row (step, sample_id, loss, weight) of a run's samples/ dumps, in order."""
    rows = []
    for f in sorted((Path(recipe["output_dir"]) / "samples").glob("step_*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["step"], r["sample_id"]))


def compare_windows(a: dict, b: dict) -> tuple[float, float]:
    """Max |d loss| and |d weight| over the samples of two runs; the same samples and the same
    nonzero-weight set (the MidRanking band) in both."""
    ra, rb = dumps(a), dumps(b)
    assert ra and [(r["step"], r["sample_id"]) for r in ra] == [(r["step"], r["sample_id"]) for r in rb]
    assert [r["weight"] > 0 for r in ra] == [r["weight"] > 0 for r in rb]
    dl = max(abs(x["loss"] - y["loss"]) for x, y in zip(ra, rb, strict=True))
    dw = max(abs(x["weight"] - y["weight"]) for x, y in zip(ra, rb, strict=True))
    return dl, dw


@pytest.fixture
def sp_recipe(base_recipe, alpaca_split):
    def make(**kw) -> dict:
        return base_recipe(
            data={"train": str(alpaca_split / "train"), "eval": str(alpaca_split / "eval")},
            eval={"max_samples": 8, "every": 0},
            log={"tensorboard": False, "progress": False, "samples_every": 1},
            **kw,
        )

    return make


@pytest.mark.slow
def test_sp2_equals_sp1_and_resumes_and_exports(sp_recipe, tmp_path):
    """SP 2 x DP 1 == 1 rank: losses, weights, eval loss, parameters; the SP run resumed from its
    step-2 checkpoint == uninterrupted; its export loads in transformers with the engine's logits."""
    ref_recipe = sp_recipe(micro_batch_size=4)
    ref = train(ref_recipe, 1)
    sp_recipe_ = sp_recipe(
        micro_batch_size=4, parallel={"sequence_parallel": 2}, checkpoint={"every": 2, "at_end": False}
    )
    sp = train(sp_recipe_, 2)
    # every SP rank saw the same samples: the DP group is one rank, the SP group both
    assert [r.layout for r in sp.ranks] == [
        {"dp_ranks": [0], "mp_ranks": [0, 1]},
        {"dp_ranks": [1], "mp_ranks": [0, 1]},
    ]
    dl, dw = compare_windows(ref_recipe, sp_recipe_)
    dp = max_abs_diff(ref.state_dict, sp.state_dict)
    print(f"\nSP2xDP1 vs SP1: max |dloss| {dl:.2e}, |dweight| {dw:.2e}, |dparam| {dp:.2e}")
    assert dl <= TOL and dw <= TOL and dp <= TOL
    for a, b in zip(ref.records, sp.records, strict=True):
        assert a["tokens"] == b["tokens"]  # each sample counted once, not once per SP rank
        for key in ("loss", "weighted_loss", "ess", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOL, key

    # resume on the same layout from step_2: step 3 again, then saved and exported
    resumed = train({**sp_recipe_, "checkpoint": {"every": 0, "at_end": True}}, 2)
    assert [r["step"] for r in resumed.records] == [3]
    dr = max_abs_diff(sp.state_dict, resumed.state_dict)
    print(f"SP2 resumed at step 2 vs uninterrupted: max |dparam| {dr:.2e}")
    assert dr <= 1e-6

    from transformers import AutoModelForCausalLM

    from irdro.export import export_hf, probe_tokens

    out = tmp_path / "hf"
    export_hf(sp_recipe_["output_dir"], out, dtype="fp32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa").eval()
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa").eval()
    params = dict(trained.named_parameters())  # the engine's own parameters, gathered (no buffers)
    assert trained.load_state_dict({k: resumed.state_dict[k] for k in params}, strict=False).missing_keys == []
    ids = probe_tokens(hf.config.vocab_size)
    with torch.no_grad():
        dlogit = float((hf(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max())
    print(f"export from the SP run: max |dlogit| {dlogit:.2e}")
    assert dlogit <= 1e-6


@pytest.mark.slow
def test_sp2_negative_controls(sp_recipe):
    """Two plausible mistakes change the parameters measurably: the weight gather over the world
    (every sample twice in its window) and an SP sum whose backward ignores the other shards (1/SP
    of the gradient). The reference is a 1-rank run."""
    ref = train(sp_recipe(micro_batch_size=4), 1)
    sp = sp_recipe(micro_batch_size=4, parallel={"sequence_parallel": 2})
    for patch in ("world_gather", "sp_sum_local"):
        run = train(sp, 2, patches=(patch,))
        diff = max_abs_diff(ref.state_dict, run.state_dict)
        print(f"\nnegative control {patch}: max |dparam| vs SP1 {diff:.2e}")
        assert diff > 100 * TOL, patch


@pytest.mark.slow
def test_sp2_dp2_equals_sp1_dp2_midrank(sp_recipe):
    """4 processes, SP 2 x DP 2 == 2 processes, DP 2 (MidRanking, so the band is compared): DP
    deduplication and the gradient scale at DP > 1; the group layout is DeepSpeed's (checked
    against its Ulysses groups inside every SP run, irdro.dist.check_deepspeed_groups)."""
    kw = dict(micro_batch_size=2, reweight={"scheme": "midrank", "frac": 0.5, "portion": 1, "window": "step"})
    ref_recipe, sp_recipe_ = sp_recipe(**kw), sp_recipe(**kw, parallel={"sequence_parallel": 2})
    ref = train(ref_recipe, 2)
    sp = train(sp_recipe_, 4)
    assert [r.layout for r in sp.ranks] == [
        {"dp_ranks": [r % 2, r % 2 + 2], "mp_ranks": [r // 2 * 2, r // 2 * 2 + 1]} for r in range(4)
    ]
    dl, dw = compare_windows(ref_recipe, sp_recipe_)
    dp = max_abs_diff(ref.state_dict, sp.state_dict)
    print(f"\nSP2xDP2 vs SP1xDP2 (midrank): max |dloss| {dl:.2e}, |dweight| {dw:.2e}, |dparam| {dp:.2e}")
    assert dl <= TOL and dw <= TOL and dp <= TOL
    for a, b in zip(ref.records, sp.records, strict=True):
        assert a["tokens"] == b["tokens"]
        assert abs(a["eval_loss"] - b["eval_loss"]) <= TOL if "eval_loss" in a else True
