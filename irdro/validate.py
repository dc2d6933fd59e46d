"""`python -m irdro.validate RECIPE [a.b=value ...] [--world-size N] [--no-path-checks]`: print the
resolved recipe and DeepSpeed JSON, or exit 2 with a one-line error naming the dotted key (a
missing model, tokenizer, data or DeepSpeed JSON path included). Options and overrides mix in any
order. Imports no torch."""

from __future__ import annotations

import argparse
import json
import os
import sys

from irdro.config import (
    ConfigError,
    Recipe,
    add_recipe_arguments,
    dump_yaml,
    load_recipe,
    model_config_of,
    resolve_ds_config,
    resolve_path,
)
from irdro.paths import check_local_paths
from irdro.scores import read_reference_table
from irdro.shards import DataError, Manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: RECIPE, overrides and options in any order."""
    parser = argparse.ArgumentParser(
        prog="python -m irdro.validate",
        description="Check a recipe: print the resolved recipe and the DeepSpeed JSON it launches "
        "with, or one error line naming the key. Options may come anywhere on the line.",
    )
    add_recipe_arguments(parser)
    parser.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="ranks to check the layout and batch arithmetic for, all of them: data-parallel x "
        "parallel.sequence_parallel x parallel.tensor_parallel (default: $WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--no-path-checks",
        action="store_true",
        help="do not check that model.path, model.tokenizer and data.* exist, nor the reference scores "
        "of reweight.signal=excess (e.g. on a login node without the data); the DeepSpeed JSON is always read",
    )
    return parser.parse_intermixed_args(argv)


def check_sequence_parallel(recipe: Recipe, paths: bool) -> str | None:
    """With `parallel.sequence_parallel` N > 1, a line saying how rows are cut (from data.train's
    manifest when `paths`): padded to a multiple of lcm(data.pad_to_multiple_of, N), T/N tokens per
    rank, and whether the heads could be checked (`irdro.config.validate` checks them when the
    model's config is at hand)."""
    sp = recipe.parallel.sequence_parallel
    if sp == 1:
        return None
    heads = "heads checked" if model_config_of(recipe) else "heads not checked: no model.path/config.json here"
    multiple = recipe.sequence_multiple
    line = f"# sequence parallel {sp} ({heads}): rows padded to a multiple of {multiple}, T/{sp} tokens per rank"
    if paths:
        lens = [Manifest.read(resolve_path(src.path)).seq_len for src in recipe.data.sources("train")]
        seq_len = None if None in lens else max(lens)
        if seq_len:
            padded = -(-seq_len // multiple) * multiple
            line += f"; data.train seq_len {seq_len}: at most {padded} -> {padded // sp} per rank"
    return line


def describe_sources(recipe: Recipe, dp: int) -> list[str]:
    """For a list-valued `data.train`, one line per source from its manifest: target share, samples,
    tokens, and the epochs `max_steps` optimizer steps read of it (share x max_steps x global batch /
    samples: the blended order keeps every prefix within one sample of that)."""
    if not recipe.data.is_mixture("train"):
        return []
    sources = recipe.data.sources("train")
    total = sum(s.weight for s in sources)
    reads = recipe.max_steps * recipe.global_batch(dp)
    lines = [f"# data.train: {len(sources)} sources blended over {reads} samples ({recipe.max_steps} steps)"]
    width = max(len(s.name) for s in sources)
    for s in sources:
        m = Manifest.read(resolve_path(s.path))
        share = s.weight / total
        lines.append(
            f"#   {s.name:<{width}}  share {share:6.2%}  samples {m.num_samples:>10,}  tokens {m.num_tokens:>13,}"
            f"  epochs {share * reads / m.num_samples:8.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides, world_size=args.world_size)
        if not args.no_path_checks:
            check_local_paths(recipe)
            if recipe.reweight.signal == "excess":  # what irdro.train's setup reads on every rank
                read_reference_table(
                    [(k, src.path) for k, src in recipe.data.labelled_sources("train")], recipe.reweight.reference
                )
        ds = resolve_ds_config(recipe, args.world_size)
        sp_line = check_sequence_parallel(recipe, paths=not args.no_path_checks)
        dp = recipe.data_parallel_size(args.world_size)
        source_lines = [] if args.no_path_checks else describe_sources(recipe, dp)
    except (ConfigError, DataError) as e:
        print(f"error: {args.recipe}: {e}", file=sys.stderr)
        return 2
    p = recipe.parallel
    print(
        f"# resolved recipe ({args.recipe}, world size {args.world_size} = data-parallel {dp} x "
        f"sequence-parallel {p.sequence_parallel} x tensor-parallel {p.tensor_parallel}; global batch "
        f"{recipe.global_batch(dp)} = micro {recipe.micro_batch_size} x GA {recipe.grad_accum_steps} x DP {dp})"
    )
    if sp_line:
        print(sp_line)
    for line in source_lines:
        print(line)
    print(dump_yaml(recipe), end="")
    print("# DeepSpeed JSON")
    print(json.dumps(ds, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head` closed the pipe: not an error of the recipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented way out
        sys.exit(0)
