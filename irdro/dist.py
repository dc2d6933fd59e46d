"""Every collective irdro makes, each named for what it computes.

Owns: torch.distributed calls over the data-parallel group. Must not: hold training state or import
deepspeed (irdro.engine initialises the process group). Functions marked "call on every rank" are
collectives: every rank of the group must enter them, in the same order, on every micro-step, or
ZeRO-3 deadlocks. Without an initialised process group they act as a world of one.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import Tensor


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def dp_group() -> tdist.ProcessGroup | None:
    """The data-parallel group. Today every rank is data-parallel, so this is the world group;
    tensor/pipeline parallelism would return a sub-group here and nowhere else."""
    return None


def dp_size() -> int:
    return tdist.get_world_size(dp_group()) if is_initialized() else 1


def dp_rank() -> int:
    return tdist.get_rank(dp_group()) if is_initialized() else 0


def global_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return global_rank() == 0


def all_gather_losses(local: Tensor) -> Tensor:
    """Gather each DP rank's per-sample rows into one tensor. Call on every rank.

    Args:
        local: (n, k) fp64 rows of this rank (per-sample loss, validity mask, sample id, ...);
            `n` must be the same on every rank (pad and mask unequal batches).

    Returns:
        (dp, n, k) rows of every DP rank, in DP-rank order; identical on every rank.
    """
    if not is_initialized():
        return local.unsqueeze(0).clone()
    out = [torch.empty_like(local) for _ in range(dp_size())]
    tdist.all_gather(out, local.contiguous(), group=dp_group())
    return torch.stack(out)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over DP ranks (returns a new tensor). Call on every rank."""
    out = t.clone()
    if is_initialized():
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM, group=dp_group())
    return out


def all_reduce_max(t: Tensor) -> Tensor:
    """Max of `t` over DP ranks (returns a new tensor). Call on every rank."""
    out = t.clone()
    if is_initialized():
        tdist.all_reduce(out, op=tdist.ReduceOp.MAX, group=dp_group())
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any DP rank. Call on every rank."""
    return bool(
        all_reduce_max(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0
    )


def barrier() -> None:
    """Wait for every rank. Call on every rank."""
    if is_initialized():
        tdist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank. Call on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
