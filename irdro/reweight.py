"""Per-sample weight math: the scheme registry and `compute_weights`.

Owns: turning a window's detached per-sample losses into weights that sum to 1 (ERM, IR-DRO,
MidRanking, trimming, warm-up). Pure functions of a 1-D fp32 tensor. Must not: call
torch.distributed, know about ranks, micro-batches or gradient accumulation (that is
irdro.normalize), or see padding (callers pass only valid samples).

Adding a scheme: one weight function here, `@register("name")`, whose keyword parameters are
`reweight.*` fields, plus one `irdro.config.SCHEMES` entry naming those fields (and, optionally,
the check that a window of a given size leaves it something to weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from irdro.config import SCHEMES, ReweightConfig

SchemeFn = Callable[..., Tensor]
_REGISTRY: dict[str, SchemeFn] = {}


def register(name: str) -> Callable[[SchemeFn], SchemeFn]:
    """Register a scheme `fn(losses, **params) -> weights` under `name`, an `irdro.config.SCHEMES` key
    whose `params` are `fn`'s keyword parameters."""
    if name not in SCHEMES:
        raise ValueError(f"scheme {name!r} has no irdro.config.SCHEMES entry; add one naming its parameters")

    def deco(fn: SchemeFn) -> SchemeFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def schemes() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def compute_weights(losses: Tensor, scheme: str, **params: float) -> Tensor:
    """Weights over a window of per-sample losses.

    Args:
        losses: (N,) per-sample mean NLL of the whole (already global) window; detached, finite.
        scheme: registry name (`erm`, `irdro`, `midrank`).
        **params: the scheme's parameters (`lam`, `trim_top`; `frac`, `portion`).

    Returns:
        (N,) fp32 weights >= 0 summing to 1.

    Raises:
        ValueError: unknown scheme, empty or non-finite losses, or an empty MidRanking band.
    """
    if scheme not in _REGISTRY:
        raise ValueError(f"unknown reweighting scheme {scheme!r}; registered: {', '.join(_REGISTRY)}")
    if losses.dim() != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor, got shape {tuple(losses.shape)}")
    losses = losses.detach().float()
    if not torch.isfinite(losses).all():
        raise ValueError("losses contain non-finite values; the step must be skipped, not reweighted")
    return _REGISTRY[scheme](losses, **params)


def _descending_order(losses: Tensor) -> Tensor:
    # Stable, so ties keep window order and every rank computes the same ranking.
    return torch.sort(losses, descending=True, stable=True).indices


@register("erm")
def erm(losses: Tensor) -> Tensor:
    """Uniform weights: the plain mean of per-sample losses."""
    return torch.full_like(losses, 1.0 / losses.numel())


@register("irdro")
def irdro(losses: Tensor, lam: float = 1.0, trim_top: float = 0.0) -> Tensor:
    """Closed-form maximiser of `sum_i p_i l_i - lam * KL(p || uniform)`: softmax(l / lam).

    `trim_top` first gives the top `floor(trim_top * N)` losses weight 0 (noise guard).
    """
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    n = losses.numel()
    logits = losses / lam
    k = math.floor(trim_top * n)
    if k >= n:
        raise ValueError(f"trim_top={trim_top} trims all {n} samples of the window")
    if k > 0:
        logits = logits.clone()
        logits[_descending_order(losses)[:k]] = -math.inf
    logits = logits - logits.max()  # max-shift: exp never overflows
    w = torch.exp(logits)
    return w / w.sum()


@register("midrank")
def midrank(losses: Tensor, frac: float = 0.5, portion: int = 1) -> Tensor:
    """Equal weight on ranks `[portion*c, (portion+1)*c)` of the descending order, c = floor(frac*N)."""
    n = losses.numel()
    c = math.floor(frac * n)
    lo, hi = portion * c, (portion + 1) * c
    if c < 1 or hi > n:
        raise ValueError(
            f"MidRanking band [{lo}, {hi}) is empty or outside a window of {n} samples (frac={frac}, portion={portion})"
        )
    w = torch.zeros_like(losses)
    w[_descending_order(losses)[lo:hi]] = 1.0 / c
    return w


TRANSFORMS = ("linear", "quadratic_mid", "extremes")


@register("transform")
def transform(losses: Tensor, lam: float = 1.0, transform: str = "linear", delta: float = 1.0) -> Tensor:
    """The follow-up work's loss transforms before the softmax: rescale the window's losses to
    x in [-delta, delta] by min/max, then g(x) = x (`linear`, IR-DRO on rescaled losses),
    1 - x^2/delta^2 (`quadratic_mid`: favour the middle of the loss range) or x^2/delta^2
    (`extremes`: favour both ends); weights = softmax(g / lam)."""
    if not lam > 0 or not delta > 0:
        raise ValueError(f"lam and delta must be > 0, got lam={lam}, delta={delta}")
    lo, hi = losses.min(), losses.max()
    x = (2 * (losses - lo) / (hi - lo).clamp(min=1e-6) - 1) * delta
    if transform == "linear":
        g = x
    elif transform == "quadratic_mid":
        g = 1 - x.square() / delta**2
    elif transform == "extremes":
        g = x.square() / delta**2
    else:
        raise ValueError(f"unknown transform {transform!r}; one of {', '.join(TRANSFORMS)}")
    z = g / lam
    w = torch.exp(z - z.max())
    return w / w.sum()


