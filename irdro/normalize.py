"""The window contract (README, "The distributed contract"): global weights over data-parallel ranks.

Owns: gathering a window's detached per-sample losses from every DP rank, computing one identical
weight vector on every rank, and turning this rank's slice into backward coefficients such that
DeepSpeed's own gradient averaging (mean over DP, division by GA inside `engine.backward`) yields
exactly `sum_i p_i grad l_i` over the window. Must not: run the model or call DeepSpeed.

Coefficients. For window `micro` (W = DP x B samples) a rank back-propagates
`DP * sum_{i local} p_i l_i`; for window `step` (W = DP x GA x B) `DP * GA * sum_{i local in m} p_i l_i`.
DeepSpeed divides by GA and averages over DP, so the applied gradient is `sum_{i in W} p_i grad l_i`
averaged over the GA micro-windows (`micro`) or exactly (`step`). Never divide by GA here.

Deferred normaliser (window `step`, `reweight.scoring_pass: auto`, schemes whose weights are
softmax(l / t): erm (t = inf), irdro without trim_top, warm-up steps). The weights of the scored
window need every loss of the step before the first backward; these do not, because
p_i = u_i / Z with u_i = exp((l_i - c) / t) for any shift c common to the window. `DeferredWindow`
fixes c from micro-batch 0 and hands out coefficients `DP * GA * u_i` per micro-batch as it comes;
after the last backward the caller divides the accumulated gradients by Z = sum_{i in W} u_i (known
identically on every rank from the per-micro gathers) before clipping
(`irdro.engine.gradients_divided_by`), which applies `sum_{i in W} p_i grad l_i` exactly as the
scored window does, at the cost of ERM. A micro-batch whose exponent (l - c) / t would exceed
`MAX_EXPONENT` is an overflow: the step's gradient is discarded and the step scored instead.

Signal (`reweight.signal`). The weights are a function of the signal s_i: the loss l_i itself, or
with a `reference` (`signal: excess`) the excess loss s_i = l_i - r_i, r_i looked up by sample id.
Only the weights see it: coefficients still multiply l_i, and the deferred normaliser's exponents
are (s_i - c) / t, so the deferred and scored windows agree for either signal.

Local normalisation (`reweight.normalize: local`, the official research code's behaviour). Each DP
rank's share of the window is weighted on its own: p_i = w_i^(r) / DP with w^(r) the scheme's
weights over rank r's samples, so the global vector still sums to 1 (when every rank has samples)
and the applied gradient is (1/DP) sum_r sum_{i in r} w_i^(r) grad l_i, what the official code's
per-rank backward and DeepSpeed's DP mean give. One loss scale cannot carry DP normalisers: local
windows are always scored (`defers_normaliser` is False).

Sources (`Sources`, a mixture's `data.train`). Each window labels its samples with their source
(from the sample ids: sources own consecutive id ranges). Scheme `group_dro` weights by source:
`p_i ∝ alpha_d(i) / w_d(i)`, with the group weights alpha advanced once per finite window from the
per-source mean signal (`irdro.reweight.group_dro_alpha`); alpha is the one piece of reweighting
state that outlives a window, identical on every rank, and checkpointed by irdro.train.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from irdro import dist
from irdro.config import ReweightConfig
from irdro.reweight import (
    compute_weights,
    group_dro_alpha,
    group_dro_weights,
    scheme_params,
    softmax_numerators,
    softmax_temperature,
)

Reference = Tensor | Callable[[Tensor], Tensor]
"""Reference losses r_i for `signal: excess`: a (num_samples,) float tensor indexed by sample id (on
CPU or any device), or a function `(N,) int64 ids -> (N,) r`."""


class Sources:
    """The training mixture as the window sees it: each sample id's source, the target shares, and
    the `group_dro` group weights alpha (the one piece of reweighting state carried across windows:
    identical on every rank, saved in checkpoints).

    Attributes:
        offsets: (D + 1,) int64 first sample id of each source (irdro.data.Mixture.offsets), CPU.
        prior: (D,) fp64 target shares, CPU.
        names: the sources' names in a named mixture (`data.train` written as a list), else empty.
        alpha: (D,) fp64 group weights, starting at `prior`; `window_of` replaces it after each finite
            `group_dro` window.
    """

    def __init__(
        self, offsets: Sequence[int] | np.ndarray, shares: Sequence[float] | np.ndarray, names: Sequence[str] = ()
    ) -> None:
        self.names = list(names)
        self.offsets = torch.as_tensor(offsets, dtype=torch.int64, device="cpu")
        self.prior = torch.as_tensor(shares, dtype=torch.float64, device="cpu")
        self.alpha = self.prior.clone()

    def describe(self) -> list[list] | None:
        """[[name, target share], ...] of a named mixture (what a checkpoint records), else None."""
        return [[n, float(q)] for n, q in zip(self.names, self.prior.tolist(), strict=True)] if self.names else None

    def of(self, ids: Tensor) -> Tensor:
        """(...) int64 source index of sample ids, on `ids`' device."""
        return (torch.searchsorted(self.offsets, ids.cpu(), right=True) - 1).to(ids.device)


