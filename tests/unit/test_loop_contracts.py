"""The loop's typed contracts: an abort is an exception type (exit 3), not a message prefix; the
global-batch check on resume lives in checkpoint.load; Hooks reach main and train."""

from __future__ import annotations

from pathlib import Path

import pytest

import irdro.train
from irdro.checkpoint import ResumePoint, load
from irdro.config import ConfigError
from irdro.train import Hooks, TrainingAborted, main

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "recipes" / "tiny" / "cpu_smoke.yaml")


@pytest.fixture
def fake_launch(monkeypatch):
    """main() with no paths checked, no process group and `train` replaced by `fake`."""

    def use(fake) -> None:
        monkeypatch.setattr(irdro.train, "check_local_paths", lambda recipe: None)
        monkeypatch.setattr(irdro.train, "init_distributed", lambda *a: None)
        monkeypatch.setattr(irdro.train, "shutdown_distributed", lambda: None)
        monkeypatch.setattr(irdro.train, "train", fake)

    return use


def test_training_aborted_exits_3_and_passes_the_hooks(fake_launch, caplog):
    seen = []
    hooks = Hooks(after_step=lambda step, stats, record: None)

    def fake(recipe, hooks_arg):
        seen.append(hooks_arg)
        raise TrainingAborted("aborting: 2 consecutive steps had a non-finite loss")

    fake_launch(fake)
    assert main([SMOKE], hooks) == 3
    assert seen == [hooks] and "aborting: 2 consecutive steps" in caplog.text


def test_a_runtime_error_is_not_an_abort_whatever_its_text(fake_launch):
    def fake(recipe, hooks_arg=None):
        raise RuntimeError("aborting: not a TrainingAborted")

    fake_launch(fake)
    with pytest.raises(RuntimeError, match="not a TrainingAborted"):
        main([SMOKE])


class LoadingEngine:
    """Just `load_checkpoint`, returning a saved client state (no tensor parallelism)."""

    def __init__(self, client_state: dict) -> None:
        self.client_state = client_state

    def autotp_size(self) -> int:
        return 0

    def load_checkpoint(self, load_dir: str, tag: str, **kw) -> tuple[str, dict]:
        return load_dir, self.client_state


def test_checkpoint_load_refuses_another_global_batch(tmp_path):
    point = ResumePoint(tag_dir=tmp_path / "checkpoints" / "step_00000002", step=2, world_size=1)
    engine = LoadingEngine({"step": 2, "consumed_samples": 8})
    with pytest.raises(ConfigError, match="global batch of 4 samples per step; this launch has 2"):
        load(engine, point, elastic=False, global_batch=2)
