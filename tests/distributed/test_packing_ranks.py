"""Boundary packing end to end: 2 gloo ranks, ZeRO-3, IR-DRO window `step`, SGD. Packing only
changes how a micro-batch's samples are laid out, so the parameters after the run, the logged
window statistics and the eval loss must match an unpacked run on the same data."""

from __future__ import annotations

import pytest

from irdro.testing import run_ranks

pytestmark = pytest.mark.distributed
TOL = 1e-5


def test_packed_training_equals_unpacked(base_recipe, alpaca_split) -> None:
    from irdro.data import collate_packed
    from irdro.shards import ShardDataset

    data = {"train": str(alpaca_split / "train"), "eval": str(alpaca_split / "eval")}
    runs = {}
    for packing in ("none", "boundary"):
        recipe = base_recipe(
            max_steps=2, micro_batch_size=4, data={**data, "packing": packing}, eval={"max_samples": 8}
        )
        run = run_ranks(recipe, 2)
        for rank in run.ranks:
            assert rank.returncode == 0, f"rank failed: {rank.error}\n{rank.log[-3000:]}"
        runs[packing] = run
    a, b = runs["none"], runs["boundary"]
    diff = max(float((a.state_dict[k] - b.state_dict[k]).abs().max()) for k in a.state_dict)
    print(f"\nmax |dparam| packed vs unpacked (ws2, 2 steps): {diff:.3e}")
    assert diff <= TOL
    for ra, rb in zip(a.records, b.records, strict=True):
        for key in ("loss", "weighted_loss", "ess", "eval_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) < TOL, key
        assert ra["tokens"] == rb["tokens"]
    # the comparison has teeth: the micro-batches really were packed into fewer rows
    train = ShardDataset(data["train"])
    batch = collate_packed([train[i] for i in range(4)], pad_id=0, seq_len=128)
    assert batch["input_ids"].shape[0] < 4