def reference_at(reference: Reference, ids: Tensor) -> Tensor:
    """(...) fp64 reference losses r of sample ids `ids` (any shape), on `ids`' device."""
    r = reference(ids) if callable(reference) else reference[ids.to(reference.device)]
    return r.to(ids.device, torch.float64)


def signal_of(losses: Tensor, ids: Tensor, reference: Reference | None) -> Tensor:
    """What the weights are computed from: `losses`, or with a reference the excess loss l - r[ids].

    Args:
        losses: (...) fp32 per-sample losses.
        ids: (...) int64 sample ids of the same shape and device (any valid id on padding).
        reference: None (signal `loss`) or the reference losses (`Reference`).

    Returns:
        (...) fp32 on `losses`' device: l - r computed in fp64, then rounded once.
    """
    if reference is None:
        return losses
    return (losses.double() - reference_at(reference, ids)).float()


@dataclass(frozen=True)
class Window:
    """One window's weights and statistics, identical on every rank except `coeffs`.

    Attributes:
        coeffs: (m, B) fp32 backward coefficients for this rank's samples (0 on padding).
        finite: False when any valid loss in the window is non-finite (the step must be skipped).
        num_samples: valid samples in the window.
        mean_loss: plain mean of the window's per-sample losses.
        weighted_loss: sum_i p_i l_i.
        ess: effective sample size 1 / sum p_i^2 as a fraction of `num_samples`.
        max_weight: largest p_i.
        ids: (num_samples,) int64 sample ids of the window, ascending (canonical order).
        losses: (num_samples,) fp32 per-sample losses in `ids` order.
        weights: (num_samples,) fp32 weights in `ids` order.
        ranks: (num_samples,) int64 DP rank each sample was trained on, in `ids` order.
        references: (num_samples,) fp32 reference losses r_i in `ids` order (signal `excess`), else None.
        mean_excess: plain mean of l_i - r_i over the window (signal `excess`), else None.
        sources: (num_samples,) int64 source index of each sample in `ids` order (given `Sources`), else None.
        alpha: (D,) fp64 `group_dro` group weights after this window, else None.
    """

    coeffs: Tensor
    finite: bool
    num_samples: int
    mean_loss: float
    weighted_loss: float
    ess: float
    max_weight: float
    ids: Tensor
    losses: Tensor
    weights: Tensor
    ranks: Tensor
    references: Tensor | None = None
    mean_excess: float | None = None
    sources: Tensor | None = None
    alpha: Tensor | None = None


def backward_scale(window: str, dp: int, grad_accum_steps: int) -> int:
    """Factor on `sum_{i local} p_i l_i` that undoes DeepSpeed's DP mean (and GA division for `step`)."""
    return dp * grad_accum_steps if window == "step" else dp


def reweight_window(
    local_losses: Tensor,
    local_valid: Tensor,
    local_ids: Tensor,
    cfg: ReweightConfig,
    step: int,
    scale: float,
    reference: Reference | None = None,
    sources: Sources | None = None,
) -> Window:
    """Global weights for one window. Call on every rank (all-gathers over the DP group).

    Every tensor of the window (gathered rows, weights, coefficients) lives on `local_losses`'
    device; `irdro.dist` moves what it communicates to the backend's device and back.

    Args:
        local_losses: (m, B) per-sample mean NLL on this rank (m = 1 for window `micro`, GA for
            `step`); detached; padding rows may hold anything.
        local_valid: (m, B) bool, False on padding (unequal local batches).
        local_ids: (m, B) int64 stable sample ids.
        cfg: the recipe's reweighting section.
        step: 0-based optimizer step (for `warmup_steps`).
        scale: `backward_scale(...)`.
        reference: the reference losses for signal `excess` (module docstring); None: the losses.
        sources: the training mixture (`Sources`): labels each sample with its source, and holds the
            `group_dro` state; None: no source labels (and no `group_dro`).
    """
    m, b = local_losses.shape
    return window_of(gather_rows(local_losses, local_valid, local_ids), m, b, cfg, step, scale, reference, sources)


