"""Mixtures: the blended order (irdro.data.BlendOrder, Mixture), group_dro's alpha (irdro.reweight),
and the recipe's `data.train: [{path, weight, name}]` checks (irdro.config, irdro.validate)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_samples, write_shards

from irdro import reweight
from irdro.config import ConfigError, Recipe, load_recipe, recipe_from_dict
from irdro.data import Batches, BlendOrder, GlobalOrder, Mixture, collate, sample_positions
from irdro.shards import ShardDataset

WEIGHTS = [
    [1.0],
    [0.5, 0.5],
    [0.7, 0.3],
    [0.4, 0.3, 0.3],
    [2, 1, 1, 0],
    [0.67, 0.15, 0.045, 0.045, 0.025, 0.045, 0.02],  # LLaMA-1's pre-training mixture
    [0.522, 0.267, 0.052, 0.042, 0.046, 0.038, 0.033],  # SlimPajama-627B's
    [1 / 3, 1 / 3, 1 / 3],
    [0.999, 0.001],
]


def achieved_error(order: BlendOrder, n: int) -> float:
    """max over prefixes 1..n and sources of |picks_d(prefix) - share_d * prefix|, in samples."""
    sources, _ = order.locate(np.arange(n))
    counts = np.cumsum(np.eye(order.num_sources, dtype=np.int64)[sources], axis=0)
    prefix = np.arange(1, n + 1)[:, None]
    return float(np.abs(counts - order.shares[None, :] * prefix).max())


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: f"{len(w)}src")
def test_every_prefix_is_within_one_sample_of_the_targets(weights):
    """|achieved share - target| <= 1/len in every prefix of the order (the Pfair bound is < 1 sample);
    the schedule computed once per period equals the one computed block by block (BLOCK shrunk to
    1000 so 20,000 positions span 20 blocks, which join seamlessly)."""
    order = BlendOrder(weights, [7] * len(weights), seed=0)
    blocks = BlendOrder(weights, [7] * len(weights), seed=0)
    blocks.BLOCK, blocks.MAX_PERIOD = 1000, 0
    pos = np.arange(20_000)
    assert all((a == b).all() for a, b in zip(order.locate(pos), blocks.locate(pos), strict=True))
    assert (order.picks_before(12_345) == blocks.picks_before(12_345)).all()
    err = achieved_error(blocks, 20_000)
    print(f"\n{len(weights)} sources {np.round(order.shares, 4).tolist()}: max |picks - share x n| = {err:.4f}")
    assert err < 1.0
    assert (order.picks_before(20_000) == np.bincount(order.locate(np.arange(20_000))[0], minlength=len(weights))).all()


def test_random_mixtures_stay_within_one_sample_where_the_lag_rule_does_not():
    """Megatron's rule (pick argmax_d share_d * (n + 1) - picks_d) drifts past one sample on some of
    these mixtures; the blended order never does."""
    rng = np.random.default_rng(0)
    worst, worst_lag = 0.0, 0.0
    for _ in range(60):
        k = int(rng.integers(2, 9))
        weights = [round(float(w), 4) for w in rng.dirichlet(np.full(k, rng.choice([0.2, 1.0, 5.0])))]
        if sum(weights) <= 0:
            continue
        order = BlendOrder(weights, [5] * k, seed=1)
        worst = max(worst, achieved_error(order, 3000))
        counts, share = np.zeros(k), order.shares
        for n in range(3000):  # the lag rule, for comparison
            counts[int(np.argmax(share * (n + 1) - counts))] += 1
            worst_lag = max(worst_lag, float(np.abs(counts - share * (n + 1)).max()))
    print(f"\n60 random mixtures, 3000 positions: blended order max error {worst:.4f}, lag rule {worst_lag:.4f}")
    assert worst < 1.0 < worst_lag


def test_a_source_reads_its_own_permutation_and_repeats_by_epochs():
    order = BlendOrder([0.75, 0.25], [12, 3], seed=5)
    sources, index = order.locate(np.arange(48))
    small = index[sources == 1]
    assert len(small) == 12  # 4 epochs of 3
    for epoch in range(4):
        assert sorted(small[3 * epoch : 3 * epoch + 3].tolist()) == [0, 1, 2]
        expected = GlobalOrder(3, 5, stream=1).permutation(epoch)
        assert small[3 * epoch : 3 * epoch + 3].tolist() == expected.tolist()
    assert order.picks_before(48).tolist() == [36, 12]
    assert order.picks_before(0).tolist() == [0, 0]


def test_the_order_is_a_function_of_the_position_alone():
    """A fresh order asked for positions far ahead (a resume) gives what one that walked there gives."""
    walked = BlendOrder([0.5, 0.3, 0.2], [40, 30, 7], seed=3)
    walked.BLOCK, walked.MAX_PERIOD = 256, 0
    full = walked.locate(np.arange(5000))
    fresh = BlendOrder([0.5, 0.3, 0.2], [40, 30, 7], seed=3)
    fresh.BLOCK, fresh.MAX_PERIOD = 256, 0
    tail = fresh.locate(np.arange(4000, 5000))
    assert (tail[0] == full[0][4000:]).all() and (tail[1] == full[1][4000:]).all()


def make_mixture(tmp_path: Path, sizes=(20, 12, 5), weights=(0.5, 0.3, 0.2)) -> Mixture:
    datasets = [ShardDataset(write_shards(tmp_path / f"s{d}", random_samples(n, seed=d))) for d, n in enumerate(sizes)]
    return Mixture([f"s{d}" for d in range(len(sizes))], list(weights), datasets)


def recipe(**kw) -> Recipe:
    base = dict(output_dir="x", model={"config": {"model_type": "llama"}, "tokenizer": "t"}, data={"train": "x"})
    return recipe_from_dict({**base, **kw})


def step_ids(batches: Batches, step: int) -> list[int]:
    return [int(i) for b in batches.step(step) for i in b["sample_ids"]]


def test_one_and_two_ranks_and_a_resume_read_the_same_global_batches(tmp_path):
    mix = make_mixture(tmp_path)
    one = Batches(mix, recipe(micro_batch_size=2, grad_accum_steps=2), 0, dp_rank=0, dp_size=1)
    two = [Batches(mix, recipe(micro_batch_size=2), 0, dp_rank=r, dp_size=2) for r in range(2)]
    for step in range(30):  # 120 samples: every source past its first epoch
        ids_one = step_ids(one, step)
        ids_two = [i for b in two for i in step_ids(b, step)]
        assert sorted(ids_one) == sorted(ids_two)
    resumed = Batches(mix, recipe(micro_batch_size=2, grad_accum_steps=2), 0, dp_rank=0, dp_size=1)
    assert step_ids(resumed, 29) == step_ids(one, 29)


def test_a_one_source_mixture_is_the_dataset_of_a_plain_path(tmp_path):
    """Same samples, ids and tensors as the single-directory order (GlobalOrder over ShardDataset)."""
    data = ShardDataset(write_shards(tmp_path / "d", random_samples(13, seed=4)))
    mix = Mixture(["d"], [0.3], [data], named=False)
    r = recipe(micro_batch_size=3, seed=7)
    batches = Batches(mix, r, 0, dp_rank=1, dp_size=2)
    order = GlobalOrder(len(data), 7)
    for step in range(6):  # 36 samples: about 3 epochs
        got = batches.step(step)[0]
        want = collate([data[int(i)] for i in order[sample_positions(step, 0, 1, 2, 1, 3)]], 0, 8)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert mix.describe(3) == data.describe(3)


def test_mixture_ids_describe_and_source_of(tmp_path):
    mix = make_mixture(tmp_path)
    assert mix.offsets.tolist() == [0, 20, 32, 37] and len(mix) == 37
    assert mix.source_of(np.array([0, 19, 20, 31, 32, 36])).tolist() == [0, 0, 1, 1, 2, 2]
    s = mix[33]
    assert s.sample_id == 33 and np.array_equal(s.input_ids, mix.datasets[2][1].input_ids)
    assert mix.describe(33)["source"] == "s2"
    with pytest.raises(IndexError):
        mix[37]


def test_group_dro_alpha_matches_a_hand_computation():
    losses = torch.tensor([2.0, 4.0, 1.0, 3.0, 5.0])
    sources = torch.tensor([0, 0, 1, 1, 2])
    alpha = prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    eta, smooth = 0.5, 0.1
    # by hand: L = (3, 2, 5); alpha * exp(eta L) normalised; mixed with the prior
    raw = [0.5 * math.exp(1.5), 0.3 * math.exp(1.0), 0.2 * math.exp(2.5)]
    moved = [x / sum(raw) for x in raw]
    want = [(1 - smooth) * m + smooth * q for m, q in zip(moved, [0.5, 0.3, 0.2], strict=True)]
    got = reweight.group_dro_alpha(losses, sources, alpha, prior, eta, smooth)
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # sample weights: alpha_d / prior_d per sample, normalised
    ratio = [want[d] / [0.5, 0.3, 0.2][d] for d in sources.tolist()]
    w = reweight.compute_weights(
        losses, "group_dro", sources=sources, alpha=alpha, prior=prior, eta=eta, smoothing=smooth
    )
    assert w.tolist() == pytest.approx([r / sum(ratio) for r in ratio], abs=1e-6)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)


def test_group_dro_absent_source_keeps_its_alpha_and_eta_zero_is_uniform():
    alpha, prior = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.4, 0.4, 0.2])
    got = reweight.group_dro_alpha(torch.tensor([1.0, 9.0]), torch.tensor([0, 1]), alpha, prior, 1.0, 0.0)
    assert float(got[2]) == pytest.approx(0.3, abs=1e-12) and float(got[:2].sum()) == pytest.approx(0.7, abs=1e-12)
    assert float(got[1]) > 0.5  # the harder present source gained
    losses, src = torch.tensor([1.0, 2.0, 7.0, 3.0]), torch.tensor([0, 1, 1, 2])
    w = reweight.compute_weights(
        losses, "group_dro", sources=src, alpha=prior.double(), prior=prior, eta=0.0, smoothing=0.0
    )
    assert w.tolist() == pytest.approx([0.25] * 4, abs=1e-7)


def write_recipe(tmp_path: Path, train) -> Path:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "run"),
                "model": {"config": {"model_type": "llama"}, "tokenizer": str(tmp_path)},
                "data": {"train": train},
                "max_steps": 10,
                "micro_batch_size": 4,
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            [{"path": "a", "weight": 0}, {"path": "b", "weight": 0.0}],
            "data.train: the source weights sum to 0; give at least one source (of a, b) a weight > 0",
        ),
        ([{"path": "a", "weight": -1}], "data.train[0].weight: must be a finite number >= 0, got -1.0 (source 'a')"),
        (
            [{"path": "x/train"}, {"path": "y/train"}],
            "data.train[1].name: source 'train' is also data.train[0]; give each source its own name",
        ),
        ([{"path": "a", "name": "a b"}], "data.train[0].name: 'a b' may hold only letters"),
        ([{"weight": 1}], "data.train[0].path: required"),
        ([], "data.train: required"),
        ([{"path": "a", "wieght": 1}], "unknown key data.train[0].wieght; did you mean data.train[0].weight?"),
        ("a", "reweight.scheme: group_dro weights the sources of a mixture: give data.train as a list"),
        ([{"path": "a"}], "reweight.scheme: group_dro weights the sources of a mixture"),
    ],
    ids=["zero-sum", "negative", "duplicate", "bad-name", "no-path", "empty", "typo", "plain", "one-source"],
)
def test_bad_sources_are_one_line_errors_naming_them(tmp_path, train, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write_recipe(tmp_path, train), ["reweight.scheme=group_dro"] if "group_dro" in message else [])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_validate_names_a_missing_source_and_prints_each_share(tmp_path, capsys):
    from irdro.validate import main

    a = write_shards(tmp_path / "a", random_samples(40))
    b = write_shards(tmp_path / "b", random_samples(10, seed=1))
    path = write_recipe(tmp_path, [{"path": str(a), "weight": 3}, {"path": str(tmp_path / "gone"), "name": "bee"}])
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: data.train[1] (bee):") and str(tmp_path / "gone") in err
    assert err.count("\n") == 1
    path = write_recipe(tmp_path, [{"path": str(a), "weight": 3}, {"path": str(b), "name": "bee"}])
    assert main([str(path), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "# data.train: 2 sources blended over 80 samples (10 steps)" in out
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("#   ")}
    assert "share 75.00%" in lines["a"] and "samples         40" in lines["a"] and "epochs    1.500" in lines["a"]
    assert "share 25.00%" in lines["bee"] and "epochs    2.000" in lines["bee"]


def test_per_source_metrics_reach_tensorboard_as_scalars(tmp_path):
    """metrics.jsonl keys `source/NAME/...` become TensorBoard scalars of the same tag; an absent
    source's null loss is left out of TensorBoard and kept as null in the JSON line."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from irdro.metrics import RankZeroLogger

    logger = RankZeroLogger(tmp_path, total_steps=2, tensorboard=True, progress=False)
    logger.log({"step": 1, "loss": 2.0, "source/bible/weight_share": 0.25, "source/bible/loss": None})
    logger.log({"step": 2, "loss": 1.5, "source/bible/weight_share": 0.5, "source/bible/loss": 3.0})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"source/bible/weight_share", "source/bible/loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("source/bible/weight_share")] == [(1, 0.25), (2, 0.5)]
    assert [e.step for e in events.Scalars("source/bible/loss")] == [2]
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["source/bible/loss"] is None


