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


# ----------------------------------------------------------------------------- deferred normaliser


def deferred_vs_scored(cfg: ReweightConfig, micro: list[torch.Tensor], step: int = 0, scale: float = 3.0):
    """A world of one: the DeferredWindow's coefficients / Z and Window against the scored window's."""
    valid = [torch.ones_like(x, dtype=torch.bool) for x in micro]
    ids = [torch.arange(len(x)) + 100 * m for m, x in enumerate(micro)]
    win = normalize.DeferredWindow(cfg, step, scale)
    coeffs = [win.add(x, v, i) for x, v, i in zip(micro, valid, ids, strict=True)]
    scored = normalize.reweight_window(torch.stack(micro), torch.stack(valid), torch.stack(ids), cfg, step, scale)
    return win, coeffs, scored


@pytest.mark.parametrize(
    "cfg",
    [ReweightConfig(scheme="irdro", lam=0.3), ReweightConfig(scheme="erm"), ReweightConfig(scheme="irdro", lam=1e6)],
    ids=["irdro", "erm", "irdro-flat"],
)
def test_deferred_coefficients_over_the_normaliser_are_the_scored_weights(cfg):
    micro = [torch.tensor([2.0, 3.5, 1.0]), torch.tensor([4.0, 0.5, 2.5]), torch.tensor([1.5, 6.0, 2.0])]
    win, coeffs, scored = deferred_vs_scored(cfg, micro)
    assert not win.overflow and win.finite
    got = torch.stack(coeffs).double() / win.divisor
    assert torch.allclose(got, scored.coeffs.double(), rtol=1e-6, atol=0), (got, scored.coeffs)
    w = win.window()  # the logged window is the scored one, field for field
    for name in ("ids", "losses", "weights", "ranks", "coeffs"):
        assert torch.equal(getattr(w, name), getattr(scored, name)), name
    assert (w.ess, w.max_weight, w.weighted_loss, w.mean_loss) == (
        scored.ess,
        scored.max_weight,
        scored.weighted_loss,
        scored.mean_loss,
    )


def test_deferred_exponents_overflow_past_the_bound_only():
    lam = 0.1
    cfg = ReweightConfig(scheme="irdro", lam=lam)
    bound = (normalize.SHIFT_HEADROOM + normalize.MAX_EXPONENT) * lam  # above micro-batch 0's largest loss
    inside = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0 + bound - 0.01])]
    win, coeffs, scored = deferred_vs_scored(cfg, inside)
    assert not win.overflow and torch.isfinite(torch.stack(coeffs)).all()
    assert torch.allclose(torch.stack(coeffs).double() / win.divisor, scored.coeffs.double(), rtol=1e-5)
    outside = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0 + bound + 0.01]), torch.tensor([1.0, 1.0])]
    win, coeffs, _ = deferred_vs_scored(cfg, outside)
    assert win.overflow and coeffs[0] is not None and coeffs[1] is None and coeffs[2] is None
    assert win.divisor == 1.0 and win.finite


def test_deferred_non_finite_loss_withholds_coefficients_and_the_window_says_so():
    cfg = ReweightConfig(scheme="irdro", lam=0.5)
    win, coeffs, scored = deferred_vs_scored(cfg, [torch.tensor([1.0, 2.0]), torch.tensor([math.nan, 1.0])])
    assert coeffs[1] is None and not win.finite and not win.overflow and win.divisor == 1.0
    assert not win.window().finite and not scored.finite


def test_which_steps_defer_the_normaliser():
    step = ReweightConfig(scheme="irdro", lam=0.5, window="step")
    assert normalize.defers_normaliser(step, 0)
    assert normalize.defers_normaliser(ReweightConfig(scheme="erm", window="step"), 0)
    assert not normalize.defers_normaliser(ReweightConfig(scheme="irdro", window="micro"), 0)
    assert not normalize.defers_normaliser(ReweightConfig(scheme="irdro", window="step", scoring_pass="always"), 0)
    for ranked in (
        ReweightConfig(scheme="irdro", window="step", trim_top=0.25),
        ReweightConfig(scheme="midrank", window="step"),
        ReweightConfig(scheme="transform", window="step"),
    ):
        assert not normalize.defers_normaliser(ranked, 5)
        warm = ReweightConfig(**{**ranked.__dict__, "warmup_steps": 2})
        assert normalize.defers_normaliser(warm, 1) and not normalize.defers_normaliser(warm, 2)  # ERM warm-up
    assert not normalize.defers_normaliser(ReweightConfig(scheme="irdro", window="step", normalize="local"), 0)


