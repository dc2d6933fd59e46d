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

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

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
T = TypeVar("T")


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


def group_ranks(group: tdist.ProcessGroup | None) -> tuple[int, ...]:
    """The global ranks of `group` (one made here or by DeepSpeed; None: the world), in group-rank order."""
    return tuple(tdist.get_process_group_ranks(group)) if group is not None else tuple(range(world_size()))


def dp_group() -> tdist.ProcessGroup | None:
    """The data-parallel group: the world unless `init_groups` split it."""
    return _layout.dp_group


def sp_group() -> tdist.ProcessGroup | None:
    """This rank's sequence-parallel group; None without sequence parallelism."""
    return _layout.mp_group if _layout.sp > 1 else None


def sp_size() -> int:
    return _layout.sp


def sp_rank() -> int:
    return tdist.get_rank(sp_group()) if sp_size() > 1 else 0


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


def sp_all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of `t` over this rank's SP group, a new tensor on `t`'s device, not differentiable (token
    counts). Call on every rank; without sequence parallelism a copy of `t`."""
    if sp_size() == 1:
        return t.detach().clone()
    buf = _to_comm(t)
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM, group=sp_group())
    return buf.to(t.device)


class _SPSum(torch.autograd.Function):
    """Forward: the sum over the SP group. Backward: the sum of the upstream gradients over the SP
    group (the adjoint of a sum), i.e. SP x the upstream gradient, which is the same on every rank.

    Why not the plain upstream gradient: with ZeRO-3 (reduce-scatter) DeepSpeed averages the
    gradients over its sequence-data-parallel group, DP x SP ranks, while the loss contract
    (irdro.normalize) expects an average over DP. Each SP rank back-propagates only its shard's
    share of a sample's loss; the factor SP makes the average exact again
    (tests/distributed/test_sequence_parallel.py; the plain gradient gives 1/SP of it).
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return sp_all_reduce_sum(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return sp_all_reduce_sum(grad)


def sp_sum_differentiable(t: Tensor) -> Tensor:
    """Sum of `t` (per-sample NLL sums of this rank's sequence shard) over the SP group, with the
    gradient flowing back into this rank's shard (see `_SPSum`). Call on every rank."""
    return _SPSum.apply(t)


def check_deepspeed_groups(model_parallel: tdist.ProcessGroup, gradient: tdist.ProcessGroup) -> None:
    """Raise unless the groups DeepSpeed made for Ulysses or AutoTP match this module's layout.

    Args:
        model_parallel: DeepSpeed's SP group (the attention all-to-all) or TP group (the sharded layers):
            must hold this rank's SP/TP ranks.
        gradient: the group DeepSpeed reduces gradients over and partitions ZeRO state in: the whole
            world (DP x SP) under Ulysses, the DP group under AutoTP.

    A mismatch would make the loss sums, the weight gather and the gradient average talk to
    different ranks than the sampler assumed.
    """
    expected = tuple(range(world_size())) if _layout.sp > 1 else _layout.dp_ranks
    theirs = (group_ranks(model_parallel), tuple(sorted(group_ranks(gradient))))
    if theirs != (_layout.mp_ranks, tuple(sorted(expected))):
        raise RuntimeError(
            f"irdro bug: DeepSpeed's groups (model-parallel {theirs[0]}, gradient {theirs[1]}) differ from "
            f"irdro.dist's (model-parallel {_layout.mp_ranks}, gradient {expected})"
        )


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank of the world. Call on every rank."""
    if not is_initialized():
        return flag
    buf = torch.tensor([int(flag)], dtype=torch.int32, device=comm_device())
    tdist.all_reduce(buf, op=tdist.ReduceOp.MAX)
    return bool(buf.item())


def is_collective_failure(e: BaseException) -> bool:
    """`e` is a collective that failed because a peer is gone or too slow (a dead rank, a timeout),
    as gloo and NCCL report it, rather than a bug of the caller."""
    markers = ("gloo/", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    return isinstance(e, getattr(tdist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in markers)
    )


class Heartbeat:
    """Which rank stopped, and a watchdog for hangs: every rank's liveness and step, kept in the
    rendezvous store (a TCP store on global rank 0).

    A daemon thread increments this rank's beat counter every `interval_s`; `at_step` records the
    step each rank is on and counts as progress. When `timeout_s` passes without progress (this rank
    waits in a collective a peer never enters: under NCCL that is a silent hang), the thread calls
    `on_hang(message)`. `describe` compares the counters over 2.5 intervals: a rank whose counter stood
    still is dead or frozen; one that beats but is behind in steps is stuck. Start on every rank
    after the process group; `stop` it when training ends.
    """

    def __init__(
        self,
        timeout_s: float | None = None,
        on_hang: Callable[[str], None] | None = None,
        interval_s: float = 5.0,
    ) -> None:
        self.interval_s = interval_s if timeout_s is None else min(interval_s, max(0.5, timeout_s / 10))
        self.timeout_s, self.on_hang = timeout_s, on_hang
        self.rank, self.step = global_rank(), -1
        self.store = tdist.distributed_c10d._get_default_store() if is_initialized() else None
        self._progress = time.monotonic()
        self._stop = threading.Event()
        if self.store is not None:
            self.store.add(f"irdro/beat/{self.rank}", 1)
            threading.Thread(target=self._beat, name="irdro-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"irdro/beat/{self.rank}", 1)
            except Exception:  # the store's host is gone; `describe` reports it
                pass
            stalled = time.monotonic() - self._progress
            if self.timeout_s is not None and stalled > self.timeout_s and self.on_hang is not None:
                self.on_hang(f"no progress for {stalled:.0f}s at step {self.step + 1}: {self.describe()}")
                return

    def stop(self) -> None:
        self._stop.set()

    def at_step(self, step: int) -> None:
        """This rank starts 0-based optimizer step `step` (progress, for the watchdog and `describe`)."""
        self.step, self._progress = step, time.monotonic()
        if self.store is not None:
            self.store.set(f"irdro/step/{self.rank}", str(step))

    def describe(self) -> str:
        """Which ranks stopped answering or fell behind (waits 2.5 heartbeat intervals)."""
        if self.store is None:
            return "no other rank"
        world = world_size()
        others = [r for r in range(world) if r != self.rank]
        try:
            before = [self.store.add(f"irdro/beat/{r}", 0) for r in others]
            time.sleep(2.5 * self.interval_s)
            after = [self.store.add(f"irdro/beat/{r}", 0) for r in others]
            keys = {r: f"irdro/step/{r}" for r in range(world)}
            steps = {r: int(self.store.get(k)) + 1 for r, k in keys.items() if self.store.check([k])}
        except Exception:
            host = os.environ.get("MASTER_ADDR", "?")
            return f"rank 0, which hosts the rendezvous store ({host}), stopped answering"
        dead = [r for r, a, b in zip(others, before, after, strict=True) if a == b]
        if dead:
            return ", ".join(
                f"rank {r} stopped answering (no heartbeat; last seen at step {steps.get(r, '?')})" for r in dead
            )
        mine = steps.get(self.rank, 0)
        behind = [r for r in others if steps.get(r, 0) < mine]
        if behind:
            return ", ".join(f"rank {r} answers but is stuck at step {steps.get(r, '?')}" for r in behind)
        return "every rank still answers (a slow collective: raise collective_timeout_minutes?)"


def barrier() -> None:
    """Wait for every rank. Call on every rank."""
    if is_initialized():
        tdist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (picklable), in global-rank order, on every rank. Call on every rank."""
    if not is_initialized():
        return [obj]
    out: list[object] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` run on global rank 0 only, its result on every rank; an exception it raises is raised
    on every rank (so no rank is left waiting in a later collective). Call on every rank."""
    box: tuple[bool, object] | None = None
    if is_main():
        try:
            box = (True, fn())
        except Exception as e:  # handed to every rank, raised there
            box = (False, e)
    ok, value = broadcast_object(box)
    if not ok:
        raise value
    return value


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` (any picklable object) on every rank. Call on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]
