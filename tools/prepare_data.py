"""Tokenise a corpus into irdro's memory-mapped token shards (a thin front end over irdro.prepare).

    python tools/prepare_data.py --input FILE_OR_DIR [--input ...] --tokenizer DIR --output DIR \\
        [--format text|alpaca|chat] [--seq-len 512] [--long-docs split|truncate] \\
        [--text-field text] [--train-on-prompt] [--chat-template FILE] [--skip-bad] \\
        [--num-proc N] [--eval-fraction 0.0] [--seed 0] [--shard-tokens N] [--overwrite]
    python tools/prepare_data.py --verify DIR

Exit codes: 0 ok, 2 bad arguments or bad data (one-line message on stderr, no traceback; an
existing output is left as it was).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from irdro.prepare import ALPACA_TEMPLATE, FORMATS, LONG_DOCS, prepare
from irdro.shards import MANIFEST_NAME, DataError, ShardDataset

_DESCRIPTION = """\
Tokenise documents into memory-mapped token shards plus a manifest.json (tokenizer name and
hash, vocab size, dtype, counts, per-shard sha256) that irdro.train reads.

inputs: .txt (one document per file), .jsonl (one record per line), .json (a list of records),
.parquet (one record per row) files, directories of them (searched recursively), quoted globs,
and datasets saved with Dataset.save_to_disk.

formats:
  text    continual pre-training: the --text-field of each record (or a .txt file's content),
          tokenised without special tokens, EOS appended, every token trained.
  alpaca  instruction tuning: records with instruction, output and optional input; the prompt is
@TEMPLATE@
          (the Input section is left out when input is empty), the response is output + EOS.
          Only the response is trained (--train-on-prompt: everything).
  chat    records with messages: [{"role", "content"}, ...], rendered with the tokenizer's chat
          template (or --chat-template FILE). Every assistant turn is trained, the rest masked.
          The template is stored in the manifest; training gives it to a tokenizer without one
          (so the run's hf/ and its export carry it) and refuses a tokenizer with another one.

A sample needs at least 2 supervised tokens; documents without them are dropped and counted in
the manifest (num_skipped), never trained on as a NaN loss."""


def _description() -> str:
    lines = ALPACA_TEMPLATE.rstrip("\n").split("\n")
    body = "\n".join((" " * 12 + repr(x)[1:-1]).rstrip() for x in lines)
    return _DESCRIPTION.replace("@TEMPLATE@", body)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        description=_description(),
        epilog=(
            "examples:\n"
            "  python tools/fetch_assets.py gpt2-tokenizer\n"
            "  python tools/prepare_data.py --input tests/fixtures/shakespeare/sonnets.jsonl \\\n"
            "      --tokenizer assets/gpt2-tokenizer --output data/sonnets --eval-fraction 0.1\n"
            "  python tools/prepare_data.py --format alpaca \\\n"
            "      --input tests/fixtures/chatterbot/alpaca.jsonl \\\n"
            "      --tokenizer assets/gpt2-tokenizer --output data/chatterbot --seq-len 256\n"
            "  python tools/prepare_data.py --verify data/sonnets"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--input",
        action="append",
        metavar="FILE_OR_DIR",
        help="a .txt/.jsonl/.json/.parquet file, a directory (searched recursively), a quoted "
        "glob or a save_to_disk dataset; repeat for several",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer folder")
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="shard directory to create; with --eval-fraction > 0 it gets train/ and eval/",
    )
    parser.add_argument("--format", choices=FORMATS, default="text", help="input format (default: text)")
    parser.add_argument("--seq-len", type=int, default=512, help="max tokens per sample (default: 512)")
    parser.add_argument(
        "--long-docs",
        choices=LONG_DOCS,
        default=None,
        help="documents longer than --seq-len: split into chunks (each its own sample, ids "
        "doc/chunk) or truncate (default: split for text, truncate for alpaca/chat)",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        help="field holding a document's text, --format text (default: text)",
    )
    parser.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="also train on prompt tokens (alpaca, chat); default: response tokens only",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template replacing the tokenizer's (--format chat)",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed JSON lines and records with missing/mistyped fields, counting them "
        "in the manifest (default: stop at the first with file:line)",
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        default=1,
        metavar="N",
        help="tokenisation processes (datasets.map num_proc; default: 1)",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split to read from a saved DatasetDict input (default: train)",
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
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--verify",
        metavar="DIR",
        help="instead of preparing, re-hash an existing shard directory (or its train/ and eval/) against its manifest",
    )
    return parser


def _verify(path: Path) -> list[str]:
    dirs = [path] if (path / MANIFEST_NAME).is_file() or not path.is_dir() else []
    dirs = dirs or [path / s for s in ("train", "eval") if (path / s / MANIFEST_NAME).is_file()]
    lines = []
    for d in dirs or [path]:
        dataset = ShardDataset(d)
        dataset.verify()
        lines.append(f"ok: {d}: {dataset.manifest.summary()}, sha256 verified")
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
        result = prepare(
            args.input,
            args.tokenizer,
            args.output,
            format=args.format,
            seq_len=args.seq_len,
            long_docs=args.long_docs,
            text_field=args.text_field,
            train_on_prompt=args.train_on_prompt,
            chat_template=args.chat_template,
            skip_bad=args.skip_bad,
            num_proc=args.num_proc,
            split=args.split,
            eval_fraction=args.eval_fraction,
            seed=args.seed,
            overwrite=args.overwrite,
            shard_tokens=args.shard_tokens,
            progress=not args.no_progress,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = result if isinstance(result, dict) else {"": result}
    for name, manifest in splits.items():
        where = Path(args.output, name) if name else Path(args.output)
        print(f"wrote {where}: {manifest.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
