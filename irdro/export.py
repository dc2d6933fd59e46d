"""Export a run's DeepSpeed checkpoint as a complete Hugging Face model folder.

Owns: consolidating ZeRO shards one tensor at a time into sharded safetensors + index, the config
(with the exported dtype), generation config and tokenizer (from the run's `hf/` folder), tied vs
untied embeddings, the temp-dir-then-rename write (through irdro.fsio), and `verify` (reload with
transformers and compare logits). Must not: train, or import deepspeed directly (irdro.checkpoint does).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import time
from pathlib import Path

import torch

from irdro.checkpoint import check_complete, consolidated_fp32
from irdro.fsio import staged_dir
from irdro.model import DTYPE_NAMES, DTYPES
from irdro.rundir import RunDir

log = logging.getLogger(__name__)


class ExportError(Exception):
    """A one-line, user-facing export problem (names the path and what to do)."""


def parse_size(text: str) -> int:
    """'2GB', '500MB', '10KB' or a plain byte count -> bytes (powers of 1024)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?", text.strip().upper())
    if not m:
        raise ExportError(f"--max-shard-size: cannot parse {text!r} (e.g. 2GB, 500MB)")
    return int(float(m.group(1)) * 1024 ** (" KMGT".index(m.group(2) or " ")))


def resolve_tag(run_dir: Path, tag: str | None) -> Path:
    root = RunDir(run_dir).checkpoints
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise ExportError(f"{run_dir}: no checkpoints/latest; is this a run directory with a saved checkpoint?")
        tag = latest.read_text().strip()
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise ExportError(f"{tag_dir}: no such checkpoint tag (see {root})")
    why = check_complete(tag_dir)
    if why is not None:
        raise ExportError(f"{tag_dir}: incomplete checkpoint ({why}); pass --tag of an older one")
    return tag_dir


# safetensors dtype names of the tensors an export can hold.
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(
    path: Path,
    names: list[str],
    specs: dict[str, tuple[torch.Size, torch.dtype]],
    materialise,
    metadata: dict[str, str],
) -> None:
    """Write one safetensors file tensor by tensor: the header from the planned shapes first, then
    each tensor's bytes as soon as it is materialised, so at most one tensor is in memory
    (safetensors' save_file needs the whole shard as a dict of tensors)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = materialise(name)
            assert t.shape == specs[name][0] and t.dtype == specs[name][1], name
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t


def _plan_shards(names: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        if shards[-1] and used + sizes[name] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def _existing_parent(path: Path) -> Path:
    """`path` or its nearest existing ancestor (where free space can be measured)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def export_hf(
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    tag: str | None = None,
    dtype: str = "bf16",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write RUN_DIR's checkpoint `tag` (default: latest) as an HF folder at `output`.

    Returns a summary: tag, number of tensors and shards, bytes written, seconds.
    """
    from transformers import AutoConfig

    t0 = time.perf_counter()
    run_dir, output = Path(run_dir), Path(output)
    tag_dir = resolve_tag(run_dir, tag)
    hf_dir = RunDir(run_dir).hf
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir}: missing config.json (written at the start of every irdro run)")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"{output}: exists and is not empty; pass --overwrite to replace it")
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    state = consolidated_fp32(tag_dir)

    # Tied embeddings: the checkpoint holds one tensor under two names; HF stores it once.
    names, seen = [], {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in state.items():
        if id(tensor) in seen or (tied and name == "lm_head.weight"):
            continue
        seen[id(tensor)] = name
        names.append(name)
    target = DTYPES[dtype]
    sizes = {
        n: int(torch.Size(state[n].shape).numel())
        * (target.itemsize if state[n].dtype.is_floating_point else state[n].dtype.itemsize)
        for n in names
    }
    shards = _plan_shards(names, sizes, parse_size(max_shard_size))
    specs = {
        n: (torch.Size(state[n].shape), target if state[n].dtype.is_floating_point else state[n].dtype) for n in names
    }

    need = sum(sizes.values())
    free = shutil.disk_usage(_existing_parent(output)).free
    if free < need:
        raise ExportError(
            f"{output}: the export needs {need / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free there; "
            "free space or choose another --output"
        )
    try:
        # Written beside `output`, renamed onto it when complete; an old export goes only afterwards.
        with staged_dir(output, overwrite=True) as tmp:
            from tqdm.auto import tqdm

            weight_map: dict[str, str] = {}
            bar = tqdm(
                total=sum(sizes.values()),
                unit="B",
                unit_scale=True,
                desc="export",
                disable=not progress,
            )
            for i, shard in enumerate(shards):
                fname = (
                    "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                )

                def materialise(name: str) -> torch.Tensor:
                    t = state[name]
                    t = t.contiguous() if not isinstance(t, torch.Tensor) else t
                    return t.to(target) if t.dtype.is_floating_point else t

                _write_safetensors(tmp / fname, shard, specs, materialise, {"format": "pt"})
                for name in shard:
                    weight_map[name] = fname
                    bar.update(sizes[name])
            bar.close()
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            for f in hf_dir.iterdir():  # tokenizer, chat template, generation config
                if f.is_file() and f.name != "config.json":
                    shutil.copy2(f, tmp / f.name)
            config.dtype = DTYPE_NAMES[dtype]
            config.use_cache = True
            config.save_pretrained(tmp)
    except OSError as e:  # the disk filled up meanwhile, the directory became unwritable
        free = shutil.disk_usage(_existing_parent(output)).free
        raise ExportError(
            f"{output}: export failed ({e.strerror or e}: {e.filename or output}); the partial copy was removed "
            f"and {output} is as it was; the export needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free"
        ) from None
    return {
        "tag": tag_dir.name,
        "tensors": len(names),
        "shards": len(shards),
        "bytes": sum(sizes.values()),
        "seconds": time.perf_counter() - t0,
    }


def probe_tokens(vocab_size: int, n: int = 32) -> torch.Tensor:
    """Fixed token ids (1, n) for logit comparisons."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, n), generator=g)


def verify(
    run_dir: str | os.PathLike, output: str | os.PathLike, *, tag: str | None = None, dtype: str = "bf16"
) -> float:
    """Max |logit difference| between the exported folder reloaded by transformers and a model
    built from the checkpoint's consolidated weights (rounded to the export dtype), on fixed tokens.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir, output = Path(run_dir), Path(output)
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32, local_files_only=True)
    config = AutoConfig.from_pretrained(RunDir(run_dir).hf, local_files_only=True)
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = consolidated_fp32(resolve_tag(run_dir, tag))
    target = DTYPES[dtype]
    # Fill the reference one tensor at a time (no second full copy of the weights); tied names
    # map to one tensor, so both are accepted.
    slots = dict(reference.named_parameters(remove_duplicate=False))
    slots.update(reference.named_buffers(remove_duplicate=False))
    unexpected = [name for name in state if name not in slots]
    saved_names = set(reference.state_dict())
    missing = [name for name in slots if name not in state and name in saved_names]
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"checkpoint and config disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, t in state.items():
            t = t.contiguous() if not isinstance(t, torch.Tensor) else t
            slots[name].copy_(t.to(target).float() if t.dtype.is_floating_point else t)
    del state  # unmaps the checkpoint's optimizer files
    if config.tie_word_embeddings:
        reference.tie_weights()
    ids = probe_tokens(config.vocab_size)
    with torch.no_grad():
        a = reloaded.eval()(ids).logits
        b = reference.eval()(ids).logits
    return float((a - b).abs().max())
