"""The CPU dry run of benchmarks/gpu_check.py, so that the GPU check cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_gpu_check_cpu_dry_run(tmp_path, gpt2_tokenizer_dir):
    """--prepare (without wheels) then --cpu: every section runs and passes; the CUDA tests are
    collected and skipped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, "benchmarks/gpu_check.py"]
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    prep = subprocess.run(
        [*script, "--prepare", str(inputs), "--no-wheels"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    assert (inputs / "data/long2048/manifest.json").exists()  # what the GPU run trains on

    proc = subprocess.run(
        [*script, "--cpu", "--inputs", str(inputs), "--output", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    messages = {k: v.get("message") for k, v in sections.items()}
    assert proc.returncode == 0 and report["ok"] is True, (messages, proc.stdout[-3000:])
    assert {k: v["status"] for k, v in sections.items()} == {
        "gpu_tests": "skipped",
        "optimizer": "pass",
        "recipe": "pass",
        "throughput": "pass",
    }
    assert sections["gpu_tests"]["message"].startswith("no CUDA")
    assert sections["gpu_tests"]["counts"]["skipped"] >= 10  # collected, so they import on CPU
    assert all(sections["recipe"]["checks"].values())
    variants = sections["throughput"]["variants"]
    assert list(variants) == ["erm", "irdro_micro", "irdro_step", "irdro_step_scored", "erm_aa"]
    assert all(v["tokens_per_s"] > 0 for v in variants.values())
    drift = sections["throughput"]["deferred_vs_scored"]  # fp32 on CPU: the same training
    assert drift["steps"] >= 1 and drift["max_abs_loss"] <= 1e-5 and drift["scoring_pass_steps"][0] == 0
    assert variants["erm"]["tokens_per_s_vs_erm"] == 1.0 and variants["erm"]["mfu"] is None
    assert "== throughput: pass" in (out / "gpu_check.log").read_text()
