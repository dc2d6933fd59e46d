"""Cluster faults that must end in a known state with nothing lost: a disk that fills up during a
save, a universal conversion that fails on one rank."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import ok

from irdro.checkpoint import CHECKPOINT_DIR, MARKER, check_complete
from irdro.testing import run_ranks

pytestmark = pytest.mark.distributed


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_latest(base_recipe):
    recipe = base_recipe(micro_batch_size=2, max_steps=4, checkpoint__every=2, checkpoint__at_end=True)
    run_dir = Path(recipe["output_dir"])
    root = run_dir / CHECKPOINT_DIR
    t0 = time.perf_counter()
    failed = run_ranks(recipe, 2, full_disk_at=(4, 1), timeout=180)
    print(f"\nfull disk on rank 1 at the step-4 save: both ranks stopped after {time.perf_counter() - t0:.1f}s")
    for rank in failed.ranks:  # both ranks stop with the same one-line error, none hangs
        assert rank.returncode == 1, rank.log[-2000:]
        assert rank.error.startswith("CheckpointError: checkpoint ") and "\n" not in rank.error
        assert "rank 1: OSError: [Errno 28] No space left on device" in rank.error
        assert "the previous checkpoint step_00000002 and `latest` are intact" in rank.error
    assert not (root / "step_00000004").exists()  # the partial tag is gone
    assert (root / "latest").read_text() == "step_00000002" and check_complete(root / "step_00000002") is None
    logged = metrics(run_dir)  # steps 3 and 4 were trained and logged before the save failed
    assert [r["step"] for r in logged] == [1, 2, 3, 4]

    resumed = ok(run_ranks(recipe, 2))  # the same command again: resumes from step 2
    assert [r["step"] for r in resumed.records] == [3, 4]
    for before, after in zip(logged[2:], resumed.records, strict=True):
        assert after["loss"] == before["loss"] and after["grad_norm"] == before["grad_norm"]
    assert check_complete(root / "step_00000004") is None


def test_failed_universal_conversion_stops_every_rank(base_recipe):
    # A 1-rank checkpoint resumed on 2 ranks needs the universal conversion; a damaged optimizer file of
    # the right size passes the size check and makes the conversion fail on rank 0.
    recipe1 = base_recipe(
        micro_batch_size=2, grad_accum_steps=2, max_steps=2, optim__name="adamw", checkpoint__at_end=True
    )
    ok(run_ranks(recipe1, 1))
    tag = Path(recipe1["output_dir"]) / CHECKPOINT_DIR / "step_00000002"
    optim = next(tag.glob("*optim_states.pt"))
    optim.write_bytes(b"\0" * optim.stat().st_size)
    assert check_complete(tag) is None and json.loads((tag / MARKER).read_text())["step"] == 2
    t0 = time.perf_counter()
    failed = run_ranks(dict(recipe1, grad_accum_steps=1, max_steps=3), 2, timeout=180)
    print(f"\nfailed conversion: both ranks stopped after {time.perf_counter() - t0:.1f}s")
    for rank in failed.ranks:
        assert rank.returncode == 1, rank.log[-2000:]
        assert rank.error.startswith("CheckpointError: resume: converting ") and "full log: " in rank.error
    assert not (tag.parent / "step_00000002_universal").exists()
    assert (tag.parent / "step_00000002_universal.log").is_file()


@pytest.mark.parametrize(
    "how, timeout_min, named",
    [
        ("kill", 10.0, "rank 1 stopped answering (no heartbeat; last seen at step 2)"),
        pytest.param(
            "freeze", 0.4, "rank 1 stopped answering (no heartbeat; last seen at step 2)", marks=pytest.mark.slow
        ),
    ],
)
def test_a_dead_or_hung_rank_is_named_and_the_others_stop(base_recipe, how, timeout_min, named):
    recipe = base_recipe(micro_batch_size=2, max_steps=4, collective_timeout_minutes=timeout_min)
    t0 = time.perf_counter()
    run = run_ranks(recipe, 2, stop_at=(1, 1, how), timeout=240)
    took = time.perf_counter() - t0
    print(f"\n{how} rank 1 at step 2: rank 0 stopped with exit code {run.ranks[0].returncode} after {took:.1f}s")
    survivor = run.ranks[0]
    assert survivor.returncode == 5 or (survivor.error or "").startswith("RankFailure"), survivor.log[-3000:]
    assert named in survivor.log + (survivor.error or "")
    assert run.ranks[1].returncode == -9


def test_export_onto_a_full_disk_leaves_the_previous_export_intact(base_recipe, tmp_path, monkeypatch):
    import errno
    import shutil

    from irdro import export
    from irdro.export import ExportError, export_hf

    recipe = base_recipe(micro_batch_size=2, max_steps=1, checkpoint__at_end=True)
    ok(run_ranks(recipe, 1))
    out = tmp_path / "exported"
    export_hf(recipe["output_dir"], out, dtype="fp32", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real = export._write_safetensors

    def full_disk(path, *args, **kwargs):
        real(path, *args, **kwargs)  # the first shard is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export, "_write_safetensors", full_disk)
    with pytest.raises(ExportError, match=r"export failed \(No space left on device: .*\); the partial copy was"):
        export_hf(recipe["output_dir"], out, dtype="fp32", overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")] == []  # no staging left

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(export.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(ExportError, match=r"the export needs 0\.\d\d GiB and 0\.00 GiB are free there"):
        export_hf(recipe["output_dir"], tmp_path / "other", dtype="fp32", progress=False)
