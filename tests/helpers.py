"""Helpers shared by tests (import as `helpers`; tests/ is on sys.path via conftest.py).

Keep imports at the top and each module's helpers in its own delimited section.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


def random_samples(
    num: int, vocab_size: int = 1000, seed: int = 0, max_len: int = 40
) -> list[np.ndarray]:
    """``num`` random (L,) int64 token arrays with L in [2, max_len]."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=int(rng.integers(2, max_len + 1))) for _ in range(num)]


# ======================================================================== end data (irdro.data)
