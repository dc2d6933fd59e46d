"""Step time and peak RSS per rank of ERM, IR-DRO (window micro; window step deferred and scored),
MidRanking, and ERM again (`erm_aa`: the A/A spread of the ratios).

    .venv/bin/python benchmarks/bench_step.py --model tiny --reps 3
    .venv/bin/python benchmarks/bench_step.py --model smollm2 --reps 2

2 ZeRO-3 ranks on CPU (gloo, OMP_NUM_THREADS=1 each), the same recipe except `reweight`, launched
once per (rep, variant) in alternating order (A B C D, then D C B A, ...), so drift on a shared box
hits every variant alike. Per launch: the median step time over the steps after `--warmup`
(step time = tokens / tokens_per_s of metrics.jsonl) and each rank's peak RSS during the training
loop (VmHWM reset after model load and engine setup; benchmarks/rank_entry.py). Ratios are paired:
a variant's launch against the ERM launch of the same rep; the table gives their median.

Results: benchmarks/results/bench_step_<model>.{md,json}.
"""

from __future__ import annotations

import argparse
import shutil

from common import (
    BENCH,
    REWEIGHT_VARIANTS,
    TINY_LLAMA,
    gpt2_tokenizer,
    launch,
    median,
    say,
    smollm2,
    sonnet_shards,
    write_results,
)

# erm_aa: ERM launched again under another name, so the table shows the A/A spread of the ratios.
VARIANTS = {**REWEIGHT_VARIANTS, "erm_aa": REWEIGHT_VARIANTS["erm"]}


def recipe(model: str, variant: str, steps: int, micro: int, ga: int) -> dict:
    if model == "tiny":
        tok = gpt2_tokenizer()
        model_section = {"tokenizer": str(tok), "config": TINY_LLAMA}
        data = sonnet_shards(tok, "sonnets-gpt2-128", 128)
    else:
        path = smollm2()
        model_section = {"path": str(path)}
        data = sonnet_shards(path, "sonnets-smollm2-256", 256)
    return {
        "output_dir": str(BENCH / "runs" / f"step_{model}_{variant}"),
        "seed": 0,
        "max_steps": steps,
        "micro_batch_size": micro,
        "grad_accum_steps": ga,
        "ds_config": "ds_configs/zero3_fp32.json",
        "model": {**model_section, "dtype": "fp32", "attention": "sdpa"},
        "data": {"train": str(data)},
        "reweight": VARIANTS[variant],
        "optim": {
            "name": "adamw",
            "lr": 1e-4,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "scheduler": "constant",
        },
        "checkpoint": {"at_end": False},
        "log": {"tensorboard": False, "progress": False},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--reps", type=int, default=3, help="launches per variant")
    p.add_argument("--steps", type=int, default=None, help="steps per launch")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the median")
    p.add_argument("--micro", type=int, default=None, help="micro-batch per rank")
    p.add_argument("--ga", type=int, default=2, help="gradient accumulation steps")
    args = p.parse_args()
    tiny = args.model == "tiny"
    steps = args.steps or (12 if tiny else 6)
    warmup = args.warmup if args.warmup is not None else (3 if tiny else 2)
    micro = args.micro or (4 if tiny else 1)
    names = list(VARIANTS)
    launches = []
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            r = recipe(args.model, name, steps, micro, args.ga)
            shutil.rmtree(r["output_dir"], ignore_errors=True)
            res = launch(r, 2)
            recs = [m for m in res["metrics"] if "tokens_per_s" in m][warmup:]
            times = [m["tokens"] / m["tokens_per_s"] for m in recs]
            row = {
                "rep": rep,
                "variant": name,
                "step_s": times,
                "step_s_median": median(times),
                "tokens_per_s_median": median([m["tokens_per_s"] for m in recs]),
                "peak_rss_train_mb": [x["peak_rss_train_kb"] / 1024 for x in res["ranks"]],
                "rss_after_setup_mb": [x["rss_after_setup_kb"] / 1024 for x in res["ranks"]],
                "peak_rss_total_mb": [x["peak_rss_total_kb"] / 1024 for x in res["ranks"]],
            }
            launches.append(row)
            say(
                f"rep {rep} {name}: step {row['step_s_median']:.3f}s, peak RSS/rank "
                f"{max(row['peak_rss_train_mb']):.0f} MB"
            )
    table = summarise(launches, names)
    cfg = {
        "model": args.model,
        "world_size": 2,
        "micro_batch_size": micro,
        "grad_accum_steps": args.ga,
        "steps": steps,
        "warmup_dropped": warmup,
        "reps": args.reps,
        "variants": VARIANTS,
    }
    md = markdown(table, cfg)
    write_results(f"bench_step_{args.model}", {"config": cfg, "table": table, "launches": launches}, md)
    print(md)
    return 0


def summarise(launches: list[dict], names: list[str]) -> list[dict]:
    by = {(r["rep"], r["variant"]): r for r in launches}
    reps = sorted({r["rep"] for r in launches})
    table = []
    for name in names:
        rows = [by[(rep, name)] for rep in reps]
        erm = [by[(rep, "erm")] for rep in reps]
        peak = [max(r["peak_rss_train_mb"]) for r in rows]
        growth = [
            max(a - b for a, b in zip(r["peak_rss_train_mb"], r["rss_after_setup_mb"], strict=True)) for r in rows
        ]
        table.append(
            {
                "variant": name,
                "step_s_median": median([r["step_s_median"] for r in rows]),
                "time_ratio_vs_erm": median(
                    [r["step_s_median"] / e["step_s_median"] for r, e in zip(rows, erm, strict=True)]
                ),
                "time_ratios_per_rep": [
                    r["step_s_median"] / e["step_s_median"] for r, e in zip(rows, erm, strict=True)
                ],
                "peak_rss_mb_median": median(peak),
                "peak_ratio_vs_erm": median(
                    [max(r["peak_rss_train_mb"]) / max(e["peak_rss_train_mb"]) for r, e in zip(rows, erm, strict=True)]
                ),
                "rss_growth_in_loop_mb_median": median(growth),
                "peak_rss_total_mb_median": median([max(r["peak_rss_total_mb"]) for r in rows]),
            }
        )
    return table


def markdown(table: list[dict], cfg: dict) -> str:
    lines = [
        f"# Step benchmark: {cfg['model']} (generated by benchmarks/bench_step.py)",
        "",
        f"2 ZeRO-3 CPU ranks (gloo, 1 thread each), micro-batch {cfg['micro_batch_size']}, "
        f"GA {cfg['grad_accum_steps']}, {cfg['steps']} steps per launch (first "
        f"{cfg['warmup_dropped']} dropped), {cfg['reps']} launches per variant in alternating "
        "order, on a shared machine. Ratios: median over reps of (variant / ERM of the same rep).",
        "",
        "| variant | median step (s) | time / ERM | per-rep time ratios | peak RSS per rank in "
        "the loop (MB) | peak / ERM | RSS growth in the loop (MB) | peak incl. setup (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        per = ", ".join(f"{x:.3f}" for x in t["time_ratios_per_rep"])
        lines.append(
            f"| {t['variant']} | {t['step_s_median']:.3f} | {t['time_ratio_vs_erm']:.3f} | {per} | "
            f"{t['peak_rss_mb_median']:.0f} | {t['peak_ratio_vs_erm']:.3f} | "
            f"{t['rss_growth_in_loop_mb_median']:.0f} | {t['peak_rss_total_mb_median']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
