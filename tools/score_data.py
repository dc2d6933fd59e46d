"""Score every sample of a shard directory with a causal LM (a thin front end over irdro.scoring).

    deepspeed [--num_gpus N] --module tools.score_data --data DIR --model HF_DIR [--name reference]
        [--dtype fp32|bf16] [--micro-batch-size 8] [--packing none|boundary] [--zero3] [--overwrite]
    python -m tools.score_data ...                     (one process)

Writes DIR/scores/NAME/{nll.npy, tokens.npy, scores.json} (irdro.scores): each sample's mean NLL
over its target tokens, computed as training computes per-sample losses. Resumable: rerun the same
command after a kill and the finished chunks are kept.

Exit codes: 0 ok, 2 bad arguments or bad input (one-line message on stderr, no traceback; existing
scores are left as they were).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from irdro.config import ConfigError
from irdro.scores import DEFAULT_NAME
from irdro.scoring import DEFAULT_CHUNK_SIZE, score_dataset
from irdro.shards import DataError

_DESCRIPTION = """\
Score every sample of a shard directory with a Hugging Face causal LM: its mean next-token NLL over
its supervised (target) tokens and its target-token count, computed with the batches and the loss
training uses (so reweight.signal: excess compares l_i - r_i like with like). Written to
DIR/scores/NAME/ (nll.npy, tokens.npy, scores.json with the model's path and weight hash, dtype,
and the shards' manifest sha256).

Launched with deepspeed/torchrun, ranks take disjoint chunks of sample ids (chunk c on rank
c % world); a plain `python -m tools.score_data` is one process. Finished chunks are kept in
DIR/scores/.NAME.partial/ until the end, so the same command resumes after a kill."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="score_data",
        description=_DESCRIPTION,
        epilog=(
            "examples:\n"
            "  python -m tools.score_data --data data/sonnets-smollm2/train --model assets/smollm2-135m-instruct\n"
            "  deepspeed --num_gpus 8 --module tools.score_data --data data/corpus/train \\\n"
            "      --model /models/ref --name ref_small --dtype bf16 --micro-batch-size 16 --zero3"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR", help="shard directory (tools/prepare_data.py)")
    p.add_argument("--model", required=True, metavar="PATH", help="Hugging Face model folder (weights + tokenizer)")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"scores name under DIR/scores/ (default: {DEFAULT_NAME})")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="forward precision (default: fp32)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="samples per forward (default: 8)")
    p.add_argument(
        "--packing",
        choices=["none", "boundary"],
        default="none",
        help="none: right-padded rows; boundary: packed rows, attention kept per document (default: none)",
    )
    p.add_argument("--zero3", action="store_true", help="shard the model over the ranks with ZeRO-3")
    p.add_argument("--overwrite", action="store_true", help="replace existing scores of that name")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"sample ids per chunk, the unit of work split and resume (default: {DEFAULT_CHUNK_SIZE})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    launched = "RANK" in os.environ
    try:
        if launched or args.zero3:
            from irdro.engine import init_distributed

            init_distributed()
        result = score_dataset(
            args.data,
            args.model,
            name=args.name,
            dtype=args.dtype,
            micro_batch_size=args.micro_batch_size,
            packing=args.packing,
            zero3=args.zero3,
            overwrite=args.overwrite,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
        )
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk; every write is atomic, so nothing half-written is left
        where = e.filename or args.data
        print(f"error: {where}: {e.strerror or e}; make the shard directory writable or free space", file=sys.stderr)
        return 2
    from irdro import dist

    if dist.is_main():
        print(
            f"scored {result.num_samples} samples, {result.num_tokens} target tokens in {result.seconds:.1f}s: "
            f"mean NLL {result.mean_nll:.4f} per sample, {result.token_nll:.4f} per token -> {result.path}"
        )
    if launched or args.zero3:
        from irdro.engine import shutdown_distributed

        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
