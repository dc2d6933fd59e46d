"""Fixtures for multi-rank tests: a saved tiny model (identical init for every run) and shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import FIXTURES, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def sonnet_shards(tmp_path_factory, gpt2_tokenizer_dir, sonnets_jsonl) -> Path:
    from irdro.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "sonnets"
    prepare(
        [str(sonnets_jsonl)], str(gpt2_tokenizer_dir), str(out), seq_len=48, eval_fraction=0.1, seed=0, progress=False
    )
    assert json.loads((out / "train" / "manifest.json").read_text())["num_samples"] > 100
    return out


@pytest.fixture(scope="session")
def alpaca_split(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """ChatterBot pairs (prompt-masked, 20-60 tokens) with seq_len 128: rows hold several."""
    from irdro.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "alpaca"
    prepare(
        [str(FIXTURES / "chatterbot" / "alpaca.jsonl")],
        str(gpt2_tokenizer_dir),
        str(out),
        format="alpaca",
        seq_len=128,
        eval_fraction=0.1,
        progress=False,
    )
    return out


@pytest.fixture
def base_recipe(tmp_path, tiny_model_dir, gpt2_tokenizer_dir, sonnet_shards):
    """A 3-step SGD recipe on the tiny model; tests override what they compare."""

    def make(**kw) -> dict:
        r = {
            "output_dir": str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"),
            "seed": 0,
            "max_steps": 3,
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "ds_config": "ds_configs/zero3_fp32.json",
            "ds_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
            "model": {
                "path": str(tiny_model_dir),
                "tokenizer": str(gpt2_tokenizer_dir),
                "attention": "sdpa",
            },
            "data": {"train": str(sonnet_shards / "train")},
            "reweight": {"scheme": "irdro", "lam": 0.5, "window": "step"},
            "optim": {"name": "sgd", "lr": 0.5, "grad_clip": 0.0, "scheduler": "constant"},
            "checkpoint": {"at_end": False},
            "log": {"tensorboard": False, "progress": False},
        }
        for key, value in kw.items():
            node = r
            *parents, leaf = key.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return r

    return make