def test_group_dro_needs_a_positive_smoothing_and_listed_names_are_filled_in(tmp_path):
    from irdro.config import dump_yaml

    path = write_recipe(tmp_path, [{"path": "x/shakespeare"}, {"path": "y/bible", "weight": 2}])
    with pytest.raises(ConfigError, match=r"^reweight.smoothing: must be in \(0, 1\]"):
        load_recipe(path, ["reweight.scheme=group_dro", "reweight.smoothing=0"])
    r = load_recipe(path, ["reweight.scheme=group_dro"])
    assert [s.name for s in r.data.train] == ["shakespeare", "bible"]
    assert "name: bible" in dump_yaml(r)  # recipe.yaml shows the names the metrics use


def test_resume_refuses_other_sources_or_weights_and_restores_alpha():
    from irdro.normalize import Sources
    from irdro.train import restore_sources

    def mixture(names=("a", "b"), shares=(0.75, 0.25)) -> Sources:
        return Sources([0, 3, 6], list(shares), list(names))

    saved = mixture()
    saved.alpha = torch.tensor([0.6, 0.4], dtype=torch.float64)
    state = {"sources": saved.describe(), "group_alpha": saved.alpha.tolist()}
    same = mixture()
    restore_sources(same, state, "ckpt")
    assert same.alpha.tolist() == [0.6, 0.4]
    for other in (mixture(shares=(0.5, 0.5)), mixture(names=("a", "c")), Sources([0, 6], [1.0])):
        with pytest.raises(ConfigError) as e:
            restore_sources(other, state, "ckpt")
        assert str(e.value).startswith("data.train: ckpt was written by a run over a 0.75, b 0.25; this recipe blends")
    one = Sources([0, 6], [1.0], ["a"])
    restore_sources(one, {"step": 3}, "ckpt")  # a plain-path checkpoint, a one-source list: the same order
    with pytest.raises(ConfigError, match="over one shard directory; this recipe blends a 0.75, b 0.25"):
        restore_sources(mixture(), {"step": 3}, "ckpt")