def group_dro_alpha(
    losses: Tensor, sources: Tensor, alpha: Tensor, prior: Tensor, eta: float, smoothing: float
) -> Tensor:
    """The group weights after one window (exponentiated gradient, as in group DRO and DoReMi).

    Each source present in the window moves by its mean loss, alpha_d * exp(eta * L_d), within the
    mass the present sources held (a source absent from the window keeps its alpha: it is not
    evidence that the source got easier); then alpha <- (1 - smoothing) * alpha + smoothing * prior.

    Args:
        losses: (N,) the window's signal (loss or excess loss), finite.
        sources: (N,) int64 source index of each sample, in [0, D).
        alpha: (D,) current group weights, summing to 1.
        prior: (D,) the mixture's target shares, summing to 1.
        eta: step size >= 0 (0: alpha only moves towards the prior by the smoothing).
        smoothing: in [0, 1].

    Returns:
        (D,) fp64 group weights summing to 1.
    """
    a, q = alpha.double(), prior.to(alpha.device).double()
    num = a.numel()
    sources = sources.to(a.device)
    counts = torch.bincount(sources, minlength=num).double()
    sums = torch.zeros(num, dtype=torch.float64, device=a.device).index_add_(0, sources, losses.to(a.device).double())
    present = (counts > 0) & (a > 0)
    if bool(present.any()):
        logits = torch.where(present, a.clamp(min=1e-300).log() + eta * sums / counts.clamp(min=1), -math.inf)
        moved = torch.softmax(logits, dim=0) * a[present].sum()
        a = torch.where(present, moved, a)
    a = (1 - smoothing) * a + smoothing * q
    return a / a.sum()


@register("group_dro")
def group_dro(
    losses: Tensor, sources: Tensor, alpha: Tensor, prior: Tensor, eta: float = 0.1, smoothing: float = 0.01
) -> Tensor:
    """Domain-level DRO: each sample gets its source's group weight over its sampling share,
    p_i proportional to alpha_d(i) / prior_d(i), with alpha = `group_dro_alpha(...)` after this window.

    The window's weight on source d is then alpha_d (up to the window's sampling noise; exactly when
    its counts n_d equal prior_d * N, where p_i = alpha_d / n_d), and alpha = prior (eta 0) is ERM.
    """
    return group_dro_weights(sources, group_dro_alpha(losses, sources, alpha, prior, eta, smoothing), prior).to(
        losses.device
    )


def group_dro_weights(sources: Tensor, alpha: Tensor, prior: Tensor) -> Tensor:
    """(N,) fp32 `group_dro` sample weights p_i proportional to alpha_d(i) / prior_d(i), for the
    group weights `alpha` already advanced by this window (`group_dro_alpha`); on `sources`' device."""
    a, q = alpha.double(), prior.to(alpha.device).double()
    ratio = torch.where(q > 0, a / q.clamp(min=1e-300), 0.0)[sources.to(a.device)]
    return (ratio / ratio.sum()).to(device=sources.device, dtype=torch.float32)


def scheme_params(cfg: ReweightConfig, step: int) -> tuple[str, dict[str, float]]:
    """The scheme and its parameters in force at optimizer step `step` (0-based), warm-up applied."""
    if step < cfg.warmup_steps:
        return "erm", {}
    if cfg.scheme not in SCHEMES:
        raise ValueError(f"reweight.scheme {cfg.scheme!r} has no parameter mapping")
    return cfg.scheme, {name: getattr(cfg, name) for name in SCHEMES[cfg.scheme].params}


def softmax_temperature(cfg: ReweightConfig, step: int) -> float | None:
    """The temperature t for which the weights in force at optimizer step `step` are
    softmax(l / t) over the window (`math.inf`: uniform), or None when they need the window's
    ranking or range (trim_top, midrank, transform). A scheme with a temperature can defer the
    normaliser (irdro.normalize.DeferredWindow); the others need every loss before any weight."""
    name, params = scheme_params(cfg, step)
    if name == "erm":
        return math.inf
    if name == "irdro" and params["trim_top"] == 0:
        return float(params["lam"])
    return None


def softmax_numerators(losses: Tensor, shift: float, temperature: float) -> Tensor:
    """(N,) fp64 exp((l_i - shift) / t): the softmax(l / t) weights times their normaliser
    sum_j exp((l_j - shift) / t), for a `shift` fixed before the window's other losses are known.

    Args:
        losses: (N,) fp32 per-sample losses, finite.
        shift: common to the whole window; keeps the exponents in range.
        temperature: from `softmax_temperature` (inf: uniform, every numerator 1).
    """
    if math.isinf(temperature):
        return torch.ones_like(losses, dtype=torch.float64)
    return torch.exp((losses.double() - shift) / temperature)
