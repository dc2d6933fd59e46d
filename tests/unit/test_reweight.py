"""The weight math: IR-DRO is the maximiser of its objective, bands and trims are exact."""

import inspect
import math

import pytest
import torch

from irdro import config, reweight
from irdro.config import ReweightConfig
from irdro.reweight import compute_weights


def objective(p: torch.Tensor, losses: torch.Tensor, lam: float) -> float:
    """sum p l - lam KL(p || uniform), in fp64."""
    p, losses = p.double(), losses.double()
    n = losses.numel()
    nz = p > 0
    kl = (p[nz] * torch.log(p[nz] * n)).sum()
    return float((p * losses).sum() - lam * kl)


def test_registry_matches_config_choices():
    assert set(reweight.schemes()) == set(config.SCHEMES)


def test_each_scheme_is_one_function_and_one_table_entry():
    """The table's params are exactly the weight function's keyword parameters and ReweightConfig
    fields, so scheme_params and observe need nothing per scheme."""
    for name, entry in config.SCHEMES.items():
        fn = reweight._REGISTRY[name]
        assert tuple(inspect.signature(fn).parameters)[1:] == entry.window_inputs + entry.params, name
        cfg = ReweightConfig(scheme=name)
        assert reweight.scheme_params(cfg, 0) == (name, {k: getattr(cfg, k) for k in entry.params})
    with pytest.raises(ValueError, match="no irdro.config.SCHEMES entry"):
        reweight.register("not_in_the_table")


@pytest.mark.parametrize("lam", [0.05, 0.3, 1.0, 4.0])
def test_irdro_weights_maximise_kl_regularised_objective(lam):
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(16, generator=g) * 5
    p = compute_weights(losses, "irdro", lam=lam)
    best = objective(p, losses, lam)
    tol = 1e-6 * max(1.0, abs(best))  # p is fp32
    assert abs(float(p.sum()) - 1) < 1e-6
    for _ in range(200):  # random feasible points of the simplex
        q = torch.distributions.Dirichlet(torch.ones(16)).sample()
        assert objective(q, losses, lam) <= best + tol
    for eps in (1e-2, 1e-3):  # small perturbations that stay on the simplex
        for _ in range(50):
            d = torch.randn(16, generator=g, dtype=torch.float64)
            d -= d.mean()
            q = (p.double() * (1 + eps * d / d.abs().max())).clamp(min=0)
            q /= q.sum()
            assert objective(q, losses, lam) <= best + tol
    # and the uniform point (ERM) is strictly worse when losses differ
    assert objective(torch.full((16,), 1 / 16), losses, lam) < best


def test_irdro_closed_form_is_softmax():
    losses = torch.tensor([1.0, 2.0, 3.0])
    p = compute_weights(losses, "irdro", lam=0.5)
    ref = torch.softmax(losses.double() / 0.5, 0).float()
    assert torch.allclose(p, ref, atol=1e-7)


def test_irdro_large_lam_is_uniform_and_small_lam_is_argmax():
    losses = torch.tensor([0.5, 3.0, 1.0, 2.0])
    assert torch.allclose(compute_weights(losses, "irdro", lam=1e6), torch.full((4,), 0.25), atol=1e-6)
    p = compute_weights(losses, "irdro", lam=1e-4)
    assert p.argmax() == 1 and p[1] > 1 - 1e-6


def test_irdro_is_stable_for_huge_losses():
    losses = torch.tensor([1e4, 1e4 + 1, 5.0])
    p = compute_weights(losses, "irdro", lam=0.01)
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6


def test_irdro_trim_top_zeroes_the_hardest_then_softmaxes_the_rest():
    losses = torch.tensor([5.0, 1.0, 9.0, 2.0, 3.0])
    p = compute_weights(losses, "irdro", lam=1.0, trim_top=0.4)  # floor(0.4*5) = 2 trimmed
    assert p[2] == 0 and p[0] == 0
    ref = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0)
    assert torch.allclose(p[[1, 3, 4]], ref, atol=1e-7)


