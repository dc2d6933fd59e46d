"""train.check_shards: shards from another tokenizer, or with ids past the model's vocab, are refused;
the shards' chat template reaches the tokenizer, hf/ and the export, or a
mismatch is refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import write_shards
from transformers import AutoTokenizer

from irdro.config import ConfigError, recipe_from_dict
from irdro.shards import (
    MANIFEST_NAME,
    DataError,
    ShardDataset,
    ShardWriter,
    chat_template_sha256,
    tokenizer_fingerprint,
)
from irdro.train import check_shards, write_run_files


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


def test_other_tokenizer_is_refused_naming_both(tmp_path: Path, tokenizer) -> None:
    data = ShardDataset(write_shards(tmp_path / "ds", [[1, 2, 3]]))  # tokenizer "test", hash 0...
    want = tokenizer_fingerprint(tokenizer)
    with pytest.raises(ConfigError) as e:
        check_shards(tokenizer, {"data.train": data}, 50257)
    msg = str(e.value)
    assert msg.startswith("data.train: shards were tokenised with test (hash 000000000000)")
    assert f"model's tokenizer is {tokenizer.name_or_path} (hash {want[:12]})" in msg


def test_matching_tokenizer_passes_and_vocab_is_checked(tmp_path: Path, tokenizer) -> None:
    with ShardWriter(
        tmp_path / "ds",
        vocab_size=len(tokenizer),
        tokenizer_name="gpt2",
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        seq_len=8,
        eos_token_id=50256,
        pad_token_id=None,
    ) as w:
        w.add([15496, 995], doc_id=0, chunk_id=0)
        w.finalize()
    data = ShardDataset(tmp_path / "ds")
    check_shards(tokenizer, {"data.eval": data}, 50257)
    with pytest.raises(ConfigError, match="data.eval: shard vocab 50257 > model vocab 50000"):
        check_shards(tokenizer, {"data.eval": data}, 50000)


# ----------------------------------------------------------------------------- chat template

TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
OTHER = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _chat_shards(path: Path, tokenizer, template: str, *, with_text: bool = True) -> ShardDataset:
    """Chat-format shards as tools/prepare_data.py writes them; without the template's text as
    irdro wrote them before it recorded it."""
    meta = {"chat_template_sha256": chat_template_sha256(template)}
    if with_text:
        meta["chat_template"] = template
    with ShardWriter(
        path,
        vocab_size=len(tokenizer),
        tokenizer_name="gpt2",
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        seq_len=8,
        eos_token_id=50256,
        pad_token_id=None,
        format="chat",
        meta=meta,
    ) as w:
        w.add([15496, 995], doc_id=0, chunk_id=0, mask=np.array([False, True]))
        w.finalize()
    return ShardDataset(path)


@pytest.fixture
def bare_tokenizer(gpt2_tokenizer_dir: Path):
    """A fresh GPT-2 tokenizer (no chat template); the check may modify it."""
    tok = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    assert not tok.chat_template
    return tok


def test_tokenizer_without_template_adopts_the_shards_and_hf_and_export_carry_it(
    tmp_path: Path, bare_tokenizer, monkeypatch, caplog
) -> None:
    data = _chat_shards(tmp_path / "ds", bare_tokenizer, TEMPLATE)
    assert data.chat_template == TEMPLATE
    with caplog.at_level(logging.INFO, logger="irdro.train"):
        check_shards(bare_tokenizer, {"data.train": data, "data.eval": None})
    assert bare_tokenizer.chat_template == TEMPLATE
    assert "has no chat template: using data.train's" in caplog.text

    # hf/ (written at the start of the run) and the export made from it carry the template
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg)
    run = tmp_path / "run"
    recipe = recipe_from_dict(
        {
            "output_dir": str(run),
            "data": {"train": str(data.path)},
            "model": {"config": {"model_type": "llama"}, "tokenizer": "tok"},
        }
    )
    write_run_files(recipe, {}, model, bare_tokenizer)
    assert AutoTokenizer.from_pretrained(run / "hf").chat_template == TEMPLATE

    import irdro.export

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(irdro.export, "resolve_tag", lambda run_dir, tag: run_dir)
    monkeypatch.setattr(irdro.export, "consolidated_fp32", lambda tag_dir: state)
    irdro.export.export_hf(run, tmp_path / "export", dtype="fp32", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "export").chat_template == TEMPLATE


def test_same_template_passes_and_a_different_one_is_refused_naming_both(tmp_path: Path, bare_tokenizer) -> None:
    data = _chat_shards(tmp_path / "ds", bare_tokenizer, TEMPLATE)
    bare_tokenizer.chat_template = TEMPLATE
    check_shards(bare_tokenizer, {"data.train": data})
    assert bare_tokenizer.chat_template == TEMPLATE

    bare_tokenizer.chat_template = OTHER
    with pytest.raises(ConfigError) as e:
        check_shards(bare_tokenizer, {"data.train": data})
    msg = str(e.value)
    assert msg.startswith(
        f"data.train: shards were prepared with chat template sha256 {chat_template_sha256(TEMPLATE)[:12]} "
        f"({data.path})"
    )
    assert f"the tokenizer {bare_tokenizer.name_or_path} has chat template sha256 " in msg
    assert chat_template_sha256(OTHER)[:12] in msg and "point model.tokenizer" in msg
    assert bare_tokenizer.chat_template == OTHER  # left as it was


def test_train_and_eval_with_different_templates_are_refused(tmp_path: Path, bare_tokenizer) -> None:
    train = _chat_shards(tmp_path / "train", bare_tokenizer, TEMPLATE)
    evl = _chat_shards(tmp_path / "eval", bare_tokenizer, OTHER)
    with pytest.raises(ConfigError) as e:
        check_shards(bare_tokenizer, {"data.train": train, "data.eval": evl})
    msg = str(e.value)
    assert msg.startswith(
        f"data.eval: shards were prepared with chat template sha256 {chat_template_sha256(OTHER)[:12]}"
    )
    assert f"but data.train's with {chat_template_sha256(TEMPLATE)[:12]} ({train.path})" in msg
    assert not bare_tokenizer.chat_template


def test_text_shards_leave_the_tokenizer_alone(tmp_path: Path, bare_tokenizer) -> None:
    hash = tokenizer_fingerprint(bare_tokenizer)
    data = ShardDataset(write_shards(tmp_path / "ds", [[1, 2, 3]], tokenizer_hash=hash))
    assert data.chat_template is None and data.chat_template_sha256 is None
    check_shards(bare_tokenizer, {"data.train": data, "data.eval": None})
    assert not bare_tokenizer.chat_template


def test_hash_only_manifest_needs_a_tokenizer_with_the_template(tmp_path: Path, bare_tokenizer) -> None:
    data = _chat_shards(tmp_path / "ds", bare_tokenizer, TEMPLATE, with_text=False)
    with pytest.raises(ConfigError, match="has none, and .* holds only the hash .* re-run tools/prepare_data.py"):
        check_shards(bare_tokenizer, {"data.train": data})
    bare_tokenizer.chat_template = TEMPLATE
    check_shards(bare_tokenizer, {"data.train": data})


def test_manifest_template_not_matching_its_hash_is_refused(tmp_path: Path, bare_tokenizer) -> None:
    data = _chat_shards(tmp_path / "ds", bare_tokenizer, TEMPLATE)
    manifest = json.loads((data.path / MANIFEST_NAME).read_text())
    manifest["chat_template"] = OTHER
    (data.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="'chat_template' does not match 'chat_template_sha256'"):
        ShardDataset(data.path)
