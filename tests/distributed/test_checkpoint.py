"""Checkpoints: export round trip, a corrupted newest tag is skipped, elastic 2 -> 1 rank resume."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ok, save_tiny_model

from irdro.checkpoint import CHECKPOINT_DIR
from irdro.testing import run_ranks

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_round_trip_matches_training_logits(base_recipe, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    from irdro.export import probe_tokens

    model_dir = save_tiny_model(tmp_path / "model", tie_word_embeddings=tied)
    recipe = base_recipe(
        micro_batch_size=2,
        max_steps=2,
        model__path=str(model_dir),
        optim__name="adamw",
        optim__lr=1e-2,
        checkpoint__at_end=True,
    )
    run = ok(run_ranks(recipe, 2, probe=True))
    out = tmp_path / "hf"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/convert_to_hf.py",
            recipe["output_dir"],
            "--output",
            str(out),
            "--dtype",
            "fp32",
            "--verify",
            "--no-progress",
            "--max-shard-size",
            "2MB",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify: max |logit diff|" in proc.stdout
    assert (out / "model.safetensors.index.json").exists()  # sharded at 2MB
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings == tied
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    with torch.no_grad():
        logits = model.eval()(probe_tokens(model.config.vocab_size)).logits
    diff = float((logits - run.probe_logits).abs().max())
    print(f"\nexport ({'tied' if tied else 'untied'}): max |logit diff| exported vs training engine = {diff:.3e}")
    assert diff <= 1e-5
    # a second export to the same folder is refused and leaves the first intact
    again = subprocess.run(
        [sys.executable, "tools/convert_to_hf.py", recipe["output_dir"], "--output", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
    assert (out / "model.safetensors.index.json").exists()
    # the weights did train: an untouched model gives other logits
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        assert float((fresh.eval()(probe_tokens(model.config.vocab_size)).logits - logits).abs().max()) > 1e-3


def test_export_refuses_bad_input_without_traceback(tmp_path, base_recipe):
    proc = subprocess.run(
        [sys.executable, "tools/convert_to_hf.py", str(tmp_path), "--output", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no checkpoints/latest" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupted_newest_tag_is_skipped(base_recipe):
    recipe = base_recipe(micro_batch_size=2, max_steps=4, checkpoint__every=2, checkpoint__at_end=True)
    full = ok(run_ranks(recipe, 2))
    root = Path(recipe["output_dir"]) / CHECKPOINT_DIR
    shard = next((root / "step_00000004").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated on disk
    resumed = ok(run_ranks(recipe, 2))
    assert "skipping checkpoint" in resumed.ranks[0].log and "truncated" in resumed.ranks[0].log
    assert [r["step"] for r in resumed.records] == [3, 4]  # resumed from step 2
    for a, b in zip(full.records[2:], resumed.records, strict=True):
        assert a["loss"] == b["loss"]


def test_elastic_resume_two_ranks_to_one(base_recipe, tmp_path):
    # AdamW: DeepSpeed's universal conversion needs optimizer state (plain SGD has none).
    recipe2 = base_recipe(micro_batch_size=2, max_steps=3, checkpoint__every=2, optim__name="adamw", optim__lr=1e-2)
    full = ok(run_ranks(recipe2, 2))  # uninterrupted reference, checkpoint at step 2
    one_dir = tmp_path / "one-rank"
    shutil.copytree(recipe2["output_dir"], one_dir)
    recipe1 = dict(recipe2, output_dir=str(one_dir), grad_accum_steps=2)  # same global batch of 4
    resumed = ok(run_ranks(recipe1, 1))
    assert "(elastic)" in resumed.ranks[0].log
    assert [r["step"] for r in resumed.records] == [3]
    loss_diff = abs(resumed.records[0]["loss"] - full.records[2]["loss"])
    param_diff = max(float((full.state_dict[k] - resumed.state_dict[k]).abs().max()) for k in full.state_dict)
    print(f"\nelastic 2->1 rank: |loss diff| at step 3 = {loss_diff:.3e}, max |dparam| = {param_diff:.3e}")
    assert loss_diff <= 1e-5 and param_diff <= 1e-5
    # a different global batch is refused with a message that says what to change
    bad = ok(run_ranks(dict(recipe2, output_dir=str(tmp_path / "x")), 2))  # noqa: F841 - makes a checkpoint
    refused = run_ranks(dict(recipe2, output_dir=str(tmp_path / "x"), max_steps=4), 1)
    assert refused.ranks[0].returncode == 1 and "global batch of 4" in refused.ranks[0].error
