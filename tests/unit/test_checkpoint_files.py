"""Which checkpoints a run may resume from, and when a cached universal conversion is reused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from irdro import checkpoint
from irdro.checkpoint import CHECKPOINT_DIR, MARKER, find_resume, prepare_elastic, universal_dir
from irdro.config import ConfigError


def fake_tag(root: Path, step: int, marker_id: str = "a") -> Path:
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "irdro_rng_rank0.pkl").write_bytes(b"x" * 3)
    marker = {"step": step, "world_size": 2, "id": marker_id, "files": {"irdro_rng_rank0.pkl": 3}}
    (tag / MARKER).write_text(json.dumps(marker))
    return tag


def test_resume_never_refuses_a_directory_with_an_earlier_runs_checkpoints(tmp_path):
    assert find_resume(tmp_path, "never") is None  # nothing there: a fresh start
    fake_tag(tmp_path / CHECKPOINT_DIR, 4)
    with pytest.raises(ConfigError, match=r"^resume: never, but .* holds an earlier run's checkpoints \(newest step_0"):
        find_resume(tmp_path, "never")
    assert find_resume(tmp_path, "auto").step == 4


def test_universal_cache_is_reused_only_for_the_tag_it_was_made_from(tmp_path, monkeypatch):
    tag = fake_tag(tmp_path / CHECKPOINT_DIR, 2, marker_id="first-run")
    point = find_resume(tmp_path, "auto")
    conversions = []

    def fake_convert(cmd, **kw):
        conversions.append(cmd)
        out = Path(cmd[cmd.index("--output_folder") + 1])
        (out / "zero").mkdir()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(checkpoint.subprocess, "run", fake_convert)
    out = prepare_elastic(point)
    assert out == universal_dir(tag) and (out / "zero").is_dir() and (out / "irdro_rng_rank0.pkl").is_file()
    workers = conversions[0][conversions[0].index("--num_extract_workers") + 1]
    assert int(workers) == checkpoint.conversion_workers()
    prepare_elastic(point)
    assert len(conversions) == 1  # cached
    # a later run rewrote the tag (same step, new marker id): the cache belongs to the old one
    marker = json.loads((tag / MARKER).read_text())
    (tag / MARKER).write_text(json.dumps(dict(marker, id="second-run")))
    prepare_elastic(point)
    assert len(conversions) == 2
    assert json.loads((out / MARKER).read_text())["id"] == "second-run"
