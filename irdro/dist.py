"""Every collective irdro makes, each named for what it computes.

Owns: torch.distributed calls over the data-parallel group, and the device they communicate on.
Must not: hold training state or import deepspeed (irdro.engine initialises the process group).
Functions marked "call on every rank" are collectives: every rank of the group must enter them, in
the same order, on every micro-step, or ZeRO-3 deadlocks. Without an initialised process group they
act as a world of one.

Devices. NCCL reduces only accelerator tensors ("No backend type associated with device type cpu"),
gloo only CPU ones. Callers never think about it: each collective copies its input to
`comm_device()` and returns its result on the caller's device, so a CPU tensor made by a caller on a
GPU node (a token count, an eval sum) and a CUDA tensor on a CPU test box both work.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import Tensor


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def dp_group() -> tdist.ProcessGroup | None:
    """The data-parallel group. Today every rank is data-parallel, so this is the world group;
    tensor/sequence parallelism would return a sub-group here and nowhere else."""
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


def comm_device() -> torch.device:
    """The device the backend communicates on: the current accelerator under NCCL, else the CPU."""
    if is_initialized() and tdist.get_backend(dp_group()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_comm(t: Tensor) -> Tensor:
    """A private contiguous copy of `t` on the communication device (collectives work in place)."""
    return t.detach().to(comm_device(), copy=True).contiguous()


def all_gather_losses(local: Tensor) -> Tensor:
    """Gather each DP rank's per-sample rows into one tensor. Call on every rank.

    Args:
        local: (n, k) fp64 rows of this rank (per-sample loss, validity mask, sample id, ...);
            `n` must be the same on every rank (pad and mask unequal batches).

    Returns:
        (dp, n, k) rows of every DP rank, in DP-rank order, on `local`'s device; identical on
        every rank.
    """
    if not is_initialized():
        return local.detach().unsqueeze(0).clone()
    buf = _to_comm(local)
    out = [torch.empty_like(buf) for _ in range(dp_size())]
    tdist.all_gather(out, buf, group=dp_group())
    return torch.stack(out).to(local.device)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of `t` over DP ranks, a new tensor on `t`'s device. Call on every rank."""
    if not is_initialized():
        return t.detach().clone()
    buf = _to_comm(t)
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM, group=dp_group())
    return buf.to(t.device)


def barrier() -> None:
    """Wait for every rank. Call on every rank."""
    if is_initialized():
        tdist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` (any picklable object) on every rank. Call on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]
