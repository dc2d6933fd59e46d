"""Sequence parallelism without processes: how a batch is cut along the sequence, that the shards'
loss sums add up to the whole rows' losses, and the recipe checks (the multi-rank equivalence is in
tests/distributed/test_sequence_parallel.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from irdro.checkpoint import ResumePoint
from irdro.config import ConfigError, check_parallel_shapes, recipe_from_dict, resolve_ds_config
from irdro.data import collate, make_batch, shard_sequence
from irdro.model import per_sample_nll, target_nll_sums
from irdro.shards import Sample
from irdro.train import check_resume_layout

BASE = {
    "output_dir": "runs/x",
    "model": {"config": {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}, "tokenizer": "t"},
    "data": {"train": "data/x"},
    "parallel": {"sequence_parallel": 2},
}


def samples(lengths: list[int], prompt: int = 3) -> list[Sample]:
    """Samples of the given lengths with the first `prompt` labels masked (an instruction prompt)."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(0, 50, n)
        labels = ids.copy()
        labels[:prompt] = -100
        out.append(Sample(sample_id=i, input_ids=ids, labels=labels, doc_id=i, chunk_id=0))
    return out


def test_shards_hold_the_shifted_labels_and_the_rows_positions():
    batch = collate(samples([13, 7, 16]), pad_id=0, pad_to_multiple_of=8)  # T = 16
    shards = [shard_sequence(batch, k, 2) for k in range(2)]
    assert [s["input_ids"].shape for s in shards] == [(3, 8), (3, 8)]
    joined = {k: torch.cat([s[k] for s in shards], dim=1) for k in ("input_ids", "shift_labels", "position_ids")}
    assert torch.equal(joined["input_ids"], batch["input_ids"])
    assert torch.equal(joined["position_ids"], torch.arange(16).expand(3, 16))
    # the last token of shard 0 predicts the first token of shard 1: shifted before the cut
    assert torch.equal(shards[0]["shift_labels"][:, -1], batch["labels"][:, 8])
    assert torch.equal(joined["shift_labels"][:, :-1], batch["labels"][:, 1:])
    assert (joined["shift_labels"][:, -1] == -100).all()
    assert all(torch.equal(s["sample_ids"], batch["sample_ids"]) for s in shards)
    with pytest.raises(ValueError, match="not a multiple"):
        shard_sequence(batch, 0, 3)


def test_shard_sums_add_up_to_the_whole_rows_losses():
    """What the SP all-reduce adds: per-shard NLL sums and counts give `per_sample_nll` exactly."""
    batch = collate(samples([13, 7, 16, 9]), pad_id=0, pad_to_multiple_of=4)
    logits = torch.randn(*batch["input_ids"].shape, 50, dtype=torch.float64).float()
    losses, counts = per_sample_nll(logits, batch["labels"])
    for sp in (2, 4):
        width = batch["input_ids"].shape[1] // sp
        parts = [
            target_nll_sums(logits[:, k * width : (k + 1) * width], shard_sequence(batch, k, sp)["shift_labels"])
            for k in range(sp)
        ]
        sums, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
        assert torch.equal(n, counts)
        torch.testing.assert_close(sums / n.float(), losses, rtol=0, atol=1e-6)


def test_make_batch_pads_to_a_multiple_of_sp_and_cuts_this_ranks_shard():
    model = {**BASE["model"], "config": {"model_type": "llama", "num_attention_heads": 6, "num_key_value_heads": 3}}
    r = recipe_from_dict({**BASE, "model": model, "parallel": {"sequence_parallel": 3}})
    assert r.sequence_multiple == 24  # lcm(pad_to_multiple_of 8, SP 3)
    batch = make_batch(samples([30, 5]), None, r, pad_id=0, sp_rank=2)
    assert batch["input_ids"].shape == (2, 16) and batch["position_ids"][0, 0] == 32
    assert "attention_mask" not in batch and "labels" not in batch


def test_ds_json_gets_sequence_parallel_size_from_the_recipe():
    ds = resolve_ds_config(recipe_from_dict(BASE, world_size=4), 4)
    assert ds["sequence_parallel_size"] == 2 and ds["train_batch_size"] == 2  # DP 2 x micro 1
    assert "sequence_parallel_size" not in resolve_ds_config(recipe_from_dict({**BASE, "parallel": {}}), 4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model": {**BASE["model"], "attention": "eager"}}, "^model.attention: eager cannot run"),
        ({"data": {"train": "d", "packing": "boundary"}}, "^data.packing: boundary packing cannot be exact"),
        ({"eval": {"micro_batch_size": 3}}, "^eval.micro_batch_size: must be 0 or micro_batch_size"),
    ],
)
def test_what_sequence_parallelism_refuses(override, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({**BASE, **override})


def test_zero2_is_refused_with_sequence_parallelism():
    r = recipe_from_dict({**BASE, "ds_config": "ds_configs/zero2_fp32.json"}, world_size=2)
    with pytest.raises(ConfigError, match="^parallel.sequence_parallel: needs ZeRO stage 3"):
        resolve_ds_config(r, 2)


@pytest.mark.parametrize(
    ("heads", "kv", "sp", "message"),
    [
        (4, 2, 2, None),
        (32, 8, 8, None),
        (32, 4, 8, None),
        (6, 6, 4, "does not divide num_attention_heads 6"),
        (12, 3, 2, "num_key_value_heads 3 .* must divide one another"),
    ],
)
def test_heads_must_split_over_the_sp_group(heads, kv, sp, message):
    cfg = {"num_attention_heads": heads, "num_key_value_heads": kv}
    r = recipe_from_dict({**BASE, "parallel": {"sequence_parallel": sp}, "model": {"path": "m", "tokenizer": "t"}})
    inline = {
        **BASE,
        "parallel": {"sequence_parallel": sp},
        "model": {"config": {"model_type": "llama", **cfg}, "tokenizer": "t"},
    }
    if message is None:
        check_parallel_shapes(r, cfg, "config.json")
        recipe_from_dict(inline)
    else:
        with pytest.raises(ConfigError, match=f"^parallel.sequence_parallel: {sp} .*{message}"):
            check_parallel_shapes(r, cfg, "config.json")
        with pytest.raises(ConfigError, match=f"^parallel.sequence_parallel: {sp} .*{message}"):
            recipe_from_dict(inline)  # an inline config is checked when the recipe loads


def test_resume_with_another_sequence_parallel_layout_is_refused():
    r = recipe_from_dict(BASE)
    same = ResumePoint(Path("ck/step_2"), 2, world_size=1, sequence_parallel=2)
    check_resume_layout(same, r, dp=1)
    check_resume_layout(None, r, dp=1)
    with pytest.raises(
        ConfigError,
        match=r"^parallel: .* 1 data-parallel x 2 sequence-parallel x 1 .* this launch has 2 x 2 x 1",
    ):
        check_resume_layout(same, r, dp=2)
    with pytest.raises(ConfigError, match="2 data-parallel x 1 sequence-parallel x 1 .* this launch has 1 x 2 x 1"):
        check_resume_layout(ResumePoint(Path("ck/step_2"), 2, world_size=2), r, dp=1)
    # without sequence parallelism on either side the elastic path stays open
    check_resume_layout(ResumePoint(Path("ck/step_2"), 2, world_size=2), recipe_from_dict({**BASE, "parallel": {}}), 1)
