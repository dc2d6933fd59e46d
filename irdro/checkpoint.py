"""DeepSpeed checkpoints and consolidated weights.

Owns: where and how checkpoints are written (`OUTPUT_DIR/checkpoints/<tag>` + `latest`), what resume
state rides along in them (`client_state`: step, resolved recipe, data cursor), and gathering the
full weights of a (possibly ZeRO-3 sharded) engine. Must not: decide when to save (irdro.train).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from irdro import dist

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save(engine, output_dir: str | Path, step: int, client_state: dict) -> str:
    """Save a DeepSpeed checkpoint tagged `step_<step>`. Call on every rank.

    Args:
        engine: the DeepSpeed engine.
        output_dir: the run directory.
        step: optimizer steps completed.
        client_state: extra resume state (must hold the resolved recipe and the step).
    """
    tag = tag_for(step)
    engine.save_checkpoint(
        str(Path(output_dir) / CHECKPOINT_DIR), tag=tag, client_state=client_state
    )
    dist.barrier()
    log.info("checkpoint %s saved", tag)
    return tag


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU weights on rank 0 (None elsewhere), gathered one parameter at a time so a
    ZeRO-3 model never has to fit whole on one rank beyond its CPU copy. Call on every rank."""
    import deepspeed

    module = engine.module
    out: dict[str, torch.Tensor] | None = {} if dist.is_main() else None
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if out is not None:
                out[name] = param.detach().float().cpu().clone()
    if out is not None:
        for name, buf in module.named_buffers():
            out[name] = buf.detach().cpu().clone()
    return out
