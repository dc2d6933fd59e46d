"""Helpers shared by every test folder, imported the same way everywhere: `from helpers import X`.

pytest puts tests/ on sys.path (the folder of the top-level conftest.py, which has no __init__.py);
conftest.py files hold only fixtures and hooks. Keep imports at the top and each topic's helpers in
its own delimited section.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (the cwd for commands like `python tools/prepare_data.py`)."""
FIXTURES = ROOT / "tests" / "fixtures"

# ============================================================================ data (irdro.data)


def write_shards(
    path: str | Path,
    samples: list[list[int]] | list[np.ndarray],
    *,
    vocab_size: int = 1000,
    seq_len: int = 64,
    shard_tokens: int = 2**26,
    masks: list[np.ndarray | None] | None = None,
    doc_ids: list[int] | None = None,
    overwrite: bool = False,
    tokenizer_hash: str = "0" * 64,
) -> Path:
    """Write ``samples`` (token id sequences) as a shard directory; sample i is doc i, chunk 0.

    The manifest names tokenizer "test" with ``tokenizer_hash`` (by default one no tokenizer has).

    Returns:
        path, ready for ``ShardDataset(path)``.
    """
    from irdro.shards import ShardWriter

    masks = masks or [None] * len(samples)
    doc_ids = doc_ids if doc_ids is not None else list(range(len(samples)))
    with ShardWriter(
        path,
        vocab_size=vocab_size,
        tokenizer_name="test",
        tokenizer_hash=tokenizer_hash,
        seq_len=seq_len,
        eos_token_id=None,
        pad_token_id=None,
        shard_tokens=shard_tokens,
        overwrite=overwrite,
    ) as writer:
        for tokens, mask, doc_id in zip(samples, masks, doc_ids, strict=True):
            writer.add(tokens, doc_id=doc_id, chunk_id=0, mask=mask)
        writer.finalize()
    return Path(path)


def random_samples(num: int, vocab_size: int = 1000, seed: int = 0, max_len: int = 40) -> list[np.ndarray]:
    """``num`` random (L,) int64 token arrays with L in [2, max_len]."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=int(rng.integers(2, max_len + 1))) for _ in range(num)]


# ======================================================================== end data (irdro.data)


# ================================================================= tiny models (tests/distributed)

TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=50257,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=50256,
    eos_token_id=50256,
)


def save_tiny_model(path: Path, base: dict | None = None, **overrides) -> Path:
    """A randomly initialised model (seed 1234) of config `base` (the tiny Llama) + `overrides`, saved to `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(base or TINY_LLAMA, **overrides)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.save_pretrained(path)
    return path


# An OPT-style model with dropout (OPT checkpoints ship dropout 0.1): what train/eval mode changes.
TINY_OPT = dict(
    model_type="opt",
    vocab_size=50257,
    hidden_size=32,
    ffn_dim=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    word_embed_proj_dim=32,
    dropout=0.1,
    attention_dropout=0.1,
    pad_token_id=50256,
    bos_token_id=50256,
    eos_token_id=50256,
)


def save_tiny_opt(path: Path) -> Path:
    return save_tiny_model(path, base=TINY_OPT)


# ============================================================= end tiny models (tests/distributed)

# ========================================================================= launcher (tests/e2e)


def ok(run):
    """`run` (an `irdro.testing.run_ranks` result), after asserting that every rank finished; a
    failure shows the rank's error and the end of its log."""
    for rank in run.ranks:
        assert rank.returncode == 0, f"rank failed: {rank.error}\n{rank.log[-3000:]}"
    return run


def trained(recipe: dict, world_size: int, **kw):
    """`irdro.testing.run_ranks(recipe, world_size, **kw)` that must succeed on every rank."""
    from irdro.testing import run_ranks

    return ok(run_ranks(recipe, world_size, **kw))


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts of the same names and shapes."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def launcher() -> str:
    path = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    assert path, "the deepspeed launcher is not installed"
    return path


def smoke_command(run_dir: Path, data: Path, tokenizer: Path, *overrides: str, port: int | None = None) -> list[str]:
    """`deepspeed --num_gpus 2 --module irdro.train recipes/tiny/cpu_smoke.yaml ...` on test paths."""
    port = port or 29500 + os.getpid() % 1000
    return [
        launcher(),
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        "--module",
        "irdro.train",
        "recipes/tiny/cpu_smoke.yaml",
        f"output_dir={run_dir}",
        f"model.tokenizer={tokenizer}",
        f"data.train={data / 'train'}",
        f"data.eval={data / 'eval'}",
        *overrides,
    ]


# ===================================================================== end launcher (tests/e2e)
