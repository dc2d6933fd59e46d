"""Method evidence in one command: the noise experiment, then natural data with the real model.

    .venv/bin/pip install -e '.[eval]'                          # lm-evaluation-harness (MMLU)
    .venv/bin/python benchmarks/method_experiment.py all        # ~70 min on 2 CPU cores
    .venv/bin/python benchmarks/method_experiment.py report     # tables from the saved results

1. benchmarks/noise_experiment.py: tiny Llama, Shakespeare + 20% injected noise documents, 3 seeds;
   ERM, IR-DRO, IR-DRO on excess loss (reference model trained on a clean held-out slice),
   IR-DRO with per-rank (`local`) normalisation as the official code does, MidRanking online and
   as an offline band selection (tools/score_data.py + tools/select_data.py), trimming online
   and offline, and the clean-only oracle.
2. benchmarks/natural_experiment.py: SmolLM2-135M on a Shakespeare + KJV Bible + chit-chat mixture;
   ERM, IR-DRO, IR-DRO on excess loss, MidRanking; held-out perplexity per domain and zero-shot
   MMLU (lm-evaluation-harness) with paired differences against ERM.

Each stage resumes from its results files (benchmarks/results/noise_runs.jsonl,
natural_runs.jsonl): rerunning `all` after a kill redoes only what is missing.
"""

from __future__ import annotations

import argparse
import sys
import time

import natural_experiment
import noise_experiment
from common import say

NOISE_STAGES = ("build", "pretrain", "reference", "grid", "report")
NATURAL_STAGES = ("build", "reference", "train", "report")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["all", "noise", "natural", "report"])
    args = p.parse_args()
    noise_args = argparse.Namespace(
        steps=noise_experiment.CONTINUAL_STEPS,
        lr=noise_experiment.CONTINUAL_LR,
        seeds=list(noise_experiment.SEEDS),
        schemes=None,
    )
    natural_args = argparse.Namespace(steps=natural_experiment.STEPS, arms=None)
    plan = {
        "all": [(noise_experiment, NOISE_STAGES, noise_args), (natural_experiment, NATURAL_STAGES, natural_args)],
        "noise": [(noise_experiment, NOISE_STAGES, noise_args)],
        "natural": [(natural_experiment, NATURAL_STAGES, natural_args)],
        "report": [(noise_experiment, ("report",), noise_args), (natural_experiment, ("report",), natural_args)],
    }[args.stage]
    for module, stages, margs in plan:
        for stage in stages:
            t0 = time.perf_counter()
            getattr(module, stage)(margs)
            say(f"{module.__name__} {stage}: {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
