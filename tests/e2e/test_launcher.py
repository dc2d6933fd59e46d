"""The real `deepspeed` launcher on 2 CPU ranks, the way the README runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import smoke_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_deepspeed_launcher_two_ranks(tmp_path, smoke_data, gpt2_tokenizer_dir):
    run_dir = tmp_path / "run"
    cmd = smoke_command(run_dir, smoke_data, gpt2_tokenizer_dir, "max_steps=6", "eval.every=3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5, 6]
    for x in steps:
        for key in (
            "step",
            "lr",
            "loss",
            "weighted_loss",
            "ess",
            "max_weight",
            "tokens",
            "tokens_per_s",
            "grad_norm",
            "skipped",
        ):
            assert key in x, key
        assert math.isfinite(x["loss"]) and math.isfinite(x["weighted_loss"]) and x["skipped"] == 0
        assert 0 < x["ess"] <= 1 + 1e-9 and x["tokens"] > 0
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in evals] == [0, 3, 6] and all(math.isfinite(x["eval_ppl"]) for x in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns

    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert len(list((ckpt / "step_00000006").glob("*model_states.pt"))) == 2  # one shard per rank
    assert (run_dir / "recipe.yaml").exists() and json.loads((run_dir / "ds_config.json").read_text())[
        "train_batch_size"
    ] == 16


def test_validate_rejects_typo_in_real_recipe():
    proc = subprocess.run(
        [sys.executable, "-m", "irdro.validate", "recipes/tiny/cpu_smoke.yaml", "reweight.lamda=0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "reweight.lamda" in proc.stderr and "reweight.lam" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_reports_bad_recipe_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "irdro.train", "recipes/tiny/cpu_smoke.yaml", "optim.lr=fast", f"output_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "optim.lr: expected a number" in proc.stderr
    assert "Traceback" not in proc.stderr
