"""kill -9 of the whole launcher process group between two checkpoints, then the same command again:
the result is bit-identical to a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, smoke_command

from irdro.checkpoint import consolidated_fp32

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
OVERRIDES = ("max_steps=6", "checkpoint.every=2", "eval.every=0", "log.progress=false")


def steps_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip() and "loss" in json.loads(x)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_kill9_then_resume_is_bit_identical(tmp_path, smoke_data, gpt2_tokenizer_dir):
    ref_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    run(smoke_command(ref_dir, smoke_data, gpt2_tokenizer_dir, *OVERRIDES))

    cmd = smoke_command(killed_dir, smoke_data, gpt2_tokenizer_dir, *OVERRIDES)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while not any(r["step"] == 3 for r in steps_logged(killed_dir)):  # between checkpoints 2 and 4
        assert proc.poll() is None and time.time() < deadline, "run ended before step 3"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    latest = (killed_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000002", f"kill landed after {latest}"

    resumed = run(cmd)
    assert "resumed from" in resumed.stderr + resumed.stdout

    ref_sd = consolidated_fp32(ref_dir / "checkpoints" / "step_00000006")
    got_sd = consolidated_fp32(killed_dir / "checkpoints" / "step_00000006")
    assert ref_sd.keys() == got_sd.keys()
    for name in ref_sd:
        a, b = ref_sd[name], got_sd[name]
        a = a if isinstance(a, torch.Tensor) else a.contiguous()
        b = b if isinstance(b, torch.Tensor) else b.contiguous()
        assert torch.equal(a, b), f"{name} differs after resume"
    ref_steps, got_steps = steps_logged(ref_dir), steps_logged(killed_dir)
    assert [r["step"] for r in got_steps] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]  # lines past the checkpoint were replaced
    for a, b in zip(ref_steps[2:], got_steps[2:], strict=True):
        for key in ("loss", "weighted_loss", "ess", "max_weight", "grad_norm", "lr", "tokens"):
            assert a[key] == b[key], (a["step"], key)
