"""The window contract on simulated ranks: global weights, padding masks, backward coefficients."""

from __future__ import annotations

import math

import pytest
import torch

from irdro import dist, normalize
from irdro.config import ReweightConfig
from irdro.reweight import compute_weights


def simulate(monkeypatch, per_rank: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cfg, scale):
    """Run reweight_window as each rank in turn, with the all-gather answered from `per_rank`."""
    rows = [
        torch.stack([x.double().reshape(-1), v.double().reshape(-1), i.double().reshape(-1)], 1) for x, v, i in per_rank
    ]
    monkeypatch.setattr(dist, "all_gather_losses", lambda local: torch.stack(rows))
    out = []
    for rank, (losses, valid, ids) in enumerate(per_rank):
        monkeypatch.setattr(dist, "dp_rank", lambda r=rank: r)
        out.append(normalize.reweight_window(losses, valid, ids, cfg, step=0, scale=scale))
    return out


def test_unequal_local_batches_are_masked_and_weights_are_global(monkeypatch):
    cfg = ReweightConfig(scheme="irdro", lam=0.7)
    r0 = (
        torch.tensor([[1.0, 2.0, 3.0]]),
        torch.tensor([[True, True, True]]),
        torch.tensor([[10, 11, 12]]),
    )
    r1 = (
        torch.tensor([[4.0, 99.0, -5.0]]),
        torch.tensor([[True, False, False]]),
        torch.tensor([[13, 0, 0]]),
    )
    w0, w1 = simulate(monkeypatch, [r0, r1], cfg, scale=2)
    expect = compute_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), "irdro", lam=0.7)
    assert torch.allclose(w0.weights, expect) and torch.equal(w0.weights, w1.weights)
    assert torch.allclose(w0.coeffs[0], 2 * expect[:3]) and w1.coeffs[0, 1:].eq(0).all()
    assert torch.allclose(w1.coeffs[0, 0], 2 * expect[3])
    assert w0.num_samples == 4 and w0.ids.tolist() == [10, 11, 12, 13]
    # What DeepSpeed applies: the DP mean of each rank's sum(coeffs * losses) = sum_i p_i l_i.
    applied = (
        sum(float((w.coeffs * torch.nan_to_num(r[0]) * r[1]).sum()) for w, r in zip((w0, w1), (r0, r1), strict=True))
        / 2
    )
    assert math.isclose(applied, w0.weighted_loss, rel_tol=1e-6)
    assert math.isclose(w0.mean_loss, 2.5) and 0 < w0.ess < 1


def test_layout_does_not_change_weights(monkeypatch):
    """The same window split 2x2 or 1x4 gives bit-identical weights (canonical id order)."""
    cfg = ReweightConfig(scheme="midrank", frac=0.5, portion=1)
    losses = torch.tensor([0.3, 0.1, 0.9, 0.5])
    ids = torch.tensor([7, 3, 5, 1])
    one = simulate(monkeypatch, [(losses[None], torch.ones(1, 4, dtype=torch.bool), ids[None])], cfg, 1)[0]
    two = simulate(
        monkeypatch,
        [
            (losses[None, 2:], torch.ones(1, 2, dtype=torch.bool), ids[None, 2:]),
            (losses[None, :2], torch.ones(1, 2, dtype=torch.bool), ids[None, :2]),
        ],
        cfg,
        2,
    )
    assert torch.equal(one.weights, two[0].weights)


def test_non_finite_anywhere_marks_the_window_on_every_rank(monkeypatch):
    cfg = ReweightConfig(scheme="irdro", lam=1.0)
    r0 = (torch.tensor([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0, 1]]))
    r1 = (
        torch.tensor([[math.nan, 2.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([[2, 3]]),
    )
    w0, w1 = simulate(monkeypatch, [r0, r1], cfg, 2)
    assert not w0.finite and not w1.finite
    assert w0.coeffs.eq(0).all() and math.isnan(w0.weighted_loss)


def test_non_finite_padding_is_ignored(monkeypatch):
    cfg = ReweightConfig(scheme="irdro", lam=1.0)
    r0 = (torch.tensor([[1.0, math.inf]]), torch.tensor([[True, False]]), torch.tensor([[0, 0]]))
    (w,) = simulate(monkeypatch, [r0], cfg, 1)
    assert w.finite and w.coeffs.tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize(("window", "expect"), [("micro", 4), ("step", 12)])
def test_backward_scale(window, expect):
    assert normalize.backward_scale(window, dp=4, grad_accum_steps=3) == expect


def test_warmup_gives_uniform_weights(monkeypatch):
    cfg = ReweightConfig(scheme="irdro", lam=0.01, warmup_steps=5)
    r0 = (torch.tensor([[1.0, 9.0]]), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0, 1]]))
    monkeypatch.setattr(dist, "all_gather_losses", lambda local: local[None])
    w = normalize.reweight_window(*r0, cfg, step=4, scale=1)
    assert w.weights.tolist() == [0.5, 0.5]
    assert normalize.reweight_window(*r0, cfg, step=5, scale=1).weights[1] > 0.99
