"""Boundary packing on a tiny random model: packed per-document losses (and their gradients) equal
unpacked ones, for sdpa and eager attention, on real sonnet and ChatterBot samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from irdro.config import ConfigError
from irdro.data import collate, collate_packed
from irdro.model import block_causal_mask, packed_forward, packed_sample_nll, per_sample_nll
from irdro.prepare import prepare
from irdro.shards import ShardDataset

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
SEQ_LEN = 64
TINY = {
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=32,
        dropout=0.0,
    ),
}


@pytest.fixture(scope="module")
def samples(tmp_path_factory, gpt2_tokenizer_dir) -> list:
    """12 real samples: sonnet chunks (fully supervised) and alpaca pairs (prompt masked)."""
    tmp = tmp_path_factory.mktemp("packing")
    kw = dict(seq_len=SEQ_LEN, progress=False)
    prepare([str(ROOT / "tests/fixtures/shakespeare/sonnets.jsonl")], str(gpt2_tokenizer_dir), str(tmp / "text"), **kw)
    prepare(
        [str(ROOT / "tests/fixtures/chatterbot/alpaca.jsonl")],
        str(gpt2_tokenizer_dir),
        str(tmp / "alpaca"),
        format="alpaca",
        **kw,
    )
    text, alpaca = ShardDataset(tmp / "text"), ShardDataset(tmp / "alpaca")
    picked = [text[i] for i in (0, 3, 7, 11, 30, 41)] + [alpaca[i] for i in (0, 5, 9, 17, 40, 66)]
    assert any((s.labels == -100).any() for s in picked)  # some prompts are masked
    return picked


def tiny_model(kind: str, attention: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(kind, vocab_size=50257, **TINY[kind])
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attention).eval()


def unpacked(model, samples):
    batch = collate(samples, pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_nll(logits, batch["labels"])


def packed(model, samples, seq_len: int = 2 * SEQ_LEN):
    batch = collate_packed(samples, pad_id=0, seq_len=seq_len)
    assert batch["input_ids"].shape[0] < len(samples)  # rows really hold several documents
    logits = packed_forward(model, batch)
    return packed_sample_nll(logits, batch["labels"], batch["segment_ids"], len(samples))


@pytest.mark.parametrize(("kind", "attention"), [("llama", "sdpa"), ("llama", "eager"), ("opt", "sdpa")])
def test_packed_losses_and_gradients_equal_unpacked(samples, kind: str, attention: str) -> None:
    model = tiny_model(kind, attention)
    weights = torch.linspace(0.5, 1.5, len(samples))  # a reweighting: per-sample matters

    def run(fn):
        model.zero_grad()
        losses, counts = fn(model, samples)
        (weights * losses).sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        return losses.detach(), counts, grads

    ref_losses, ref_counts, ref_grads = run(unpacked)
    got_losses, got_counts, got_grads = run(packed)
    diff = float((ref_losses - got_losses).abs().max())
    print(f"\nmax |loss packed - unpacked| {kind}/{attention}: {diff:.2e}")
    assert diff <= TOL
    assert torch.equal(ref_counts, got_counts) and bool((ref_counts > 0).all())
    grad_diff = float((ref_grads - got_grads).abs().max())
    print(f"max |grad packed - unpacked| {kind}/{attention}: {grad_diff:.2e}")
    assert grad_diff <= TOL


@torch.no_grad()
def test_without_the_block_mask_documents_would_leak(samples) -> None:
    """Negative control: the same packed rows under a plain causal mask give other losses."""
    model = tiny_model("llama", "sdpa")
    ref, _ = unpacked(model, samples)
    batch = collate_packed(samples, pad_id=0, seq_len=2 * SEQ_LEN)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    leaky, _ = packed_sample_nll(logits, batch["labels"], batch["segment_ids"], len(samples))
    assert float((ref - leaky).abs().max()) > 1e-3


def test_block_causal_mask() -> None:
    seg = torch.tensor([[0, 0, 1, -1]])
    allowed = block_causal_mask(seg, "sdpa", torch.float32)
    assert allowed.shape == (1, 1, 4, 4) and allowed.dtype == torch.bool
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    additive = block_causal_mask(seg, "eager", torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed)


def test_segment_boundaries_are_not_supervised() -> None:
    """Only in-segment targets count, even if a label at a segment start is not -100."""
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, -100]])
    seg = torch.tensor([[0, 0, 1, 1, -1]])
    losses, counts = packed_sample_nll(logits, labels, seg, 2)
    assert counts.tolist() == [1, 1]  # targets 2 (sample 0) and 4 (sample 1); 3 crosses
    logp = logits.log_softmax(-1)
    assert torch.allclose(losses, torch.stack([-logp[0, 0, 2], -logp[0, 2, 4]]))


def test_unsupported_attention_is_refused_naming_the_key(samples) -> None:
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flex_attention"
    batch = collate_packed(samples[:2], pad_id=0, seq_len=SEQ_LEN)
    with pytest.raises(ConfigError, match="data.packing: .*'flex_attention'"):
        packed_forward(model, batch)
