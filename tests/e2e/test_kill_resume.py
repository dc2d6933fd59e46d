"""Interrupted runs through the `deepspeed` launcher, then the same command again: the result is
bit-identical to a run that was never interrupted. kill -9 of the whole launcher process group
between two checkpoints; SIGTERM to one rank (a scheduler's preemption), which saves and exits 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import ROOT, smoke_command

from irdro.checkpoint import consolidated_fp32

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# window step: the deferred softmax normaliser (the default for IR-DRO without trimming) resumes exactly
OVERRIDES = ("max_steps=6", "checkpoint.every=2", "eval.every=0", "log.progress=false", "reweight.window=step")


def steps_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip() and "loss" in json.loads(x)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smoke_data, gpt2_tokenizer_dir) -> Path:
    ref_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(smoke_command(ref_dir, smoke_data, gpt2_tokenizer_dir, *OVERRIDES))
    return ref_dir


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while not any(r["step"] == step for r in steps_logged(run_dir)):
        assert proc.poll() is None and time.time() < deadline, f"run ended before step {step}"
        time.sleep(0.02)


def assert_same_as_uninterrupted(ref_dir: Path, got_dir: Path) -> None:
    ref_sd = consolidated_fp32(ref_dir / "checkpoints" / "step_00000006")
    got_sd = consolidated_fp32(got_dir / "checkpoints" / "step_00000006")
    assert ref_sd.keys() == got_sd.keys()
    for name in ref_sd:
        a, b = ref_sd[name], got_sd[name]
        a = a if isinstance(a, torch.Tensor) else a.contiguous()
        b = b if isinstance(b, torch.Tensor) else b.contiguous()
        assert torch.equal(a, b), f"{name} differs after resume"
    ref_steps, got_steps = steps_logged(ref_dir), steps_logged(got_dir)
    assert [r["step"] for r in got_steps] == [1, 2, 3, 4, 5, 6]  # lines past the checkpoint were replaced
    for a, b in zip(ref_steps, got_steps, strict=True):
        for key in ("loss", "weighted_loss", "ess", "max_weight", "grad_norm", "lr", "tokens"):
            assert a[key] == b[key], (a["step"], key)


def test_kill9_then_resume_is_bit_identical(tmp_path, uninterrupted, smoke_data, gpt2_tokenizer_dir):
    killed_dir = tmp_path / "killed"
    cmd = smoke_command(killed_dir, smoke_data, gpt2_tokenizer_dir, *OVERRIDES)
    proc = start(cmd)
    wait_for_step(proc, killed_dir, 3)  # between checkpoints 2 and 4
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    latest = (killed_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_00000002", f"kill landed after {latest}"

    resumed = run(cmd)
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert_same_as_uninterrupted(uninterrupted, killed_dir)


def test_sigterm_to_one_rank_saves_exits_75_and_resumes_bit_identical(
    tmp_path, uninterrupted, smoke_data, gpt2_tokenizer_dir
):
    run_dir = tmp_path / "preempted"
    cmd = smoke_command(run_dir, smoke_data, gpt2_tokenizer_dir, *OVERRIDES)
    proc = start(cmd)
    wait_for_step(proc, run_dir, 1)
    rank1 = next(
        p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in " ".join(p.cmdline())
    )
    t0 = time.perf_counter()
    rank1.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    print(f"\nSIGTERM to rank 1: launcher exited {proc.returncode} after {time.perf_counter() - t0:.1f}s")
    assert proc.returncode == 75, out[-3000:]
    assert "stop signal" in out and "run the same command again to resume" in out and "Traceback" not in out
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 1 <= stopped < 6 and [r["step"] for r in steps_logged(run_dir)][-1] == stopped

    resumed = run(cmd)
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'}" in resumed.stderr + resumed.stdout
    assert_same_as_uninterrupted(uninterrupted, run_dir)
