#!/usr/bin/env python
"""Convert an irdro run's DeepSpeed (ZeRO-2/3) checkpoint into a Hugging Face model folder.

    python tools/convert_to_hf.py RUN_DIR --output DIR [--tag TAG] [--dtype bf16|fp32]
                                  [--max-shard-size 2GB] [--verify] [--overwrite]

The folder holds config.json (with the exported dtype), sharded safetensors + index, the generation
config and the tokenizer (with its chat template), and loads with
`AutoModelForCausalLM.from_pretrained(DIR)` and `lm_eval --model hf --model_args pretrained=DIR`.
Exit codes: 0 ok, 2 bad input (message names the path), 3 --verify found a mismatch.
"""

from __future__ import annotations

import argparse
import sys

from irdro.export import ExportError, export_hf, verify


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory (output_dir of the recipe)")
    p.add_argument(
        "--output",
        required=True,
        help="HF folder to write (refused if non-empty without --overwrite)",
    )
    p.add_argument(
        "--tag",
        default=None,
        help="checkpoint tag, e.g. step_00000100 (default: checkpoints/latest)",
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weights dtype (default bf16)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--verify", action="store_true", help="reload with transformers and compare logits")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        info = export_hf(
            args.run_dir,
            args.output,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"exported {info['tag']}: {info['tensors']} tensors, {info['bytes'] / 2**20:.1f} MiB in "
        f"{info['shards']} shard(s), {args.dtype}, {info['seconds']:.1f}s -> {args.output}"
    )
    if args.verify:
        diff = verify(args.run_dir, args.output, tag=args.tag, dtype=args.dtype)
        ok = diff <= 1e-5
        print(f"verify: max |logit diff| reloaded vs checkpoint = {diff:.3e} ({'ok' if ok else 'MISMATCH'})")
        return 0 if ok else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
