"""Scoring a shard directory with a causal LM: every sample's mean NLL, as training computes it.

Owns: running a model (a plain replica per rank, or one ZeRO-3 engine over the ranks) over a
shard directory in fixed chunks of sample ids, the resumable partial results of a run, and
assembling them into irdro.scores' format. Must not: define the scores format (irdro.scores), the
batches (irdro.data.collate / collate_packed) or the per-sample loss (irdro.train.forward_losses,
on irdro.model's per_sample_nll / packed_sample_nll): a score r_i is the l_i training would compute
for sample i with the same model, so l_i - r_i compares like with like.

Work split. Chunk c holds sample ids [c*S, (c+1)*S) (S = chunk_size) and runs on rank c % world;
each chunk is cut into micro-batches of consecutive ids, so the scores do not depend on the world
size. A finished chunk is written atomically to DIR/scores/.NAME.partial/chunk_CCCCC.npz with the
run's key (model weights, dtype, shards, chunk size, packing): a rerun after a kill skips the chunks that
carry its key, and a partial directory of another key is discarded. When every chunk is done rank 0
assembles them, writes DIR/scores/NAME (irdro.scores.write_scores) and removes the partial dir.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from irdro import dist, fsio
from irdro.config import ConfigError, ModelConfig
from irdro.scores import DEFAULT_NAME, META_NAME, ScoresMeta, manifest_sha256, scores_dir, write_scores
from irdro.shards import DataError, ShardDataset, check_compatible, tokenizer_fingerprint

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256
WEIGHT_SUFFIXES = (".safetensors", ".bin")
PACKING = ("none", "boundary")


@dataclass(frozen=True)
class ScoreResult:
    """What a scoring run did (the same on every rank, except the per-rank chunk counts).

    Attributes:
        path: DIR/scores/NAME, or None when the run stopped early (``stop_after_chunks``).
        num_samples: samples scored.
        num_tokens: target tokens over all samples.
        mean_nll: mean of the per-sample scores.
        token_nll: mean NLL per target token over all samples.
        seconds: wall time of this call.
        computed_chunks: chunks this rank computed in this call.
        reused_chunks: chunks this rank found finished in the partial dir.
    """

    path: Path | None
    num_samples: int
    num_tokens: int
    mean_nll: float
    token_nll: float
    seconds: float
    computed_chunks: int
    reused_chunks: int


def model_sha256(model_dir: str | Path) -> str:
    """sha256 over the model folder's weight files (*.safetensors, *.bin, sorted by name): each
    file's name and sha256 on a line.

    Raises:
        DataError: the folder is missing or holds no config.json or no weight files.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise DataError(f"--model {model_dir}: no such directory; pass a Hugging Face model folder")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not (path / "config.json").is_file() or not weights:
        raise DataError(
            f"--model {model_dir}: not a Hugging Face model folder (needs config.json and *.safetensors "
            "or *.bin weights); export a run with tools/convert_to_hf.py"
        )
    digest = hashlib.sha256()
    for p in weights:
        digest.update(f"{p.name} {fsio.sha256_file(p)}\n".encode())
    return digest.hexdigest()


