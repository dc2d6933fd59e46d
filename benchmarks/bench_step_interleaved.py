"""Step time of ERM / IR-DRO micro / IR-DRO step / MidRanking (+ an A/A ERM control) interleaved
step by step in ONE run.

    .venv/bin/python benchmarks/bench_step_interleaved.py --model smollm2 --rounds 3
    .venv/bin/python benchmarks/bench_step_interleaved.py --model tiny --rounds 10

The tightest A B A B design on a shared box: 2 ZeRO-3 gloo ranks load the model and build the
engine once (irdro.train.setup), then call irdro.train.train_step with a recipe whose only
difference is `reweight`, rotating the variant every optimizer step (round r starts at variant
r mod the number of variants), so every variant sees the same engine, data stream and machine
state. Time per step is rank 0's wall time of train_step (ranks are in lock-step: every step has
collectives). Per-step peak RSS is also recorded (VmHWM reset before each step), but in one process the allocator keeps
freed memory, so treat it as an upper bound; bench_step.py measures memory per launch.
The first `--warmup` steps (one of each variant per round) are left out.

Results: benchmarks/results/bench_step_interleaved_<model>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench_step import VARIANTS as STEP_VARIANTS
from bench_step import recipe
from common import BENCH, median, run_local_ranks, say, status_kb, write_results

# erm_aa is ERM again: an A/A control whose ratio to ERM shows the noise floor of the machine.
VARIANTS = {**STEP_VARIANTS, "erm_aa": STEP_VARIANTS["erm"]}


def worker(spec_path: str) -> int:
    import torch

    from irdro import dist
    from irdro.config import recipe_from_dict, validate
    from irdro.data import Batches
    from irdro.engine import init_distributed, shutdown_distributed
    from irdro.train import seed_everything, setup, setup_logging, train_step

    spec = json.loads(Path(spec_path).read_text())
    setup_logging()
    init_distributed()
    recipes = {}
    for name, rw in VARIANTS.items():
        r = recipe_from_dict({**spec["recipe"], "reweight": rw})
        validate(r, world_size=dist.dp_size())
        recipes[name] = r
    base = recipes["erm"]
    seed_everything(base.seed)
    s = setup(base)
    batches = Batches(s.train_data, base, s.pad_id, dp_rank=dist.dp_rank(), dp_size=dist.dp_size())
    names = list(VARIANTS)
    rows = []
    step = 0
    for rnd in range(spec["rounds"]):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            micro_batches = batches.step(step)
            dist.all_reduce_sum(torch.zeros(1, dtype=torch.float64))  # start together
            rss = status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            t0 = time.perf_counter()
            train_step(s.engine, micro_batches, recipes[name], step)
            dt = time.perf_counter() - t0
            rows.append(
                {
                    "round": rnd,
                    "step": step,
                    "variant": name,
                    "step_s": dt,
                    "rss_before_mb": rss / 1024,
                    "peak_mb": status_kb("VmHWM") / 1024,
                }
            )
            step += 1
    Path(spec["out"].replace("{rank}", os.environ["RANK"])).write_text(json.dumps(rows))
    shutdown_distributed()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every variant")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--ga", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    tiny = args.model == "tiny"
    rounds = args.rounds or (10 if tiny else 3)
    micro = args.micro or (4 if tiny else 1)
    r = recipe(args.model, "erm", rounds * len(VARIANTS), micro, args.ga)
    r["output_dir"] = str(BENCH / "runs" / f"interleaved_{args.model}")
    with tempfile.TemporaryDirectory(prefix="irdro-interleaved-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"recipe": r, "rounds": rounds, "out": f"{tmp}/r{{rank}}.json"}))
        ranks = run_local_ranks([__file__, "--worker", str(spec)], 2, Path(tmp))
    rows = ranks[0]
    kept = [x for x in rows if x["round"] >= args.warmup_rounds]
    table = []
    by_round = {}
    for x in kept:
        by_round.setdefault(x["round"], {})[x["variant"]] = x["step_s"]
    for name in VARIANTS:
        times = [x["step_s"] for x in kept if x["variant"] == name]
        ratios = [rd[name] / rd["erm"] for rd in by_round.values()]
        peaks = [
            max(rk[i]["peak_mb"] for rk in ranks)
            for i, x in enumerate(rows)
            if x["round"] >= args.warmup_rounds and x["variant"] == name
        ]
        table.append(
            {
                "variant": name,
                "step_s_median": median(times),
                "time_ratio_vs_erm": median(ratios),
                "time_ratios_per_round": ratios,
                "peak_mb_median": median(peaks),
            }
        )
    cfg = {
        "model": args.model,
        "world_size": 2,
        "micro_batch_size": micro,
        "grad_accum_steps": args.ga,
        "rounds": rounds,
        "warmup_rounds": args.warmup_rounds,
        "variants": VARIANTS,
    }
    lines = [
        f"# Interleaved step benchmark: {args.model} (generated by benchmarks/bench_step_interleaved.py)",
        "",
        f"2 ZeRO-3 CPU ranks, micro-batch {micro}, GA {args.ga}; one run, variants rotated every "
        f"step, {rounds} rounds of {len(VARIANTS)} (first {args.warmup_rounds} left out). Ratio: median over "
        "rounds of (variant / ERM step time in the same round); erm_aa is ERM again (A/A control: "
        "its spread is the noise floor). Peak: per-step VmHWM (max over "
        "ranks), an upper bound in one process.",
        "",
        "| variant | median step (s) | time / ERM | per-round ratios | per-step peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for t in table:
        per = ", ".join(f"{x:.3f}" for x in t["time_ratios_per_round"])
        lines.append(
            f"| {t['variant']} | {t['step_s_median']:.3f} | {t['time_ratio_vs_erm']:.3f} "
            f"| {per} | {t['peak_mb_median']:.0f} |"
        )
    md = "\n".join(lines) + "\n"
    write_results(f"bench_step_interleaved_{args.model}", {"config": cfg, "table": table, "steps": ranks}, md)
    say("done")
    print(md)
    return 0


if __name__ == "__main__":
    from irdro.engine import exit_rank

    exit_rank(main())  # skips interpreter finalisation (see exit_rank)
