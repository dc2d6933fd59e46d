"""Every recipe and every DeepSpeed JSON in the repo loads, validates and merges."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from irdro.config import RECIPE_OWNED_DS_KEYS, load_recipe, resolve_ds_config, zero_stage
from irdro.validate import check_sequence_parallel

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def launch_world_size(recipe: Path) -> int:
    """Data-parallel size implied by the recipe's first-line launch command."""
    first = recipe.read_text().splitlines()[0]
    gpus = re.search(r"--num_gpus[ =](\d+)", first)
    nodes = re.search(r"--num_nodes[ =](\d+)", first)
    return (int(gpus.group(1)) if gpus else 1) * (int(nodes.group(1)) if nodes else 1)


def test_there_are_recipes_and_configs():
    assert RECIPES and len(DS_CONFIGS) == 6


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates_and_merges(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "irdro.train" in first and str(path.relative_to(ROOT)) in first, (
        "first comment line must be the launch command"
    )
    ws = launch_world_size(path)
    recipe = load_recipe(path, world_size=ws)
    ds = resolve_ds_config(recipe, ws)
    check_sequence_parallel(recipe, paths=False)
    dp = recipe.data_parallel_size(ws)
    assert ds["train_batch_size"] == recipe.micro_batch_size * recipe.grad_accum_steps * dp
    assert "gradient_clipping" in ds


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_is_engine_settings_only(path):
    ds = json.loads(path.read_text())
    assert not set(RECIPE_OWNED_DS_KEYS) & ds.keys()
    assert ds["bf16"]["enabled"] == path.stem.endswith("bf16")
    assert zero_stage(ds) == (2 if path.stem.startswith("zero2") else 3)
    offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu"
    assert offload == ("offload" in path.stem)
