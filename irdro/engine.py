"""DeepSpeed wiring: process group, optimizer, LR schedule, `deepspeed.initialize`.

Owns: the only `deepspeed.initialize` call, the optimizer and LR scheduler built from the recipe's
`optim` section (client objects, so the DS JSON never carries them), and process-group start-up for
the launcher and for plain `python -m irdro.train`. Must not: load data or compute losses.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import sys
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
        theirs = (
            dist.group_ranks(groups.get_data_parallel_group()),
            dist.group_ranks(groups.get_tensor_model_parallel_group()),
        )
        ours = (dist.layout().dp_ranks, dist.layout().mp_ranks)
        if theirs != ours:  # the weights would be gathered, and gradients averaged, over other ranks
            raise RuntimeError(f"DeepSpeed's AutoTP (DP, TP) groups {theirs} differ from irdro.dist's {ours}")

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