def test_midrank_band_exact():
    losses = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6])  # descending ranks: 1,5,3,7,2,4,6,0
    p = compute_weights(losses, "midrank", frac=0.25, portion=1)  # c = 2, ranks [2, 4): idx 3, 7
    expect = torch.zeros(8)
    expect[[3, 7]] = 0.5
    assert torch.equal(p, expect)
    p0 = compute_weights(losses, "midrank", frac=0.25, portion=0)  # the hardest two
    assert set(torch.nonzero(p0).squeeze(1).tolist()) == {1, 5}


def test_midrank_full_band_is_erm():
    losses = torch.rand(7)
    assert torch.allclose(compute_weights(losses, "midrank", frac=1.0, portion=0), torch.full((7,), 1 / 7))


def test_midrank_ties_are_stable():
    p = compute_weights(torch.ones(4), "midrank", frac=0.5, portion=0)
    assert p.tolist() == [0.5, 0.5, 0.0, 0.0]


def test_midrank_empty_band_raises_not_nan():
    with pytest.raises(ValueError, match="band"):
        compute_weights(torch.rand(3), "midrank", frac=0.2, portion=0)
    with pytest.raises(ValueError, match="band"):
        compute_weights(torch.rand(4), "midrank", frac=0.5, portion=2)


def test_non_finite_losses_are_refused():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="non-finite"):
            compute_weights(torch.tensor([1.0, bad]), "irdro", lam=1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown"):
        compute_weights(torch.rand(3), "nope")
    with pytest.raises(ValueError, match="lam"):
        compute_weights(torch.rand(3), "irdro", lam=0.0)
    with pytest.raises(ValueError, match="1-D"):
        compute_weights(torch.rand(0), "erm")


def test_weights_are_fp32_and_detached():
    losses = torch.rand(5, dtype=torch.bfloat16, requires_grad=True)
    for scheme, params in (
        ("erm", {}),
        ("irdro", {"lam": 1.0}),
        ("midrank", {"frac": 0.4, "portion": 1}),
    ):
        p = compute_weights(losses, scheme, **params)
        assert p.dtype == torch.float32 and not p.requires_grad


def test_warmup_steps_give_erm():
    cfg = ReweightConfig(scheme="irdro", lam=0.1, warmup_steps=3)
    assert reweight.scheme_params(cfg, 2) == ("erm", {})
    assert reweight.scheme_params(cfg, 3) == ("irdro", {"lam": 0.1, "trim_top": 0.0})


def test_maximiser_check_can_fail():
    """Negative control: the perturbation search above does find ascent from a wrong p."""
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(16, generator=g) * 5
    wrong = torch.softmax(losses.double() / 2.0, 0)  # the IR-DRO point for lam=2, judged at lam=1
    base = objective(wrong, losses, 1.0)
    improved = False
    for _ in range(50):
        d = torch.randn(16, generator=g, dtype=torch.float64)
        q = (wrong * (1 + 1e-2 * d / d.abs().max())).clamp(min=0)
        q /= q.sum()
        improved |= objective(q, losses, 1.0) > base + 1e-6 * abs(base)
    assert improved


def test_transform_scheme_shapes():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mid = compute_weights(losses, "transform", lam=0.5, transform="quadratic_mid", delta=1.0)
    assert mid.argmax() == 2 and torch.allclose(mid[0], mid[4]) and abs(float(mid.sum()) - 1) < 1e-6
    ext = compute_weights(losses, "transform", lam=0.5, transform="extremes", delta=1.0)
    assert ext.argmin() == 2 and torch.allclose(ext[0], ext[4])
    lin = compute_weights(losses, "transform", lam=0.5, transform="linear", delta=1.0)
    ref = torch.softmax(torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]) / 0.5, 0)
    assert torch.allclose(lin, ref, atol=1e-6)
    flat = compute_weights(torch.full((3,), 2.0), "transform", lam=1.0, transform="quadratic_mid")
    assert torch.allclose(flat, torch.full((3,), 1 / 3))  # constant losses: no division by zero
    with pytest.raises(ValueError, match="unknown transform"):
        compute_weights(losses, "transform", transform="cubic")
