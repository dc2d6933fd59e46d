"""Every collective irdro makes, each named for what it computes, and the process groups they use.

Owns: torch.distributed calls, the data-parallel (DP), sequence-parallel (SP) and tensor-parallel
(TP) groups, and the device they communicate on.
Must not: hold training state or import deepspeed (irdro.engine initialises the process group).
Functions marked "call on every rank" are collectives: every rank of the group must enter them, in
the same order, on every micro-step, or ZeRO-3 deadlocks. Without an initialised process group they
act as a world of one.

Devices. NCCL reduces only accelerator tensors ("No backend type associated with device type cpu"),
gloo only CPU ones. Callers never think about it: each collective copies its input to
`comm_device()` and returns its result on the caller's device, so a CPU tensor made by a caller on a
GPU node (a token count, an eval sum) and a CUDA tensor on a CPU test box both work.

Groups. World = DP x SP x TP with the model-parallel ranks innermost, as DeepSpeed lays out its
own Ulysses and AutoTP groups: global rank r sits in DP group `r % M` and model-parallel group
`r // M`, M = SP x TP (one of SP and TP is 1). The ranks of an SP or TP group hold the same samples;
the reweighting gather, the sampler and every sum over samples use the DP group, so no sample is
counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """This rank's place in the DP x SP x TP grid, and its groups (None = the world / no group)."""

    sp: int = 1
    tp: int = 1
    dp_group: tdist.ProcessGroup | None = None
    mp_group: tdist.ProcessGroup | None = None  # the SP or the TP group of this rank
    dp_ranks: tuple[int, ...] = (0,)
    mp_ranks: tuple[int, ...] = (0,)


_layout = Layout()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init_groups(sequence_parallel: int = 1, tensor_parallel: int = 1) -> None:
    """Make the DP and the SP/TP groups for this world. Call on every rank, once, after the process
    group starts and before anything uses a group; (1, 1) keeps every rank data-parallel."""
    global _layout
    mp = sequence_parallel * tensor_parallel
    world = world_size()
    if sequence_parallel > 1 and tensor_parallel > 1:
        raise ValueError("sequence and tensor parallelism cannot both be > 1")
    if world % mp:
        raise ValueError(f"world size {world} is not divisible by sequence x tensor parallel {mp}")
    if mp == 1 or not is_initialized():
        _layout = Layout(sp=sequence_parallel, tp=tensor_parallel)
        return
    rank = global_rank()
    dp_group = mp_group = None
    dp_ranks = mp_ranks = ()
    for i in range(mp):  # every rank creates every group, in the same order (torch requires it)
        ranks = tuple(range(i, world, mp))
        g = tdist.new_group(list(ranks))
        if rank in ranks:
            dp_group, dp_ranks = g, ranks
    for j in range(world // mp):
        ranks = tuple(range(j * mp, (j + 1) * mp))
        g = tdist.new_group(list(ranks))
        if rank in ranks:
            mp_group, mp_ranks = g, ranks
    _layout = Layout(sequence_parallel, tensor_parallel, dp_group, mp_group, dp_ranks, mp_ranks)


def layout() -> Layout:
    return _layout


def group_ranks(group: tdist.ProcessGroup) -> tuple[int, ...]:
    """The global ranks of `group` (one made here or by DeepSpeed), in group-rank order."""
    return tuple(tdist.get_process_group_ranks(group))


def dp_group() -> tdist.ProcessGroup | None:
    """The data-parallel group: the world unless `init_groups` split it."""
    return _layout.dp_group


def sp_group() -> tdist.ProcessGroup | None:
    """This rank's sequence-parallel group; None without sequence parallelism."""
    return _layout.mp_group if _layout.sp > 1 else None


def tp_group() -> tdist.ProcessGroup | None:
    """This rank's tensor-parallel group; None without tensor parallelism."""
    return _layout.mp_group if _layout.tp > 1 else None


def sp_size() -> int:
    return _layout.sp


def tp_size() -> int:
    return _layout.tp


def sp_rank() -> int:
    return tdist.get_rank(sp_group()) if sp_size() > 1 else 0


def tp_rank() -> int:
    return tdist.get_rank(tp_group()) if tp_size() > 1 else 0


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
