"""Helpers the multi-rank tests import (a module of its own: `conftest` is not importable by name
once several test folders each have one)."""

from __future__ import annotations

from pathlib import Path

TINY_LLAMA = dict(
    model_type="llama", vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256,
)  # fmt: skip


def save_tiny_model(path: Path, **overrides) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA, **overrides)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.save_pretrained(path)
    return path


# An OPT-style model with dropout (OPT checkpoints ship dropout 0.1): what train/eval mode changes.
TINY_OPT = dict(
    model_type="opt", vocab_size=50257, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1,
    pad_token_id=50256, bos_token_id=50256, eos_token_id=50256,
)  # fmt: skip


def save_tiny_opt(path: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_OPT)).save_pretrained(path)
    return path
