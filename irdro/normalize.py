"""The window contract (README, "The distributed contract"): global weights over data-parallel ranks.

Owns: gathering a window's detached per-sample losses from every DP rank, computing one identical
weight vector on every rank, and turning this rank's slice into backward coefficients such that
DeepSpeed's own gradient averaging (mean over DP, division by GA inside `engine.backward`) yields
exactly `sum_i p_i grad l_i` over the window. Must not: run the model or call DeepSpeed.

Coefficients. For window `micro` (W = DP x B samples) a rank back-propagates
`DP * sum_{i local} p_i l_i`; for window `step` (W = DP x GA x B) `DP * GA * sum_{i local in m} p_i l_i`.
DeepSpeed divides by GA and averages over DP, so the applied gradient is `sum_{i in W} p_i grad l_i`
averaged over the GA micro-windows (`micro`) or exactly (`step`). Never divide by GA here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from irdro import dist
from irdro.config import ReweightConfig
from irdro.reweight import compute_weights, scheme_params


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
    """
    m, b = local_losses.shape
    device = local_losses.device  # every tensor of the window lives here
    rows = torch.stack(
        [
            local_losses.detach().double().reshape(-1),
            local_valid.to(device).double().reshape(-1),
            local_ids.to(device).double().reshape(-1),  # ids < 2**53 are exact in fp64
        ],
        dim=1,
    )
    gathered = dist.all_gather_losses(rows)  # (dp, m*B, 3)
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

    finite = bool(torch.isfinite(losses).all())
    if finite:
        name, params = scheme_params(cfg, step)
        weights = compute_weights(losses, name, **params)
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
        ranks=idx // (m * b),
    )
