"""A recipe path that is not there is a one-line error naming the key and the command that makes
it, from irdro.validate, irdro.train's start and the model loaders, and never a model hub lookup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from irdro.config import ConfigError, ModelConfig, recipe_from_dict, resolve_ds_config

ROOT = Path(__file__).resolve().parents[2]
# HF_HUB_OFFLINE only so that a regression cannot reach the network from a test; the code under
# test must not need it.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def inputs(tmp_path: Path) -> dict[str, Path]:
    """Every path a recipe can name, created under tmp_path (folders empty: nothing reads them)."""
    paths = {
        "model.path": tmp_path / "model",
        "model.tokenizer": tmp_path / "tok",
        "data.train": tmp_path / "shards" / "train",
        "data.eval": tmp_path / "shards" / "eval",
    }
    for p in paths.values():
        p.mkdir(parents=True)
    paths["ds_config"] = ROOT / "ds_configs" / "zero3_fp32.json"
    return paths


def raw_recipe(paths: dict[str, Path], missing: str | None = None) -> dict:
    """A recipe naming `paths` (a model folder for model.path, else an inline config and a
    tokenizer); the key `missing` names a path that does not exist."""
    p = {k: str(v) for k, v in paths.items()}
    if missing is not None:
        p[missing] = str(Path(p[missing]).parent / "nope")
    model = (
        {"path": p["model.path"]}
        if missing == "model.path"
        else {"config": {"model_type": "llama"}, "tokenizer": p["model.tokenizer"]}
    )
    return {
        "output_dir": "runs/x",
        "model": model,
        "ds_config": p["ds_config"],
        "data": {"train": p["data.train"], "eval": p["data.eval"]},
    }


KEYS = ["model.path", "model.tokenizer", "data.train", "data.eval", "ds_config"]


@pytest.mark.parametrize("key", KEYS)
def test_missing_path_names_the_key(tmp_path, key):
    from irdro.paths import check_local_paths

    paths = inputs(tmp_path)
    check_local_paths(recipe_from_dict(raw_recipe(paths)))
    recipe = recipe_from_dict(raw_recipe(paths, missing=key))
    with pytest.raises(ConfigError, match=rf"^{key}: \S+nope does not exist; ") as e:
        check_local_paths(recipe)
    assert "\n" not in str(e.value)


def test_missing_ds_config_reads_the_same_from_the_merge(tmp_path):
    recipe = recipe_from_dict(raw_recipe(inputs(tmp_path), missing="ds_config"))
    with pytest.raises(ConfigError, match=r"^ds_config: \S+nope does not exist; pick one of ds_c"):
        resolve_ds_config(recipe, 1)


@pytest.mark.parametrize("key", KEYS)
def test_validate_cli_reports_a_missing_path_in_one_line(tmp_path, key):
    file = tmp_path / "r.yaml"
    file.write_text(yaml.safe_dump(raw_recipe(inputs(tmp_path), missing=key)))
    proc = subprocess.run(
        [sys.executable, "-m", "irdro.validate", str(file)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f": {key}: " in lines[0] and "does not exist" in lines[0], lines
    skip = subprocess.run(
        [sys.executable, "-m", "irdro.validate", str(file), "--no-path-checks"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert skip.returncode == (2 if key == "ds_config" else 0), skip.stderr  # the JSON is read


def test_tokenizer_folder_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    import transformers

    from irdro.model import load_tokenizer

    def hub(*args, **kwargs):
        raise AssertionError(f"transformers was asked for {args} {kwargs}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub)
    missing = tmp_path / "assets" / "gpt2-tokenizer"
    cfg = ModelConfig(config={"model_type": "llama"}, tokenizer=str(missing))
    with pytest.raises(
        ConfigError,
        match=rf"^model.tokenizer: {missing} does not exist; make it "
        rf"with `python tools/fetch_assets.py gpt2-tokenizer --output {missing}`$",
    ):
        load_tokenizer(cfg)
    # a bare hub id is a local path like any other
    with pytest.raises(ConfigError, match=r"^model.path: org-x/no-such-model does not exist; .*hf download"):
        load_tokenizer(ModelConfig(path="org-x/no-such-model"))


def test_existing_folders_load_with_local_files_only(tmp_path, monkeypatch):
    import transformers

    from irdro.model import load_model, load_tokenizer

    calls = []

    def record(path, **kwargs):
        calls.append((path, kwargs.get("local_files_only")))
        raise OSError(f"no files in {path}\nsecond line")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    cfg = ModelConfig(path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^model.path: cannot load a tokenizer from .*in \S+$"):
        load_tokenizer(cfg)
    with pytest.raises(ConfigError, match=r"^model.path: cannot load a model from .*in \S+$"):
        load_model(cfg, {"zero_optimization": {"stage": 0}})
    assert calls == [(str(tmp_path), True), (str(tmp_path), True)]


@pytest.mark.parametrize(
    ("key", "value", "how"),
    [
        (
            "model.tokenizer",
            "assets/gpt2-tokenizer",
            "make it with `make demo-data` (or `python "
            "tools/fetch_assets.py gpt2-tokenizer --output assets/gpt2-tokenizer`)",
        ),
        (
            "data.eval",
            "./data/sonnets/eval",
            "make it with `make demo-data` (or `python tools/"
            "prepare_data.py --input FILE --tokenizer TOK --output data/sonnets --eval-fraction 0.1`)",
        ),
        (
            "data.train",
            "/x/shards",
            "make it with `python tools/prepare_data.py --input FILE --tokenizer TOK --output /x/shards`",
        ),
        (
            "model.path",
            "assets/smollm2-135m",
            "make it with `python tools/fetch_assets.py smollm2 --output assets/smollm2-135m`",
        ),
        (
            "model.path",
            "facebook/opt-125m",
            "irdro never downloads from the model hub: `hf download "
            "facebook/opt-125m --local-dir models/opt-125m`, then set model.path=models/opt-125m",
        ),
        (
            "model.path",
            "models/opt-125m",
            "it must be a local Hugging Face folder (irdro never "
            "downloads): `hf download ORG/NAME --local-dir models/opt-125m`",
        ),
    ],
)
def test_how_to_make(key, value, how):
    from irdro.paths import how_to_make

    assert how_to_make(key, value, tokenizer="TOK") == how


def test_file_where_a_folder_is_needed(tmp_path):
    from irdro.paths import check_local_paths

    paths = inputs(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")
    paths["data.train"] = tmp_path / "train.jsonl"
    with pytest.raises(ConfigError, match=r"^data.train: \S+ is a file; name the shard directory"):
        check_local_paths(recipe_from_dict(raw_recipe(paths)))