def chunk_ranges(num_samples: int, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) sample ids of every chunk, in order."""
    return [(s, min(num_samples, s + chunk_size)) for s in range(0, num_samples, chunk_size)]


def partial_dir(shard_dir: str | Path, name: str) -> Path:
    """DIR/scores/.NAME.partial: the finished chunks of an unfinished run."""
    out = scores_dir(shard_dir, name)
    return out.with_name(f".{out.name}.partial")


def _chunk_file(partial: Path, c: int) -> Path:
    return partial / f"chunk_{c:05d}.npz"


def _read_chunk(file: Path, key: str, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A finished chunk's (nll, tokens), or None if it is absent, of another run or unreadable."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["key"]) != key or z["nll"].shape != (size,) or z["tokens"].shape != (size,):
                return None
            return z["nll"].astype(np.float64), z["tokens"].astype(np.int64)
    except (OSError, ValueError, KeyError):
        return None


def _write_chunk(file: Path, key: str, nll: np.ndarray, tokens: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), nll=nll.astype(np.float64), tokens=tokens.astype(np.int64))
    fsio.atomic_write_bytes(file, buf.getvalue())


def _prepare_partial(partial: Path, key: str) -> None:
    """Keep `partial` only if it belongs to the run `key` (rank 0, before any rank reads it)."""
    key_file = partial / "key.json"
    if partial.is_dir():
        try:
            old = json.loads(key_file.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            old = None
        if old == key:
            return
        log.warning("discarding %s: it holds chunks of another model, dtype, data or chunk size", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    fsio.atomic_write_text(key_file, json.dumps({"key": key}) + "\n")


def _load(model_path: str, dtype: str, zero3: bool, micro_batch_size: int):
    """The model ready for inference: a ZeRO-3 engine, or a plain replica on this rank's device."""
    from irdro.model import load_model

    cfg = ModelConfig(path=model_path, dtype=dtype, attention="auto")
    if not zero3:
        model = load_model(cfg, {})
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        return (model.to(device) if device is not None else model).eval()
    import deepspeed

    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * dist.world_size(),
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    model = load_model(cfg, ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    return engine


def _device(model) -> torch.device:
    module = getattr(model, "module", model)
    return next(module.parameters()).device


def score_dataset(
    shard_dir: str | Path,
    model_path: str | Path,
    *,
    name: str = DEFAULT_NAME,
    dtype: str = "fp32",
    micro_batch_size: int = 8,
    packing: str = "none",
    zero3: bool = False,
    overwrite: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    pad_to_multiple_of: int = 8,
    progress: bool = True,
    stop_after_chunks: int | None = None,
) -> ScoreResult:
    """Score every sample of `shard_dir` with the model at `model_path`; call on every rank.

    Args:
        shard_dir: a shard directory (tools/prepare_data.py).
        model_path: a Hugging Face model folder whose tokenizer made the shards.
        name: the scores' name, under DIR/scores/.
        dtype: fp32 | bf16, the forward's precision (losses are fp32 either way).
        micro_batch_size: samples per forward.
        packing: none (right-padded rows, `collate`) or boundary (`collate_packed` rows of the
            shards' seq_len, attention kept per document), as `data.packing` in training.
        zero3: one ZeRO-3 engine over the ranks (parameters sharded; every rank runs the same
            number of forwards) instead of a full replica per rank.
        overwrite: replace existing scores of that name.
        chunk_size: sample ids per chunk (the unit of work split and of resume).
        pad_to_multiple_of: as `data.pad_to_multiple_of`.
        progress: a tqdm bar on rank 0.
        stop_after_chunks: stop (without assembling) once this rank computed that many chunks; for
            tests of the resume.

    Raises:
        DataError: a bad shard dir or model folder, shards of another tokenizer, or scores that
            exist without `overwrite` (checked before any model is loaded).
        ConfigError: a bad option.
    """
    from transformers import AutoTokenizer

    from irdro.data import collate, collate_packed
    from irdro.train import forward_losses

    t0 = time.perf_counter()
    if dtype not in ("fp32", "bf16"):
        raise ConfigError(f"--dtype: {dtype!r} is not fp32 or bf16")
    if packing not in PACKING:
        raise ConfigError(f"--packing: {packing!r} is not one of {', '.join(PACKING)}")
    if micro_batch_size < 1 or chunk_size < 1:
        raise ConfigError("--micro-batch-size and --chunk-size must be >= 1")
    data = ShardDataset(shard_dir)
    out = scores_dir(shard_dir, name)
    if (out / META_NAME).is_file() and not overwrite:
        raise DataError(f"{out} exists; pass --overwrite to replace it, or --name to score under another name")
    model_sha = dist.from_main(lambda: model_sha256(model_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    except (OSError, ValueError) as e:
        first = next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)
        raise DataError(f"--model {model_path}: cannot load its tokenizer: {first}") from None
    with open(Path(model_path) / "config.json", encoding="utf-8") as f:
        model_vocab = json.load(f).get("vocab_size")
    check_compatible(tokenizer, {str(shard_dir): data}, model_vocab=model_vocab, chat_template=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)

    shards_sha = manifest_sha256(shard_dir)
    key = hashlib.sha256(json.dumps([model_sha, dtype, shards_sha, chunk_size, packing]).encode()).hexdigest()
    partial = partial_dir(shard_dir, name)
    dist.from_main(lambda: _prepare_partial(partial, key))

    chunks = chunk_ranges(len(data), chunk_size)
    rank, world = dist.global_rank(), dist.world_size()
    mine = [c for c in range(rank, len(chunks), world)]
    pending = [c for c in mine if _read_chunk(_chunk_file(partial, c), key, chunks[c][1] - chunks[c][0]) is None]
    reused = len(mine) - len(pending)
    if stop_after_chunks is not None:
        pending = pending[:stop_after_chunks]
    model = _load(str(model_path), dtype, zero3, micro_batch_size)
    device = _device(model)

    def batch_of(ids: range) -> dict[str, torch.Tensor]:
        samples = [data[i] for i in ids]
        if packing == "boundary":
            seq_len = data.manifest.seq_len or max(len(s.input_ids) for s in samples)
            return collate_packed(samples, pad_id, int(seq_len), pad_to_multiple_of)
        return collate(samples, pad_id, pad_to_multiple_of)

    def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        on_device = {k: v if k == "sample_ids" else v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            return forward_losses(model, on_device)

    num_forwards = sum(-(-(chunks[c][1] - chunks[c][0]) // micro_batch_size) for c in pending)
    # ZeRO-3 gathers parameters inside every forward: all ranks must run as many forwards.
    extra = max(dist.gather_objects(num_forwards)) - num_forwards if zero3 else 0
    bar = None
    if progress and dist.is_main():
        from tqdm import tqdm

        total = sum(chunks[c][1] - chunks[c][0] for c in pending)
        bar = tqdm(total=total, desc=f"scoring (rank 0 of {world})", unit="sample", dynamic_ncols=True)
    local_tokens, t_run = 0, time.perf_counter()
    for c in pending:
        start, end = chunks[c]
        nll, tokens = np.empty(end - start), np.empty(end - start, dtype=np.int64)
        for s in range(start, end, micro_batch_size):
            ids = range(s, min(end, s + micro_batch_size))
            losses, counts = run(batch_of(ids))
            nll[s - start : ids.stop - start] = losses.float().cpu().numpy()
            tokens[s - start : ids.stop - start] = counts.cpu().numpy()
            local_tokens += int(counts.sum())
            if bar is not None:
                bar.update(len(ids))
                bar.set_postfix(tok_s=f"{local_tokens / max(time.perf_counter() - t_run, 1e-9):.0f}")
        _write_chunk(_chunk_file(partial, c), key, nll, tokens)
    for _ in range(extra):
        run(batch_of(range(0, 1)))
    if bar is not None:
        bar.close()
    if stop_after_chunks is not None:
        dist.barrier()
        return ScoreResult(None, 0, 0, float("nan"), float("nan"), time.perf_counter() - t0, len(pending), reused)
    dist.barrier()

    def assemble() -> tuple[int, int, float, float]:
        parts = []
        for c, (start, end) in enumerate(chunks):
            got = _read_chunk(_chunk_file(partial, c), key, end - start)
            if got is None:
                raise DataError(
                    f"{_chunk_file(partial, c)}: missing or unreadable after scoring; rerun the same command"
                )
            parts.append(got)
        nll = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
        tokens = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        meta = ScoresMeta(
            name=name,
            model={"path": str(model_path), "name": Path(model_path).resolve().name, "sha256": model_sha},
            dtype=dtype,
            num_samples=len(data),
            manifest_sha256=shards_sha,
            tokenizer_hash=tokenizer_fingerprint(tokenizer),
            extra={"packing": packing, "micro_batch_size": micro_batch_size, "chunk_size": chunk_size, "zero3": zero3},
        )
        try:
            write_scores(shard_dir, meta, nll, tokens, overwrite=overwrite)
        except fsio.OutputError as e:
            raise DataError(str(e)) from None
        shutil.rmtree(partial, ignore_errors=True)
        total = int(tokens.sum())
        mean = float(nll.mean()) if len(nll) else float("nan")
        per_token = float((nll * tokens).sum() / max(total, 1))
        return len(nll), total, mean, per_token

    num, total, mean, per_token = dist.from_main(assemble)
    return ScoreResult(out, num, total, mean, per_token, time.perf_counter() - t0, len(pending), reused)


__all__ = ["DEFAULT_CHUNK_SIZE", "ScoreResult", "chunk_ranges", "model_sha256", "partial_dir", "score_dataset"]
