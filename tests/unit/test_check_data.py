"""train.check_data: shards from another tokenizer, or with ids past the model's vocab, are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_shards
from transformers import AutoTokenizer

from irdro.config import ConfigError
from irdro.data import ShardDataset, ShardWriter, tokenizer_fingerprint
from irdro.train import check_data


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


def test_other_tokenizer_is_refused_naming_both(tmp_path: Path, tokenizer) -> None:
    data = ShardDataset(write_shards(tmp_path / "ds", [[1, 2, 3]]))  # tokenizer "test", hash 0...
    want = tokenizer_fingerprint(tokenizer)
    with pytest.raises(ConfigError) as e:
        check_data(data, tokenizer, 50257, "data.train")
    msg = str(e.value)
    assert msg.startswith("data.train: shards were tokenised with test (hash 000000000000)")
    assert f"model's tokenizer is {tokenizer.name_or_path} (hash {want[:12]})" in msg


def test_matching_tokenizer_passes_and_vocab_is_checked(tmp_path: Path, tokenizer) -> None:
    with ShardWriter(tmp_path / "ds", vocab_size=len(tokenizer), tokenizer_name="gpt2",
                     tokenizer_hash=tokenizer_fingerprint(tokenizer), seq_len=8,
                     eos_token_id=50256, pad_token_id=None) as w:  # fmt: skip
        w.add([15496, 995], doc_id=0, chunk_id=0)
        w.finalize()
    data = ShardDataset(tmp_path / "ds")
    check_data(data, tokenizer, 50257, "data.eval")
    with pytest.raises(ConfigError, match="data.eval: shard vocab 50257 > model vocab 50000"):
        check_data(data, tokenizer, 50000, "data.eval")
