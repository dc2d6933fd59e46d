"""irdro.fsio: a failed write leaves the previous file or directory as it was and no temp behind;
irdro.rundir: every path of a run, and the sample-dump name of a step both ways."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from irdro import fsio
from irdro.config import recipe_from_dict
from irdro.fsio import (
    OutputError,
    atomic_write_bytes,
    atomic_write_text,
    cache_dir,
    publish_dir,
    sha256_file,
    staged_dir,
)
from irdro.rundir import RunDir, sample_dump_name, sample_dump_step


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert names(target.parent) == ["file.txt"]
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_write_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    atomic_write_text(target, "TOKEN=x\n", mode=0o600)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failed_atomic_write_keeps_old_file(tmp_path: Path, monkeypatch, failing: str) -> None:
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsio.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert names(tmp_path) == ["metrics.jsonl"]  # no temp file left behind


def test_atomic_write_interrupted_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    """A KeyboardInterrupt (or any BaseException) mid-write is cleaned up the same way."""
    target = tmp_path / "latest"
    target.write_text("step_00000001")
    monkeypatch.setattr(fsio.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "step_00000002")
    assert target.read_text() == "step_00000001" and names(tmp_path) == ["latest"]


# ----------------------------------------------------------------------------- directories


def make_dir(path: Path, **files: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_publish_dir_keeps_old_until_new_is_in_place(tmp_path: Path, monkeypatch) -> None:
    output = make_dir(tmp_path / "hf", **{"config.json": "old"})
    staging = make_dir(tmp_path / ".hf.tmp-x", **{"config.json": "new"})
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == staging:  # the moment the new dir goes in: the old one must still exist
            olds = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.old-")]
            seen.append([(p / "config.json").read_text() for p in olds])
        real_rename(src, dst)

    monkeypatch.setattr(fsio.os, "rename", rename)
    publish_dir(staging, output, overwrite=True)
    assert seen == [["old"]]
    assert (output / "config.json").read_text() == "new"
    assert names(tmp_path) == ["hf"]  # the old copy is gone once the new one is in place


def test_publish_dir_failure_restores_old(tmp_path: Path, monkeypatch) -> None:
    output = make_dir(tmp_path / "hf", **{"config.json": "old"})
    staging = make_dir(tmp_path / ".hf.tmp-x", **{"config.json": "new"})
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == staging:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(fsio.os, "rename", rename)
    with pytest.raises(OSError):
        publish_dir(staging, output, overwrite=True)
    assert (output / "config.json").read_text() == "old"
    assert names(tmp_path) == [".hf.tmp-x", "hf"]  # publish_dir leaves the staging dir to its owner


def test_publish_dir_without_overwrite_refuses_non_empty(tmp_path: Path) -> None:
    output = make_dir(tmp_path / "out", a="1")
    staging = make_dir(tmp_path / ".out.tmp", a="2")
    with pytest.raises(OutputError, match="is not empty; pass --overwrite"):
        publish_dir(staging, output, overwrite=False)
    assert (output / "a").read_text() == "1"
    make_dir(tmp_path / "empty")
    publish_dir(staging, tmp_path / "empty", overwrite=False)  # an empty dir is replaced
    assert (tmp_path / "empty" / "a").read_text() == "2"


def test_staged_dir_publishes_or_removes_itself(tmp_path: Path) -> None:
    output = make_dir(tmp_path / "export", a="old")
    with pytest.raises(RuntimeError), staged_dir(output, overwrite=True) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash while writing")
    assert names(tmp_path) == ["export"] and (output / "a").read_text() == "old"
    with staged_dir(output, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert names(tmp_path) == ["export"] and (output / "a").read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_staged_dir_refusal_removes_staging(tmp_path: Path) -> None:
    output = make_dir(tmp_path / "out", a="1")
    with pytest.raises(OutputError), staged_dir(output, overwrite=False) as tmp:
        (tmp / "a").write_text("2")
    assert names(tmp_path) == ["out"] and (output / "a").read_text() == "1"


# ----------------------------------------------------------------------------- small helpers


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)  # more than one 1 MiB chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_cache_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IRDRO_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("IRDRO_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "irdro"
    monkeypatch.delenv("IRDRO_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "irdro"


# ----------------------------------------------------------------------------- RunDir


def test_run_dir_paths(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    assert run.root == tmp_path
    assert run.recipe == tmp_path / "recipe.yaml"
    assert run.ds_config == tmp_path / "ds_config.json"
    assert run.metrics == tmp_path / "metrics.jsonl"
    assert run.samples == tmp_path / "samples"
    assert run.checkpoints == tmp_path / "checkpoints"
    assert run.tensorboard == tmp_path / "tensorboard"
    assert run.hf == tmp_path / "hf"
    assert run.sample_dump(12) == tmp_path / "samples" / "step_00000012.jsonl"
    assert RunDir(tmp_path) == run  # frozen, compares by root


@pytest.mark.parametrize("step", [0, 1, 12, 99_999_999, 123_456_789])
def test_sample_dump_name_round_trip(step: int) -> None:
    assert sample_dump_step(sample_dump_name(step)) == step


@pytest.mark.parametrize(
    "name",
    ["step_12.json", ".step_00000012.jsonl.tmp-ab12cd34", "step_x.jsonl", "weights_step_00000012.jsonl", "step_.jsonl"],
)
def test_other_names_are_not_dumps(name: str) -> None:
    assert sample_dump_step(name) is None


def test_sample_dumps_ascending(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.sample_dumps() == {}
    run.samples.mkdir()
    for step in (10, 2, 1):
        run.sample_dump(step).write_text("{}\n")
    (run.samples / "notes.txt").write_text("")
    assert list(run.sample_dumps().items()) == [(s, run.sample_dump(s)) for s in (1, 2, 10)]


# ----------------------------------------------------------------------------- write_run_files


class _Saves:
    """Stands in for a model config / tokenizer: save_pretrained writes one file, or fails."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail

    def save_pretrained(self, folder) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        Path(folder).mkdir(parents=True, exist_ok=True)  # as transformers does
        (Path(folder) / self.name).write_text(self.name)


class _Model:
    def __init__(self) -> None:
        self.config = _Saves("config.json")
        self.generation_config = _Saves("generation_config.json")


def test_write_run_files_failure_keeps_old_hf_and_leaves_no_temp(tmp_path: Path) -> None:
    from irdro.train import write_run_files

    run = RunDir(tmp_path / "run")
    recipe = recipe_from_dict(
        {
            "output_dir": str(run.root),
            "data": {"train": "shards"},
            "model": {"config": {"model_type": "llama"}, "tokenizer": "tok"},
        }
    )
    write_run_files(recipe, {"a": 1}, _Model(), _Saves("tokenizer.json"))
    assert names(run.root) == ["ds_config.json", "hf", "recipe.yaml"]
    assert names(run.hf) == ["config.json", "generation_config.json", "tokenizer.json"]
    with pytest.raises(OSError, match="No space left"):
        write_run_files(recipe, {"a": 2}, _Model(), _Saves("tokenizer.json", fail=True))
    assert names(run.root) == ["ds_config.json", "hf", "recipe.yaml"]  # no half-built hf/ beside
    assert names(run.hf) == ["config.json", "generation_config.json", "tokenizer.json"]
