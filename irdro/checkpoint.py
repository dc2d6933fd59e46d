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
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from irdro import dist
from irdro.config import ConfigError
from irdro.fsio import atomic_write_text, fsync_file, staged_dir
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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or converted; one line naming the path and what to do.
    Raised on every rank together, so none is left waiting in a collective."""


@contextmanager
def _recorded_writes(engine) -> Iterator[list[str]]:
    """The paths this rank's DeepSpeed writes inside the block: DeepSpeed writes every checkpoint file
    through its checkpoint engine's `save(state_dict, path)`, which is wrapped for the block."""
    ce = engine.checkpoint_engine
    had_own = "save" in vars(ce)
    original = ce.save
    written: list[str] = []

    def save(state_dict, path, *args, **kwargs):
        written.append(str(path))
        return original(state_dict, path, *args, **kwargs)

    ce.save = save
    try:
        yield written
    finally:
        if had_own:
            ce.save = original
        else:
            del ce.save


def _write_own_files(engine, root: Path, tag: str, client_state: dict) -> tuple[dict[str, int], str | None]:
    """This rank's part of a save: DeepSpeed's files and our RNG state, each fsynced.

    Returns `({file name: size}, None)`, or `({}, error)` when a write failed (a full disk, a
    read-only or vanished directory). Call on every rank: a rank whose DeepSpeed save failed still
    enters the barrier DeepSpeed's save ends with, where the other ranks wait.
    """
    ds_done = False
    try:
        with _recorded_writes(engine) as written:
            engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        ds_done = True
        if engine.autotp_size() > 1:  # a collective; rank 0 writes the gathered weights
            save_tp_weights(engine, root / tag)
            if dist.is_main():
                written.append(str(root / tag / TP_WEIGHTS))
        rng = root / tag / f"irdro_rng_rank{dist.global_rank()}.pkl"
        with open(rng, "wb") as f:
            pickle.dump(rng_state(), f)
        written.append(str(rng))
        return {Path(p).name: fsync_file(Path(p)) for p in written}, None
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if not ds_done:
            dist.barrier()
        return {}, f"rank {dist.global_rank()}: {one_line(e)}"


def one_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}".strip()