def gather_rows(local_losses: Tensor, local_valid: Tensor, local_ids: Tensor) -> Tensor:
    """(DP, m*B, 3) fp64 rows [loss, valid, id] of every DP rank's (m, B) samples, row-major in
    (m, B), on `local_losses`' device. Call on every rank (all-gathers over the DP group)."""
    device = local_losses.device
    rows = torch.stack(
        [
            local_losses.detach().double().reshape(-1),
            local_valid.to(device).double().reshape(-1),
            local_ids.to(device).double().reshape(-1),  # ids < 2**53 are exact in fp64
        ],
        dim=1,
    )
    return dist.all_gather_losses(rows)


def window_of(
    gathered: Tensor,
    m: int,
    b: int,
    cfg: ReweightConfig,
    step: int,
    scale: float,
    reference: Reference | None = None,
    sources: Sources | None = None,
) -> Window:
    """The Window of gathered rows: `gather_rows` of (m, B) samples per rank (no collective).
    Weights are those of the signal (`signal_of`), over the whole window or, with
    `cfg.normalize == "local"`, over each rank's rows divided by the number of ranks. Scheme
    `group_dro` weights by source (`irdro.reweight.group_dro`) and advances `sources.alpha` when the
    window is finite."""
    device = gathered.device
    flat = gathered.reshape(-1, 3)
    valid = flat[:, 1] > 0.5
    idx = torch.nonzero(valid).squeeze(1)
    ids = flat[idx, 2].long()
    # Canonical order: by sample id, so the weights are bit-identical whatever the DP/GA layout.
    order = torch.sort(ids, stable=True).indices
    idx, ids = idx[order], ids[order]
    losses = flat[idx, 0].float()
    n = int(idx.numel())
    if n == 0:
        raise RuntimeError("reweighting window holds no valid sample on any rank")

    ranks = idx // (m * b)
    finite = bool(torch.isfinite(losses).all())
    refs = None if reference is None else reference_at(reference, ids)
    signal = losses if refs is None else (losses.double() - refs).float()  # = signal_of(losses, ids, reference)
    labels = None if sources is None else sources.of(ids)
    alpha = None
    if finite:
        name, params = scheme_params(cfg, step)
        if name == "group_dro":
            if sources is None:
                raise ValueError("reweight scheme group_dro needs the window's sources (irdro.normalize.Sources)")
            # = compute_weights(signal, "group_dro", ...), with alpha advanced once and kept as the state
            alpha = sources.alpha = group_dro_alpha(signal, labels, sources.alpha, sources.prior, **params)
            weights = group_dro_weights(labels, alpha, sources.prior)
        elif cfg.normalize == "local":
            num_ranks = gathered.shape[0]
            weights = torch.zeros_like(losses)
            for r in range(num_ranks):
                mine = torch.nonzero(ranks == r).squeeze(1)
                if mine.numel():
                    weights[mine] = compute_weights(signal[mine], name, **params) / num_ranks
        else:
            weights = compute_weights(signal, name, **params)
    else:
        weights = torch.zeros_like(losses)

    padded = torch.zeros(flat.shape[0], dtype=torch.float32, device=device)
    padded[idx] = weights
    mine = padded.view(gathered.shape[0], m, b)[dist.dp_rank()]
    coeffs = (mine * scale).to(torch.float32)

    w64 = weights.double()
    return Window(
        coeffs=coeffs,
        finite=finite,
        num_samples=n,
        mean_loss=float(losses.double().mean()),
        weighted_loss=float((w64 * losses.double()).sum()) if finite else math.nan,
        ess=float(1.0 / (w64.square().sum() * n)) if finite else math.nan,
        max_weight=float(w64.max()) if finite else math.nan,
        ids=ids,
        losses=losses,
        weights=weights,
        ranks=ranks,
        references=None if refs is None else refs.float(),
        mean_excess=None if refs is None else float((losses.double() - refs).mean()),
        sources=labels,
        alpha=alpha,
    )


# Exponent bounds of the deferred normaliser, in units of the temperature. The shift c sits
# SHIFT_HEADROOM above micro-batch 0's largest loss, so its samples back-propagate u <= e^-20 (far
# from fp32's smallest normal, 1e-38, even times a tiny gradient); a later loss may rise
# SHIFT_HEADROOM + MAX_EXPONENT above it before u = e^(l-c)/t passes e^40 = 2.4e17, which keeps
# DP * GA * u * (gradient) and the accumulated gradients far inside fp32/bf16's range (3.4e38).
SHIFT_HEADROOM = 20.0
MAX_EXPONENT = 40.0


