"""Device placement on the training path, proven on a CPU-only box.

Under NCCL only accelerator tensors can be communicated, and a window whose tensors sit on two
devices crashes on the first micro-step; a CPU box cannot see either by itself, since every tensor
is on the CPU. So: (1) every tensor factory on the training path names its device (checked on the
source), (2) the training path runs with the default device set to `meta`, where any tensor made
without a device lands on a device that cannot be mixed with the real ones, and (3) irdro.dist, the
only module that calls torch.distributed, hands collectives tensors on its communication device and
returns results on the caller's.
"""

from __future__ import annotations

import ast
import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import irdro
from irdro import dist
from irdro.config import Recipe, ReweightConfig

PACKAGE = Path(irdro.__file__).resolve().parent
# Modules whose tensors reach the model, the window or a collective.
TRAINING_PATH = ("train.py", "normalize.py", "dist.py", "model.py", "reweight.py", "data.py")
FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "full",
    "tensor",
    "arange",
    "as_tensor",
    "rand",
    "randn",
    "randint",
    "linspace",
    "eye",
}


def _factory_calls_without_device(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        if func.attr in FACTORIES and isinstance(func.value, ast.Name) and func.value.id == "torch":
            if not any(k.arg in ("device", "out") for k in node.keywords):
                found.append(f"{path.name}:{node.lineno} torch.{func.attr}(...)")
    return found


def test_every_tensor_factory_on_the_training_path_names_its_device() -> None:
    missing = [hit for name in TRAINING_PATH for hit in _factory_calls_without_device(PACKAGE / name)]
    assert not missing, "tensor factories without device=: " + ", ".join(missing)


def test_only_dist_and_engine_touch_torch_distributed() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("dist.py", "engine.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.startswith("torch.distributed") or n.startswith("deepspeed.comm") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- meta default device


class TinyLM(nn.Module):
    """An embedding-to-logits model with dropout: enough for the loss, window and eval code."""

    def __init__(self, vocab: int = 11, dim: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.head(self.drop(self.emb(input_ids))))


class FakeEngine(nn.Module):
    """The slice of a DeepSpeedEngine that train_step and evaluate use (SGD at the GA boundary,
    world of one)."""

    def __init__(self, module: nn.Module, grad_accum_steps: int = 2, lr: float = 0.1) -> None:
        super().__init__()
        self.module, self.lr, self.ga, self.micro_steps = module, lr, grad_accum_steps, 0
        self.device = torch.device("cpu")

    def forward(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.ga:
            return
        with torch.no_grad():
            for p in self.module.parameters():
                if p.grad is not None:
                    p -= self.lr * p.grad
                    p.grad = None

    def was_step_applied(self) -> bool:
        return True


def _batch(ids: list[int], length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(sum(ids))
    input_ids = torch.randint(0, 11, (len(ids), length), generator=g, device="cpu")
    return {
        "input_ids": input_ids,
        "labels": input_ids.clone(),
        "attention_mask": torch.ones_like(input_ids),
        "sample_ids": torch.tensor(ids, device="cpu"),
    }


def _recipe(window: str, ga: int = 2) -> Recipe:
    return Recipe(
        output_dir="unused",
        micro_batch_size=2,
        grad_accum_steps=ga,
        reweight=ReweightConfig(scheme="irdro", lam=0.5, window=window, scoring_pass="always"),
    )


@contextlib.contextmanager
def meta_default_device():
    """A tensor made without a device lands on `meta`: mixing it with a real tensor fails, and so
    does reading a value from it."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_reweight_window_keeps_every_tensor_on_the_losses_device() -> None:
    from irdro.normalize import reweight_window

    losses = torch.tensor([[1.0, 2.0, 3.0]], device="cpu")
    with meta_default_device():
        win = reweight_window(
            losses,
            torch.tensor([[True, True, False]], device="cpu"),
            torch.tensor([[5, 3, 9]], device="cpu"),
            ReweightConfig(scheme="irdro"),
            0,
            1.0,
        )
    for name in ("coeffs", "ids", "losses", "weights", "ranks"):
        assert getattr(win, name).device.type == "cpu", name
    expected = torch.softmax(torch.tensor([1.0, 2.0], device="cpu"), 0)
    assert torch.allclose(win.coeffs[0, :2], expected) and win.coeffs[0, 2] == 0


@pytest.mark.parametrize("window", ["micro", "step"])
def test_train_step_makes_no_tensor_on_the_default_device(window) -> None:
    from irdro.train import train_step

    engine = FakeEngine(TinyLM()).train()
    batches = [_batch([0, 1]), _batch([2, 3])]
    with meta_default_device():
        stats = train_step(engine, batches, _recipe(window), step=0)
    assert math.isfinite(stats.weighted_loss) and stats.local_tokens == 2 * 2 * 5


def test_evaluate_makes_no_tensor_on_the_default_device() -> None:
    from irdro.train import evaluate

    class Data:
        manifest: dict = {}

        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int):
            from irdro.shards import Sample

            ids = np.arange(i, i + 6, dtype=np.int64) % 11
            return Sample(sample_id=i, input_ids=ids, labels=ids.copy(), doc_id=i, chunk_id=0)

    from irdro.data import Mixture

    engine = FakeEngine(TinyLM()).train()
    data = Mixture(["d"], [1.0], [Data()], named=False)
    with meta_default_device():
        out = evaluate(engine, data, _recipe("micro"), pad_id=0)
    assert math.isfinite(out["eval_loss"]) and engine.training


def test_train_step_refuses_a_model_in_eval_mode() -> None:
    from irdro.train import train_step

    engine = FakeEngine(TinyLM(), grad_accum_steps=1).eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        train_step(engine, [_batch([0, 1])], _recipe("micro", ga=1), step=0)


def test_step_window_scores_the_losses_it_trains_on_with_dropout() -> None:
    """The no-grad scoring forward and the grad forward of a micro-batch draw the same dropout masks."""
    from irdro.train import train_step

    calls: list[tuple[int, bool, torch.Tensor]] = []

    def hook(step: int, micro: int, losses: torch.Tensor) -> torch.Tensor:
        calls.append((micro, torch.is_grad_enabled(), losses.detach().clone()))
        return losses

    engine = FakeEngine(TinyLM(dropout=0.5), grad_accum_steps=3).train()
    train_step(engine, [_batch([0, 1]), _batch([2, 3]), _batch([4, 5])], _recipe("step", ga=3), 0, hook)
    scored = {m: x for m, grad, x in calls if not grad}
    trained = {m: x for m, grad, x in calls if grad}
    assert scored.keys() == trained.keys() == {0, 1, 2}
    for m in scored:
        assert torch.equal(scored[m], trained[m]), m
    # and dropout really is on: two forwards of one micro-batch differ without the replay
    engine.module.train()
    a = engine(**{k: v for k, v in _batch([0, 1]).items() if k == "input_ids"}).logits
    b = engine(**{k: v for k, v in _batch([0, 1]).items() if k == "input_ids"}).logits
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- irdro.dist


class RecordingCollectives:
    """Stands in for torch.distributed in a world of one: records the device of every tensor a
    collective receives; `comm` plays the backend's device."""

    def __init__(self, comm: str) -> None:
        self.comm, self.seen = comm, []

    def all_reduce(self, t, op=None, group=None):
        self.seen.append(t.device.type)

    def all_gather(self, out, t, group=None):
        self.seen.append(t.device.type)
        for o in out:
            o.copy_(t)


def test_dist_hands_collectives_the_comm_device_and_returns_on_the_callers(monkeypatch) -> None:
    """With the communication device played by `meta`, a collective that received a caller's CPU
    tensor as-is would record `cpu`; results come back on the caller's device."""
    rec = RecordingCollectives("meta")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "dp_size", lambda: 1)
    monkeypatch.setattr(dist, "comm_device", lambda: torch.device(rec.comm))
    monkeypatch.setattr(dist.tdist, "all_reduce", rec.all_reduce)
    monkeypatch.setattr(dist.tdist, "all_gather", rec.all_gather)
    moved = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):  # meta holds no values: let the copy back to cpu yield zeros
        if self.device.type == "meta" and (args[:1] == (torch.device("cpu"),) or kwargs.get("device") == "cpu"):
            moved.append(self.shape)
            return torch.zeros(self.shape, dtype=self.dtype, device="cpu")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    x = torch.ones(3, dtype=torch.float64, device="cpu")
    for out in (dist.all_reduce_sum(x), dist.all_reduce_sum(x), dist.all_gather_losses(x[None])):
        assert out.device.type == "cpu"
    assert rec.seen == ["meta", "meta", "meta"] and len(moved) == 3
    assert torch.equal(x, torch.ones(3, dtype=torch.float64, device="cpu"))  # inputs untouched


def test_dist_world_of_one_returns_copies_on_the_callers_device() -> None:
    x = torch.arange(3, dtype=torch.float64, device="cpu")
    s = dist.all_reduce_sum(x)
    assert torch.equal(s, x) and s.data_ptr() != x.data_ptr()
    assert dist.all_gather_losses(x[None]).shape == (1, 1, 3)
    assert dist.comm_device() == torch.device("cpu")
