"""DeepSpeed wiring: process group, optimizer, LR schedule, `deepspeed.initialize`.

Owns: the only `deepspeed.initialize` call, the optimizer and LR scheduler built from the recipe's
`optim` section (client objects, so the DS JSON never carries them), process-group start-up for
the launcher and for plain `python -m irdro.train`, and the one use of DeepSpeed internals
(`gradients_divided_by`). Must not: load data or compute losses.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import torch

from irdro.config import ConfigError, OptimConfig, Recipe, offloads_optimizer

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float = 10.0) -> None:
    """Start the process group (gloo on CPU, nccl on GPU) whose collectives fail after
    `timeout_minutes` of waiting. A plain `python -m irdro.train` becomes a world of one, so every
    code path is the distributed one."""
    import deepspeed

    if "RANK" not in os.environ:
        others = {
            k: v
            for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS")
            if (v := os.environ.get(k, "1")).isdigit() and int(v) > 1
        }
        if others:  # mpirun / srun -n N without the deepspeed launcher: each would train alone
            raise ConfigError(
                f"started as one of several processes ({others}) without RANK; launch with `deepspeed` "
                "(one `deepspeed --no_ssh --node_rank R` per node, see docs/multinode.md)"
            )
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # before the process group: NCCL binds to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def shutdown_distributed() -> None:
    """Wait for every rank, then tear the process group down while the interpreter is still whole.

    Call on the success path only (a rank that failed would leave the others in the barrier). Without
    it gloo's worker threads are destroyed during interpreter finalisation, and a rank can die with
    SIGABRT ("terminate called without an active exception") after its work is done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End this rank's process with `code` once its outputs are closed, skipping interpreter
    finalisation: C++ threads (gloo, the c10d store) torn down there can abort a process whose work
    is done (SIGABRT, "terminate called without an active exception"), turning a finished run
    into a failed job. Log handlers and std streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def adamw_implementation(ds_config: dict) -> str:
    """Which AdamW the recipe's `optim.name: adamw` becomes.

    `cpu_adam` (DeepSpeedCPUAdam) when the optimizer is offloaded; on CUDA `deepspeed_fused` only when
    DeepSpeed was installed with its FusedAdam op prebuilt (DS_BUILD_FUSED_ADAM=1), else `torch_fused`
    (torch.optim.AdamW(fused=True): one fused kernel, no nvcc, no JIT build on each node's first run,
    which fails on nodes without a CUDA toolkit); `torch` (the default foreach AdamW) on CPU.
    """
    if offloads_optimizer(ds_config):
        return "cpu_adam"
    if not torch.cuda.is_available():
        return "torch"
    from deepspeed.git_version_info import installed_ops

    return "deepspeed_fused" if installed_ops.get("fused_adam", False) else "torch_fused"


def build_optimizer(params, cfg: OptimConfig, ds_config: dict) -> torch.optim.Optimizer:
    """AdamW (see `adamw_implementation`) or SGD over the parameters that require grad."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    impl = adamw_implementation(ds_config)
    log.info("optimizer: AdamW (%s)", impl)
    if impl == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    if impl == "deepspeed_fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(params, fused=impl == "torch_fused" or None, **kwargs)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier on `cfg.lr` at optimizer step s: linear warm-up, then constant/cosine/linear decay
    to `min_lr_ratio` at `max_steps`."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.scheduler == "constant":
            return 1.0
        span = max(1, max_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.scheduler == "cosine" else 1 - t
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def initialize(recipe: Recipe, model: torch.nn.Module, ds_config: dict, mpu=None):
    """`deepspeed.initialize` with our optimizer and scheduler; returns the engine.

    `mpu`: the sequence-parallel state of `irdro.model.enable_sequence_parallel` (None without SP).
    With AutoTP (`tensor_parallel.autotp_size` > 1) DeepSpeed's own (DP, TP) mesh is made first and
    handed in as the model-parallel unit, so the engine's batch check, gradient averaging and ZeRO
    partitioning use the DP group; its groups must be irdro.dist's (checked), which the weight
    gather and the sampler use.
    """
    import deepspeed

    tp = ds_config.get("tensor_parallel", {}).get("autotp_size", 0)
    if tp > 1:
        from deepspeed.utils import groups

        from irdro import dist

        groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
        mpu = groups
        dist.check_deepspeed_groups(groups.get_tensor_model_parallel_group(), groups.get_data_parallel_group())

    # Callables, so DeepSpeed builds both over the parameters and optimizer it actually manages.
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=lambda params: build_optimizer(params, recipe.optim, ds_config),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(recipe.optim, recipe.max_steps)),
        config=ds_config,
        mpu=mpu,
    )
    return engine


@contextmanager
def gradients_divided_by(engine, normaliser: float) -> Iterator[None]:
    """An `engine.step()` inside the block divides the accumulated gradients by `normaliser` before
    DeepSpeed computes the gradient norm and clips; the norm it reports is the divided one.

    The deferred `step` window (irdro.normalize.DeferredWindow) needs this: its softmax normaliser is
    known only after the last backward. DeepSpeed internals, ZeRO stages 2 and 3 (0.19;
    `tests/unit/test_gradient_division.py` fails if an upgrade changes them): the ZeRO optimizer's
    `step()` takes the global norm of the accumulated gradients, stores `_global_grad_norm = norm /
    loss_scale` and multiplies the gradients by `1 / (loss_scale * max(1, (norm / loss_scale + 1e-6) /
    clip))` in `unscale_and_clip_grads`. irdro refuses fp16, so the scaler is static at 1.0; setting it
    to `normaliser` for the boundary step only (`backward` multiplies the loss by it, so never around
    a backward) divides exactly, and it is restored afterwards, also in checkpoints.

    Args:
        engine: a DeepSpeed engine with a ZeRO stage 2 or 3 optimizer.
        normaliser: finite, > 0; 1.0 changes nothing.
    """
    opt = engine.optimizer
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is None or scaler.dynamic or getattr(opt, "custom_loss_scaler", True) or opt.loss_scale != 1.0:
        raise RuntimeError(
            f"irdro bug: gradients_divided_by needs a ZeRO optimizer with a static loss scale of 1.0, got "
            f"{type(opt).__name__} (loss scaler {type(scaler).__name__})"
        )
    if not (math.isfinite(normaliser) and normaliser > 0):
        raise ValueError(f"the gradient normaliser must be finite and > 0, got {normaliser}")
    opt.loss_scale = normaliser
    try:
        yield
    finally:
        opt.loss_scale = 1.0
