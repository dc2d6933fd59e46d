"""Hugging Face causal LMs under DeepSpeed ZeRO, and the per-sample loss.

Owns: loading the tokenizer and the model (from a local folder, or random-init from an inline
config) so that under ZeRO-3 the parameters are sharded while they are created, the attention
implementation choice, gradient checkpointing, and `per_sample_nll`. Must not: build the engine or
optimizer (irdro.engine), or reweight.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from irdro.config import ConfigError, ModelConfig, resolve_path, zero_stage

log = logging.getLogger(__name__)

# transformers reads the ZeRO-3 settings through a weakref to this object; it must stay alive for
# as long as models may be created or resized.
_HF_DS_CONFIG: object | None = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_attention(choice: str) -> str:
    """`auto` = flash_attention_2 when flash-attn and CUDA are present, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    if choice == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if choice == "flash_attention_2" and not has_flash:
        raise ConfigError(
            "model.attention: flash_attention_2 needs CUDA and `pip install irdro[gpu]`; use auto or sdpa"
        )
    return choice


def tokenizer_path(cfg: ModelConfig) -> str:
    path = cfg.tokenizer if cfg.tokenizer is not None else cfg.path
    assert path is not None  # config.validate guarantees it
    return str(resolve_path(path))


def load_tokenizer(cfg: ModelConfig):
    """The recipe's tokenizer (a local folder; nothing is downloaded)."""
    from transformers import AutoTokenizer

    path = tokenizer_path(cfg)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.tokenizer: cannot load a tokenizer from {path}: {e}") from None


def load_model(cfg: ModelConfig, ds_config: dict):
    """The causal LM, sharded at creation when `ds_config` is ZeRO-3.

    Args:
        cfg: the recipe's model section.
        ds_config: the resolved DeepSpeed JSON (engine settings decide ZeRO-3).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    global _HF_DS_CONFIG
    if zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    else:
        _HF_DS_CONFIG = None
    dtype = DTYPES[cfg.dtype]
    attn = resolve_attention(cfg.attention)
    if cfg.path is not None:
        path = resolve_path(cfg.path)
        if not path.is_dir():
            raise ConfigError(f"model.path: not a directory: {cfg.path}")
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
        )
    else:
        inline = dict(cfg.config or {})
        model_type = inline.pop("model_type")
        try:
            hf_config = AutoConfig.for_model(model_type, **inline)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.config: {e}") from None
        model = AutoModelForCausalLM.from_config(
            hf_config,
            dtype=dtype,
            attn_implementation=attn,
            trust_remote_code=cfg.trust_remote_code,
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    log.info("model: %s, attention %s, dtype %s", type(model).__name__, attn, cfg.dtype)
    return model


def per_sample_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean next-token NLL of each sample over its supervised tokens, in fp32.

    Supervised means `labels != -100` (never `!= pad_token_id`: with pad == eos that would drop real
    EOS targets). Computed one row at a time so at most one row of logits is up-cast to fp32.

    Args:
        logits: (B, T, V) model outputs for positions 0..T-1.
        labels: (B, T) int64 targets aligned with the inputs (HF convention, unshifted), -100 where
            not supervised.

    Returns:
        losses: (B,) fp32 per-sample mean NLL (0 for a sample with no supervised token).
        counts: (B,) int64 supervised tokens per sample.
    """
    targets = labels[:, 1:]
    counts = (targets != -100).sum(dim=1)
    rows = []
    for b in range(logits.shape[0]):
        nll = F.cross_entropy(
            logits[b, :-1].float(), targets[b], ignore_index=-100, reduction="sum"
        )
        rows.append(nll)
    losses = torch.stack(rows) / counts.clamp(min=1).to(torch.float32)
    return losses, counts
