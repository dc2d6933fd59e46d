"""Tokenise a corpus into irdro's memory-mapped token shards (a thin front end over irdro.data).

    python tools/prepare_data.py --input FILE_OR_DIR [--input ...] --tokenizer DIR --output DIR \\
        [--format text] [--seq-len 512] [--text-field text] [--eval-fraction 0.0] [--seed 0] \\
        [--shard-tokens N] [--overwrite]
    python tools/prepare_data.py --verify DIR

Exit codes: 0 ok, 2 bad arguments or bad data (one-line message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `python tools/prepare_data.py` from a checkout, not installed
    sys.path.insert(0, str(_ROOT))

from irdro.data import (  # noqa: E402
    MANIFEST_NAME,
    DataError,
    ShardDataset,
    dataset_summary,
    prepare_text,
)


def _prepare_text(args: argparse.Namespace) -> dict[str, Any]:
    return prepare_text(
        args.input,
        args.tokenizer,
        args.output,
        seq_len=args.seq_len,
        text_field=args.text_field,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        overwrite=args.overwrite,
        shard_tokens=args.shard_tokens,
        progress=not args.no_progress,
    )


# One entry per --format: a function from the parsed args to the manifest (or {split: manifest}).
# `alpaca` and `chat` (prompt-masked, optionally packed) will register here.
FORMATS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"text": _prepare_text}


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=(
            "Tokenise documents into memory-mapped token shards plus a manifest.json (tokenizer\n"
            "name and hash, vocab size, dtype, counts, per-shard sha256) that irdro.train reads.\n\n"
            "--format text: a .txt file is one document, a .jsonl line is one document, a .json\n"
            "file is a list of records. Each document is tokenised without special tokens, gets\n"
            "EOS appended and is cut into samples of at most --seq-len tokens."
        ),
        epilog=(
            "examples:\n"
            "  python tools/fetch_assets.py gpt2-tokenizer\n"
            "  python tools/prepare_data.py --input tests/fixtures/shakespeare/sonnets.jsonl \\\n"
            "      --tokenizer assets/gpt2-tokenizer --output data/sonnets --eval-fraction 0.1\n"
            "  python tools/prepare_data.py --verify data/sonnets"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        action="append",
        metavar="FILE_OR_DIR",
        help="a .txt/.jsonl/.json file, a directory (searched recursively) or a quoted glob; repeat "
        "for several",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer folder")
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="shard directory to create; with --eval-fraction > 0 it gets train/ and eval/",
    )
    parser.add_argument(
        "--format", choices=sorted(FORMATS), default="text", help="input format (default: text)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=512, help="max tokens per sample (default: 512)"
    )
    parser.add_argument(
        "--text-field",
        default="text",
        help="JSON field holding a document's text (default: text)",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        help="fraction of documents held out into OUTPUT/eval, chosen by a seeded hash of the "
        "document index (default: 0, no split)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the eval split (default: 0)")
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=2**26,
        metavar="N",
        help="target tokens per shard file (default: 2**26)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output (the old one is removed only once the new is complete)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--verify",
        metavar="DIR",
        help="instead of preparing, re-hash an existing shard directory (or its train/ and eval/) "
        "against its manifest",
    )
    return parser


def _verify(path: Path) -> list[str]:
    dirs = [path] if (path / MANIFEST_NAME).is_file() or not path.is_dir() else []
    dirs = dirs or [path / s for s in ("train", "eval") if (path / s / MANIFEST_NAME).is_file()]
    lines = []
    for d in dirs or [path]:
        dataset = ShardDataset(d)
        dataset.verify()
        lines.append(f"ok: {d}: {dataset_summary(dataset.manifest)}, sha256 verified")
    return lines


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.verify is None:
        missing = [f"--{k}" for k in ("input", "tokenizer", "output") if not getattr(args, k)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        if args.verify is not None:
            print("\n".join(_verify(Path(args.verify))))
            return 0
        result = FORMATS[args.format](args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = result if "train" in result else {"": result}
    for name, manifest in splits.items():
        where = Path(args.output, name) if name else Path(args.output)
        print(f"wrote {where}: {dataset_summary(manifest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
