"""Engine wiring that only matters on a GPU, checked on CPU: attention and optimizer choices."""

from __future__ import annotations

import pytest
import torch

from irdro import engine, model
from irdro.config import ConfigError, OptimConfig


@pytest.fixture
def cuda_with_flash(monkeypatch):
    """Pretend CUDA and flash-attn are present (what a GPU node with `irdro[gpu]` reports)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = model.importlib.util.find_spec
    monkeypatch.setattr(
        model.importlib.util,
        "find_spec",
        lambda name: object() if name == "flash_attn" else real(name),
    )


def test_auto_attention_picks_flash_only_for_bf16(cuda_with_flash):
    assert model.resolve_attention("auto", "bf16") == "flash_attention_2"
    assert model.resolve_attention("auto", "fp32") == "sdpa"  # flash kernels reject fp32
    with pytest.raises(ConfigError, match="model.attention: flash_attention_2 needs model.dtype bf16"):
        model.resolve_attention("flash_attention_2", "fp32")
    assert model.resolve_attention("eager", "fp32") == "eager"


def test_auto_attention_without_cuda_is_sdpa(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model.resolve_attention("auto", "bf16") == "sdpa"
    with pytest.raises(ConfigError, match="needs CUDA"):
        model.resolve_attention("flash_attention_2", "bf16")


ZERO3 = {"zero_optimization": {"stage": 3}}
OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}


def test_adamw_on_cuda_needs_no_build(monkeypatch):
    """FusedAdam is JIT-built with nvcc on each node's first run unless DeepSpeed shipped it prebuilt;
    torch's fused AdamW needs neither."""
    from deepspeed import git_version_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(git_version_info.installed_ops, "fused_adam", False)
    assert engine.adamw_implementation(ZERO3) == "torch_fused"
    monkeypatch.setitem(git_version_info.installed_ops, "fused_adam", True)
    assert engine.adamw_implementation(ZERO3) == "deepspeed_fused"
    assert engine.adamw_implementation(OFFLOAD) == "cpu_adam"


def test_torch_fused_adamw_is_built(monkeypatch):
    from deepspeed import git_version_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(git_version_info.installed_ops, "fused_adam", False)
    p = torch.nn.Parameter(torch.ones(3, device="cpu"))  # fused AdamW runs on CPU too
    opt = engine.build_optimizer([p], OptimConfig(lr=0.1, betas=(0.9, 0.99), eps=1e-6), ZERO3)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-6


def test_adamw_on_cpu_is_the_plain_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.adamw_implementation(ZERO3) == "torch"
    opt = engine.build_optimizer([torch.nn.Parameter(torch.ones(2, device="cpu"))], OptimConfig(), ZERO3)
    assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]