# -------------------------------------------------------------------- signal excess, normalize local


def two_ranks(losses: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(2, B, 3) gathered rows of two ranks holding halves of `losses`/`ids` (m = 1)."""
    rows = torch.stack([losses.double(), torch.ones_like(losses, dtype=torch.float64), ids.double()], 1)
    return rows.reshape(2, -1, 3)


@pytest.mark.parametrize("scheme", ["irdro", "midrank", "transform"])
@pytest.mark.parametrize("as_function", [False, True], ids=["tensor", "callable"])
def test_excess_weights_are_the_scheme_of_loss_minus_reference(monkeypatch, scheme, as_function):
    cfg = ReweightConfig(scheme=scheme, lam=0.4, frac=0.5, portion=1)
    losses = torch.tensor([2.0, 3.5, 1.0, 4.0, 0.5, 2.5])
    ids = torch.tensor([5, 0, 3, 1, 4, 2])
    table = torch.tensor([1.5, 3.9, 0.2, 0.1, 0.4, 2.0], dtype=torch.float64)  # r by sample id
    reference = (lambda i: table[i]) if as_function else table
    monkeypatch.setattr(dist, "dp_rank", lambda: 1)
    win = normalize.window_of(two_ranks(losses, ids), 1, 3, cfg, step=0, scale=2.0, reference=reference)
    order = torch.argsort(ids)
    excess = (losses[order].double() - table[ids[order]]).float()
    params = {"irdro": dict(lam=0.4, trim_top=0.0), "midrank": dict(frac=0.5, portion=1)}.get(scheme, dict(lam=0.4))
    expect = compute_weights(excess, scheme, **params)
    assert torch.equal(win.weights, expect)
    assert not torch.equal(expect, compute_weights(losses[order], scheme, **params))  # the signal matters
    assert torch.equal(win.losses, losses[order])  # statistics stay on l
    assert math.isclose(win.weighted_loss, float((expect.double() * losses[order].double()).sum()), rel_tol=1e-12)
    assert math.isclose(win.mean_excess, float(excess.double().mean()), rel_tol=1e-6)
    assert torch.equal(win.references, table[ids[order]].float())
    rank1 = torch.zeros(6)
    rank1[order] = expect  # back in gathered order; rank 1 holds gathered rows 3..5
    assert torch.allclose(win.coeffs[0], 2.0 * rank1[3:])


def test_signal_loss_has_no_excess_statistics(monkeypatch):
    monkeypatch.setattr(dist, "dp_rank", lambda: 0)
    win = normalize.window_of(two_ranks(torch.rand(4), torch.arange(4)), 1, 2, ReweightConfig(scheme="irdro"), 0, 1.0)
    assert win.references is None and win.mean_excess is None


@pytest.mark.parametrize(
    "cfg", [ReweightConfig(scheme="irdro", lam=0.3), ReweightConfig(scheme="erm")], ids=["irdro", "erm"]
)
def test_deferred_normaliser_with_a_reference_is_the_scored_window(cfg):
    micro = [torch.tensor([2.0, 3.5, 1.0]), torch.tensor([4.0, 0.5, 2.5]), torch.tensor([1.5, 6.0, 2.0])]
    table = torch.linspace(-3.0, 5.0, 300, dtype=torch.float64)  # ids are 100 m + j
    valid = [torch.ones(3, dtype=torch.bool)] * 3
    ids = [torch.arange(3) + 100 * m for m in range(3)]
    win = normalize.DeferredWindow(cfg, 0, 3.0, table)
    coeffs = torch.stack([win.add(x, v, i) for x, v, i in zip(micro, valid, ids, strict=True)])
    scored = normalize.reweight_window(torch.stack(micro), torch.stack(valid), torch.stack(ids), cfg, 0, 3.0, table)
    # fp32 softmax of exponents up to ~30: relative rounding ~30 x 6e-8
    assert torch.allclose(coeffs.double() / win.divisor, scored.coeffs.double(), rtol=1e-5, atol=0)
    w = win.window()
    for name in ("ids", "losses", "weights", "references", "coeffs"):
        assert torch.equal(getattr(w, name), getattr(scored, name)), name
    assert w.mean_excess == scored.mean_excess


@pytest.mark.parametrize("scheme", ["irdro", "midrank"])
def test_local_normalisation_weights_each_rank_over_its_own_samples(monkeypatch, scheme):
    cfg = ReweightConfig(scheme=scheme, lam=0.5, frac=0.5, portion=1, normalize="local")
    losses = torch.tensor([2.0, 3.5, 1.0, 0.5, 4.0, 9.0, 2.5, 0.1])
    ids = torch.tensor([6, 2, 0, 4, 1, 7, 3, 5])  # rank 0 holds 6, 2, 0, 4; rank 1 holds 1, 7, 3, 5
    monkeypatch.setattr(dist, "dp_rank", lambda: 0)
    win = normalize.window_of(two_ranks(losses, ids), 1, 4, cfg, step=0, scale=2.0)
    params = dict(lam=0.5, trim_top=0.0) if scheme == "irdro" else dict(frac=0.5, portion=1)
    by_id = torch.zeros(8)
    for r in range(2):
        by_id[ids[4 * r : 4 * r + 4]] = compute_weights(losses[4 * r : 4 * r + 4], scheme, **params) / 2
    assert torch.allclose(win.weights, by_id, rtol=1e-6, atol=0)
    assert math.isclose(float(win.weights.sum()), 1.0, rel_tol=1e-6)
    assert win.ranks.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert torch.allclose(win.coeffs[0], 2.0 * by_id[ids[:4]])
    glob = normalize.window_of(
        two_ranks(losses, ids), 1, 4, ReweightConfig(**{**cfg.__dict__, "normalize": "global"}), 0, 2.0
    )
    assert (glob.weights - win.weights).abs().max() > 0.1  # rank 1's 9.0 takes the global weight


# ------------------------------------------------------------------------------------- group_dro


def test_group_dro_window_labels_sources_and_moves_alpha_by_the_excess(monkeypatch):
    """Sources come from the sample ids; alpha moves by each source's mean signal (here the excess over
    a reference), once per finite window, and not at all on a non-finite one."""
    from irdro.reweight import group_dro_alpha

    monkeypatch.setattr(dist, "dp_rank", lambda: 0)
    cfg = ReweightConfig(scheme="group_dro", eta=1.0, smoothing=0.0, signal="excess")
    sources = normalize.Sources([0, 3, 6], [0.5, 0.5])  # ids 0-2: source 0, 3-5: source 1
    losses, ids = torch.tensor([2.0, 3.0, 5.0, 1.0, 4.0, 6.0]), torch.tensor([0, 3, 1, 4, 2, 5])
    table = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    win = normalize.window_of(two_ranks(losses, ids), 1, 3, cfg, step=0, scale=2.0, reference=table, sources=sources)
    assert win.sources.tolist() == [0, 0, 0, 1, 1, 1]  # ids ascending
    # by id: source 0 losses (2, 5, 4) - 1 -> mean excess 2.67; source 1 losses (3, 1, 6) - 0 -> 3.33
    excess = torch.tensor([1.0, 4.0, 3.0, 3.0, 1.0, 6.0])
    want = group_dro_alpha(excess, torch.tensor([0, 0, 0, 1, 1, 1]), sources.prior, sources.prior, 1.0, 0.0)
    assert torch.equal(win.alpha, want) and torch.equal(sources.alpha, want)
    assert float(want[1]) > 0.5  # the source with the larger excess gained (its plain loss mean is equal)
    weights = win.weights.double()
    assert float(weights[3:].sum()) == pytest.approx(float(want[1]), abs=1e-6)  # 3 samples each: share = alpha
    bad = losses.clone()
    bad[2] = math.nan
    nan_win = normalize.window_of(two_ranks(bad, ids), 1, 3, cfg, 0, 2.0, reference=table, sources=sources)
    assert not nan_win.finite and nan_win.alpha is None and torch.equal(sources.alpha, want)