def defers_normaliser(cfg: ReweightConfig, step: int) -> bool:
    """Whether optimizer step `step` runs the `step` window through `DeferredWindow` (no scoring pass):
    window `step`, scoring_pass `auto`, global normalisation and a softmax scheme."""
    return (
        cfg.window == "step"
        and cfg.scoring_pass == "auto"
        and cfg.normalize == "global"
        and softmax_temperature(cfg, step) is not None
    )


class DeferredWindow:
    """The `step` window with its softmax normaliser deferred to the step boundary (module docstring).

    Call `add` on every rank once per micro-batch, in order, before its backward; back-propagate
    `sum(coeffs * losses)`, and step the last micro-batch inside
    `irdro.engine.gradients_divided_by(engine, normaliser)`. `window()` is then the Window the
    scored path computes for the same losses (same weights, statistics and sample order).

    Attributes:
        finite: False once a valid loss of the window is non-finite (the step must be skipped).
        overflow: True once a micro-batch's exponent passed MAX_EXPONENT (discard and score the step).
        normaliser: Z = sum_i u_i over the micro-batches so far (fp64; identical on every rank).
    """

    def __init__(
        self,
        cfg: ReweightConfig,
        step: int,
        scale: float,
        reference: Reference | None = None,
        sources: Sources | None = None,
    ) -> None:
        temperature = softmax_temperature(cfg, step)
        if temperature is None or cfg.normalize != "global":
            raise ValueError(f"reweight {cfg.scheme!r} ({cfg.normalize}) at step {step} cannot defer its normaliser")
        self.cfg, self.step, self.scale, self.temperature = cfg, step, scale, temperature
        self.reference, self.sources = reference, sources
        self.rows: list[Tensor] = []
        self.shift: float | None = None
        self.finite, self.overflow = True, False
        self.normaliser = 0.0

    def add(self, local_losses: Tensor, local_valid: Tensor, local_ids: Tensor) -> Tensor | None:
        """(B,) fp32 coefficients `DP * GA * u_i` (0 on padding) for this rank's micro-batch, or None
        when it must not be back-propagated as weighted: a non-finite loss or an overflow (then or
        earlier in the step). Call on every rank (all-gathers over the DP group).

        Args:
            local_losses: (B,) detached per-sample mean NLL; padding may hold anything.
            local_valid: (B,) bool, False on padding.
            local_ids: (B,) int64 sample ids.
        """
        rows = gather_rows(local_losses[None], local_valid[None], local_ids[None])  # (dp, B, 3)
        self.rows.append(rows)
        valid = rows[..., 1] > 0.5
        # the fp32 signal window_of weights (padding rows look up id 0)
        losses = signal_of(rows[..., 0].float(), rows[..., 2].long().where(valid, 0), self.reference)
        self.finite = self.finite and bool(torch.isfinite(losses[valid]).all())
        if not self.finite or self.overflow:
            return None
        if not bool(valid.any()):  # an all-padding micro-batch: nothing to weight
            return torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
        t = self.temperature
        top = float(losses[valid].max())
        if self.shift is None:
            self.shift = top + SHIFT_HEADROOM * t if math.isfinite(t) else 0.0
        if (top - self.shift) / t > MAX_EXPONENT:
            self.overflow = True
            return None
        u = torch.where(valid, softmax_numerators(losses.where(valid, self.shift), self.shift, t), 0.0)
        self.normaliser += float(u.sum())
        return (u[dist.dp_rank()] * self.scale).to(torch.float32)

    @property
    def divisor(self) -> float:
        """What the boundary step divides the accumulated gradients by: Z, or 1.0 when the step's
        gradient is NaN anyway (a non-finite loss or an overflow: DeepSpeed skips the step)."""
        return self.normaliser if self.finite and not self.overflow and self.normaliser > 0 else 1.0

    def window(self) -> Window:
        """The step's Window from the per-micro gathers, laid out as the scoring pass gathers it."""
        gathered = torch.cat(self.rows, dim=1)  # (dp, m*B, 3), row-major in (m, B)
        return window_of(
            gathered,
            len(self.rows),
            self.rows[0].shape[1],
            self.cfg,
            self.step,
            self.scale,
            self.reference,
            self.sources,
        )
