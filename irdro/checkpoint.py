"""Checkpoints you can trust: atomic tags, completeness checks, exact and elastic resume.

Owns: the layout of `OUTPUT_DIR/checkpoints/` (one DeepSpeed tag `step_<N>` per save, a marker
`irdro_complete.json` written last, `latest` replaced atomically, rotation), the resume state that
rides along (step, data cursor, per-rank RNG states, the resolved recipe), choosing what to resume
from, and gathering full weights of a (ZeRO-3 sharded) engine. Must not: decide when to save
(irdro.train). Checkpoints must live on a filesystem every rank sees (as DeepSpeed requires).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from irdro import dist
from irdro.config import ConfigError
from irdro.fsio import atomic_write_text, staged_dir
from irdro.rundir import CHECKPOINT_DIR as CHECKPOINT_DIR  # re-exported for readers
from irdro.rundir import RunDir

log = logging.getLogger(__name__)

MARKER = "irdro_complete.json"
TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    """This rank's generators: Python, numpy, torch CPU and (on a GPU node) this rank's own device."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()` output. Only this rank's device is set: a checkpoint from a node with more
    GPUs per node must not index devices this node lacks (older checkpoints hold one state per device:
    this device's is used where it exists)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list | tuple):
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


def own_step_tensors(optimizer) -> int:
    """Give every parameter's optimizer `step` its own tensor on that parameter's device; returns how
    many were moved or unshared.

    DeepSpeed's universal-checkpoint load (an elastic resume) assigns `step` as a CPU tensor and, under
    ZeRO-3, one shared object to every sub-group. torch's fused AdamW needs the step on the parameter's
    device (its own load_state_dict moves it; this path bypasses that), and a shared step would be
    incremented once per sub-group per optimizer step.
    """
    seen: set[int] = set()
    fixed = 0
    for param, state in getattr(optimizer, "state", {}).items():
        step = state.get("step") if isinstance(state, dict) else None
        if not torch.is_tensor(step):
            continue
        if step.device != param.device or id(step) in seen:
            state["step"] = step.to(device=param.device, dtype=torch.float32, copy=True)
            fixed += 1
        seen.add(id(state["step"]))
    return fixed


def save(engine, output_dir: str | Path, step: int, client_state: dict, keep_last: int = 0) -> str:
    """Save tag `step_<step>` atomically, then point `latest` at it and rotate. Call on every rank.

    Every rank writes its DeepSpeed shards and RNG state into the new tag; after a barrier rank 0
    records every file's size in the marker (a tag without a valid marker is never loaded), then
    replaces `latest`, then deletes complete tags older than the newest `keep_last` (0 keeps all).
    """
    root = RunDir(output_dir).checkpoints
    tag = tag_for(step)
    if dist.is_main() and (root / tag).exists():  # a leftover of a crash at this very step
        shutil.rmtree(root / tag)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if engine.autotp_size() > 1:
        save_tp_weights(engine, root / tag)
    with open(root / tag / f"irdro_rng_rank{dist.global_rank()}.pkl", "wb") as f:
        pickle.dump(rng_state(), f)
    dist.barrier()
    problem = None
    if dist.is_main():
        missing = [r for r in range(dist.world_size()) if not (root / tag / f"irdro_rng_rank{r}.pkl").is_file()]
        if missing:
            problem = (
                f"{root / tag}: rank 0 cannot see the files of ranks {missing}; output_dir must be on "
                "a filesystem every node shares (docs/multinode.md)"
            )
    problem = dist.broadcast_object(problem)
    if problem:  # every rank raises together: no one waits at the next barrier
        raise RuntimeError(problem)
    if dist.is_main():
        files = {p.name: p.stat().st_size for p in sorted((root / tag).iterdir()) if p.is_file()}
        marker = {"step": step, "world_size": client_state["world_size"], "files": files}
        atomic_write_text(root / tag / MARKER, json.dumps(marker, indent=1))
        atomic_write_text(root / "latest", tag)
        if keep_last > 0:
            for old in complete_tags(root)[keep_last:]:
                shutil.rmtree(root / old, ignore_errors=True)
                shutil.rmtree(root / f"{old}_universal", ignore_errors=True)
    dist.barrier()
    log.info("checkpoint %s saved", tag)
    return tag


def check_complete(tag_dir: Path) -> str | None:
    """None if `tag_dir` is a complete checkpoint, else why not."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return "no completion marker (the save was interrupted)"
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return "unreadable completion marker"
    for name, size in meta["files"].items():
        p = tag_dir / name
        if not p.is_file():
            return f"missing {name}"
        if p.stat().st_size != size:
            return f"truncated {name} ({p.stat().st_size} of {size} bytes)"
    return None


def complete_tags(root: Path) -> list[str]:
    """Complete `step_*` tags under `root`, newest first."""
    tags = [p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)] if root.is_dir() else []
    tags.sort(key=lambda t: int(TAG_RE.match(t).group(1)), reverse=True)
    return [t for t in tags if check_complete(root / t) is None]


@dataclass(frozen=True)
class ResumePoint:
    tag_dir: Path
    step: int
    world_size: int


def find_resume(output_dir: str | Path, resume: str) -> ResumePoint | None:
    """What to resume from: `never` -> None; `auto` -> the newest complete tag in `output_dir`
    (incomplete newer tags are skipped with a warning); otherwise a tag directory path."""
    if resume == "never":
        return None
    if resume == "auto":
        root = RunDir(output_dir).checkpoints
        if not root.is_dir():
            return None
        candidates = sorted(
            (p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
            key=lambda p: int(TAG_RE.match(p.name).group(1)),
            reverse=True,
        )
        for tag_dir in candidates:
            why = check_complete(tag_dir)
            if why is None:
                return _point(tag_dir)
            log.warning("skipping checkpoint %s: %s; falling back to an older one", tag_dir, why)
        return None
    tag_dir = Path(resume)
    if (tag_dir / "latest").is_file():  # a checkpoints/ dir: follow latest
        tag_dir = tag_dir / (tag_dir / "latest").read_text().strip()
    why = check_complete(tag_dir) if tag_dir.is_dir() else "not a directory"
    if why is not None:
        raise ConfigError(f"resume: {resume}: not a loadable checkpoint ({why})")
    return _point(tag_dir)


def _point(tag_dir: Path) -> ResumePoint:
    meta = json.loads((tag_dir / MARKER).read_text())
    return ResumePoint(tag_dir=tag_dir, step=int(meta["step"]), world_size=int(meta["world_size"]))


def universal_dir(point: ResumePoint) -> Path:
    return point.tag_dir.with_name(point.tag_dir.name + "_universal")


def prepare_elastic(point: ResumePoint) -> Path:
    """Convert a checkpoint written by another number of ranks to DeepSpeed's universal format
    (once; cached next to the tag). Call on every rank; rank 0 converts.

    Raises:
        ConfigError: the tag was saved with tensor parallelism, which the conversion cannot merge.
    """
    saved_tp = _tensor_parallel_degree(point.tag_dir)
    if saved_tp > 1:
        raise ConfigError(
            f"resume: {point.tag_dir} was saved with parallel.tensor_parallel={saved_tp} on {point.world_size} "
            f"data-parallel ranks; DeepSpeed cannot convert AutoTP checkpoints to another layout: launch the "
            f"same layout, or export it (tools/convert_to_hf.py) and start a new run from the export"
        )
    out = universal_dir(point)
    if dist.is_main() and not (out / MARKER).is_file():
        log.info("converting %s (%d ranks) to a universal checkpoint", point.tag_dir, point.world_size)
        # A leftover without the marker (a crash mid-conversion) is replaced once the new one is in place.
        with staged_dir(out, overwrite=True) as tmp:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "deepspeed.checkpoint.ds_to_universal",
                    "--input_folder",
                    str(point.tag_dir),
                    "--output_folder",
                    str(tmp),
                    "--num_extract_workers",
                    "1",
                    "--num_merge_workers",
                    "1",
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"universal conversion of {point.tag_dir} failed:\n{proc.stderr[-2000:]}")
            for f in point.tag_dir.iterdir():  # our own resume files travel with it
                if f.name.startswith("irdro_") and f.name != MARKER:
                    shutil.copy2(f, tmp / f.name)
            shutil.copy2(point.tag_dir / MARKER, tmp / MARKER)
    dist.barrier()
    return out


def load(engine, point: ResumePoint, elastic: bool, global_batch: int) -> dict:
    """Load weights, optimizer, LR schedule and RNG from `point`; returns the client state.
    Call on every rank.

    Args:
        engine: the DeepSpeed engine to load into.
        point: the checkpoint chosen by `find_resume`.
        elastic: load the universal checkpoint made by `prepare_elastic` (another world size).
        global_batch: samples per optimizer step of this launch; the index-based data cursor is
            only valid for the global batch the checkpoint was trained with.

    Raises:
        ConfigError: the checkpoint was trained with another global batch or tensor-parallel size.
    """
    tag_dir = universal_dir(point) if elastic else point.tag_dir
    saved_tp, tp = _tensor_parallel_degree(tag_dir), max(1, engine.autotp_size())
    if saved_tp != tp:
        raise ConfigError(
            f"resume: {point.tag_dir} was saved with parallel.tensor_parallel={saved_tp}, this launch has {tp}; "
            f"resume with the same tensor_parallel, or export it (tools/convert_to_hf.py) and start a new run"
        )
    _, client_state = engine.load_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load {tag_dir}")
    step = client_state["step"]
    saved = client_state["consumed_samples"] // max(1, step) if step else None
    if saved is not None and saved != global_batch:
        raise ConfigError(
            f"resume: {point.tag_dir} was trained with a global batch of {saved} samples per step; "
            f"this launch has {global_batch} (micro_batch_size x grad_accum_steps x "
            f"{dist.dp_size()} ranks): change grad_accum_steps so they match"
        )
    rng_file = tag_dir / f"irdro_rng_rank{dist.global_rank()}.pkl"
    if not rng_file.is_file():
        rng_file = tag_dir / "irdro_rng_rank0.pkl"
    with open(rng_file, "rb") as f:
        set_rng_state(pickle.load(f))
    if elastic:
        own_step_tensors(getattr(engine.optimizer, "optimizer", engine.optimizer))
    return client_state


def gathered_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 CPU weights on rank 0 (None elsewhere), gathered one module at a time (its ZeRO-3
    partitions, then its AutoTP shards) so a sharded model never has to fit whole on one rank beyond
    its CPU copy. Call on every rank."""
    import deepspeed
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    tensor_parallel = engine.autotp_size() > 1
    out: dict[str, torch.Tensor] | None = {} if dist.is_main() else None
    seen: set[int] = set()  # a tied parameter is kept under its first name, as named_parameters() does
    for prefix, module in engine.module.named_modules():
        params = {n: p for n, p in module.named_parameters(recurse=False) if id(p) not in seen}
        seen.update(map(id, params.values()))
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            with GatherReplacedLayerParams(list(params.values()), module, enabled=tensor_parallel):
                if out is not None:
                    for name, param in params.items():
                        out[f"{prefix}.{name}" if prefix else name] = param.detach().float().cpu().clone()
    if out is not None:
        for name, buf in engine.module.named_buffers():
            out[name] = buf.detach().cpu().clone()
    return out


def consolidated_fp32(tag_dir: Path) -> dict:
    """Lazily consolidated fp32 weights of a saved ZeRO-2/3 tag: name -> tensor or lazy tensor
    (call `.contiguous()` to materialise one; the optimizer files are memory-mapped, so only the
    tensors being written are resident). Tied parameters map to the same object.

    A tag of an AutoTP run is read whole from the weights gathered when it was saved (`TP_WEIGHTS`,
    in the model's dtype): DeepSpeed 0.19's zero_to_fp32 and ds_to_universal cannot consolidate
    AutoTP + ZeRO shards (ZeRO-3 partitions the TP-replicated parameters over the TP ranks too, and
    both tools fail on such a tag).
    """
    import contextlib
    import io

    if (tag_dir / TP_WEIGHTS).is_file():
        from safetensors.torch import load_file

        return load_file(str(tag_dir / TP_WEIGHTS))
    if _tensor_parallel_degree(tag_dir) > 1:
        raise RuntimeError(f"{tag_dir}: an AutoTP checkpoint without {TP_WEIGHTS}; cannot consolidate its shards")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)


# Full weights of an AutoTP run's tag, gathered over TP and ZeRO when it is saved (what exports read).
TP_WEIGHTS = "irdro_tp_weights.safetensors"


def save_tp_weights(engine, tag_dir: Path) -> None:
    """Write the engine's full weights (parameters and persistent buffers; a tied parameter once) in
    the model's dtype into `tag_dir/TP_WEIGHTS`, gathered one module at a time; rank 0 holds them in
    CPU memory while writing. A bf16 run stores its bf16 module weights, not ZeRO's fp32 master copy.
    Call on every rank, for AutoTP engines only."""
    from safetensors.torch import save_file

    dtype = engine.module.dtype
    state = gathered_state_dict(engine)
    if state is not None:
        keep = set(engine.module.state_dict().keys())
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k in keep}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tag_dir / TP_WEIGHTS))


def _tensor_parallel_degree(tag_dir: Path) -> int:
    """The AutoTP degree a tag was saved with (1 without tensor parallelism)."""
    files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return 1
    states = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    return int((states.get("checkpoint_parallel_dimensions") or {}).get("tp_degree", 1))