def _wait_for_names(tag_dir: Path, names: set[str], timeout_s: float = 30.0) -> set[str]:
    """The names of `names` still missing from rank 0's listing of `tag_dir` after up to `timeout_s`
    (a shared filesystem's directory cache can lag the other nodes' writes by seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = names - set(os.listdir(tag_dir))
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1.0)


def save(engine, output_dir: str | Path, step: int, client_state: dict, keep_last: int = 0) -> str:
    """Save tag `step_<step>` atomically, then point `latest` at it and rotate. Call on every rank.

    Every rank writes and fsyncs its own files (DeepSpeed's shards, its RNG state) and reports their
    sizes; rank 0 merges the reports into the marker (no `stat` of another node's file through a
    lagging cache), fsyncs it, and only then replaces `latest` and deletes complete tags older than
    the newest `keep_last` (0 keeps all). A tag without a valid marker is never loaded.

    Raises:
        CheckpointError: on every rank, when a rank could not write its files (the partial tag is
            removed; the previous checkpoint and `latest` are untouched) or rank 0 cannot see them.
    """
    root = RunDir(output_dir).checkpoints
    tag = tag_for(step)
    tag_dir = root / tag

    def clear_leftovers() -> None:  # a crash at this very step; a universal copy of an older tag of this name
        for d in (tag_dir, universal_dir(tag_dir)):
            if d.exists():
                shutil.rmtree(d)

    dist.from_main(clear_leftovers)
    reports = dist.gather_objects(_write_own_files(engine, root, tag, client_state))
    errors = [error for _, error in reports if error]
    if errors:
        dist.from_main(lambda: shutil.rmtree(tag_dir, ignore_errors=True))
        raise CheckpointError(_save_failed(root, tag_dir, errors))

    def publish() -> None:
        files = {name: size for own, _ in reports for name, size in own.items()}
        missing = _wait_for_names(tag_dir, set(files))
        if missing:
            shutil.rmtree(tag_dir, ignore_errors=True)
            raise CheckpointError(
                f"{tag_dir}: rank 0 cannot see {len(missing)} files the other ranks wrote (e.g. "
                f"{sorted(missing)[0]}); output_dir must be on a filesystem every node shares (docs/multinode.md)"
            )
        marker = {
            "step": step,
            "world_size": client_state["world_size"],
            "sequence_parallel": client_state["sequence_parallel"],
            "tensor_parallel": client_state["tensor_parallel"],
            "id": uuid.uuid4().hex,
            "files": files,
        }
        atomic_write_text(tag_dir / MARKER, json.dumps(marker, indent=1))  # fsynced before `latest` moves
        atomic_write_text(root / "latest", tag)
        if keep_last > 0:
            for old in complete_tags(root)[keep_last:]:
                shutil.rmtree(root / old, ignore_errors=True)
                shutil.rmtree(universal_dir(root / old), ignore_errors=True)

    dist.from_main(publish)
    log.info("checkpoint %s saved", tag)
    return tag


def _save_failed(root: Path, tag_dir: Path, errors: list[str]) -> str:
    """The one-line error of a failed save: what failed, what is intact, the space a save needs."""
    previous = complete_tags(root)
    if previous:
        meta = json.loads((root / previous[0] / MARKER).read_text())
        need = f"a checkpoint of this run takes {sum(meta['files'].values()) / 2**30:.2f} GiB"
        kept = f"the previous checkpoint {previous[0]} and `latest` are intact"
    else:
        need, kept = "this is the run's first checkpoint", "no earlier checkpoint exists"
    free = shutil.disk_usage(root).free / 2**30 if root.is_dir() else float("nan")
    more = f" (and {len(errors) - 1} more ranks)" if len(errors) > 1 else ""
    return (
        f"checkpoint {tag_dir} not saved: {errors[0]}{more}; the partial tag was removed, {kept}; {need} and "
        f"{free:.2f} GiB are free on {root}: free space (or point output_dir elsewhere) and rerun to resume"
    )


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
    """Data-parallel ranks that wrote it."""
    sequence_parallel: int = 1
    """Ranks each sample was split over (markers written before it existed: 1)."""
    tensor_parallel: int = 1
    """Ranks each layer was split over (likewise)."""


def find_resume(output_dir: str | Path, resume: str) -> ResumePoint | None:
    """What to resume from: `never` -> None; `auto` -> the newest complete tag in `output_dir`
    (incomplete newer tags are skipped with a warning); otherwise a tag directory path."""
    if resume == "never":
        earlier = complete_tags(RunDir(output_dir).checkpoints)
        if earlier:
            raise ConfigError(
                f"resume: never, but {RunDir(output_dir).checkpoints} holds an earlier run's checkpoints (newest "
                f"{earlier[0]}), which a later `resume: auto` would pick up instead of this run's: use a new "
                "output_dir, move those checkpoints away, or continue them with resume: auto"
            )
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
    return ResumePoint(
        tag_dir=tag_dir,
        step=int(meta["step"]),
        world_size=int(meta["world_size"]),
        sequence_parallel=int(meta.get("sequence_parallel", 1)),
        tensor_parallel=int(meta.get("tensor_parallel", 1)),
    )


def universal_dir(tag_dir: Path) -> Path:
    """Where the universal (any world size) copy of checkpoint `tag_dir` is cached."""
    return tag_dir.with_name(tag_dir.name + "_universal")


def _same_marker(a: Path, b: Path) -> bool:
    """Both directories carry the same completion marker: the cache `a` was made from this `b`
    (every save writes a marker with a fresh id, so a tag rewritten by a later run differs)."""
    try:
        return json.loads((a / MARKER).read_text()) == json.loads((b / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False


def conversion_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def prepare_elastic(point: ResumePoint) -> Path:
    """Convert a checkpoint written by another number of ranks to DeepSpeed's universal format,
    cached beside the tag and reused only while it belongs to that very tag. Call on every rank:
    rank 0 converts, and a failure is raised on every rank (CheckpointError).

    Only for layouts without sequence or tensor parallelism (`irdro.train.check_resume_layout`).
    """
    out = universal_dir(point.tag_dir)

    def convert() -> None:
        if _same_marker(out, point.tag_dir):
            return
        log.info("converting %s (%d ranks) to a universal checkpoint", point.tag_dir, point.world_size)
        workers = str(conversion_workers())
        logfile = out.with_name(out.name + ".log")
        # A stale or partial cache is replaced once the new one is in place.
        with staged_dir(out, overwrite=True) as tmp:
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder"]
            cmd += [str(point.tag_dir), "--output_folder", str(tmp)]
            cmd += ["--num_extract_workers", workers, "--num_merge_workers", workers]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                atomic_write_text(logfile, proc.stdout + proc.stderr)
                last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "no output")
                raise CheckpointError(
                    f"resume: converting {point.tag_dir} ({point.world_size} ranks) to a universal checkpoint "
                    f"failed ({last.strip()}); full log: {logfile}. Resume on {point.world_size} ranks, or "
                    "fix the cause and rerun"
                )
            for f in point.tag_dir.iterdir():  # our own resume files travel with it
                if f.name.startswith("irdro_") and f.name != MARKER:
                    shutil.copy2(f, tmp / f.name)
            shutil.copy2(point.tag_dir / MARKER, tmp / MARKER)

    dist.from_main(convert)
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
        ConfigError: the checkpoint was trained with another global batch.
    """
    tag_dir = universal_dir(point.tag_dir) if elastic else point.tag_dir
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
