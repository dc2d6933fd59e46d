"""Mixture experiment: what ERM, IR-DRO and group DRO do with a mixture of three real corpora.

    .venv/bin/python benchmarks/mixture_experiment.py all        # build, train every arm, report
    .venv/bin/python benchmarks/mixture_experiment.py build      # the data only; prints its counts
    .venv/bin/python benchmarks/mixture_experiment.py train --arms group_dro --steps 10
    .venv/bin/python benchmarks/mixture_experiment.py report     # tables + figure from saved results

The recipe is recipes/smollm2/cpu_mixture.yaml: the pretrained SmolLM2-135M-Instruct, Shakespeare
0.4 + KJV Bible 0.3 + chit-chat 0.3 (blended per sample by those target shares), seq 128, 2 ZeRO-3
gloo ranks x micro-batch 4 (window 8), AdamW lr 1e-4 cosine, fp32, seed 0, 30 steps (~13 min per arm
on 2 CPU cores, estimated from a 3-step run: ~15 s per step, ~1 min per evaluation, ~2 min start-up).

1. build: the `python tools/...` commands of the recipe's header, run as written there with its
   paths moved under $IRDRO_CACHE/mixture_experiment (fetch_assets smollm2 and texts, prepare_data
   per source with --eval-fraction: train/ and eval/ per source); prints each split's samples and
   tokens and how long each command took.
2. train: the recipe once per arm (ARMS: erm, irdro lam 1, group_dro eta 0.1, smoothing 0.01) with
   only output_dir, reweight (scheme and its parameters; window unchanged), max_steps (--steps) and
   checkpoint.at_end (off: 2.2 GB per arm) overridden, besides the paths (under WORK) and TensorBoard
   and progress bar (off); same seed, so the same blended data order.
   Each arm's metrics.jsonl and wall time go to benchmarks/results/mixture_runs.jsonl (an arm
   already there with the same --steps is not retrained).
3. report: per arm and source the mean sample share and mean weight share over the steps, the final
   group weight alpha (group_dro), the held-out perplexity before and after; per arm the mean ESS
   and wall time: benchmarks/results/mixture_experiment.{md,json}, and docs/mixture_shares.png (one
   panel per arm, drawn by irdro.observe.plot_source_shares).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from common import CACHE, RESULTS, ROOT, launch, run_tool, say, smollm2, write_results

from irdro.config import header_commands
from irdro.fsio import atomic_write_text

RECIPE = ROOT / "recipes" / "smollm2" / "cpu_mixture.yaml"
WORK = CACHE / "mixture_experiment"
RUNS = RESULTS / "mixture_runs.jsonl"
FIGURE = ROOT / "docs" / "mixture_shares.png"

# name -> reweight section (the recipe's window is kept), chosen before any result.
ARMS: dict[str, dict] = {
    "erm": {"scheme": "erm"},
    "irdro": {"scheme": "irdro", "lam": 1.0},
    "group_dro": {"scheme": "group_dro", "eta": 0.1, "smoothing": 0.01},
}


def load_recipe() -> dict:
    return yaml.safe_load(RECIPE.read_text())


def local_path(path: str) -> str:
    """A path of the recipe (and its header's commands) moved under WORK: `data/...` -> WORK/data/...,
    the model folder -> the cached SmolLM2 (fetch_assets smollm2's default --output)."""
    if path == "assets/smollm2-135m-instruct":
        return str(CACHE / "assets" / "smollm2-135m-instruct")
    if path.startswith("data/"):
        return str(WORK / path)
    return path


def recipe_commands() -> list[list[str]]:
    """The `python tools/...` commands in the recipe's header comment, as argument lists without
    the leading `python`, paths moved by `local_path`."""
    return [[local_path(arg) for arg in argv[1:]] for argv in header_commands(RECIPE)]


def sources(recipe: dict, key: str) -> list[dict]:
    """data.train / data.eval of the recipe: [{path, weight, name}, ...]."""
    return recipe["data"][key]


def build(args) -> None:
    """Run the recipe's header commands (assets, texts, one prepare_data per source) under WORK."""
    summary: dict = {"commands": []}
    for argv in recipe_commands():
        output = Path(argv[argv.index("--output") + 1])
        if argv[0] == "tools/prepare_data.py" and (output / "train" / "manifest.json").exists():
            summary["commands"].append({"argv": argv, "seconds": None})  # built before
            continue
        say("python " + " ".join(argv))
        t0 = time.perf_counter()
        run_tool(*argv, *(["--no-progress"] if argv[0] == "tools/prepare_data.py" else []))
        summary["commands"].append({"argv": argv, "seconds": round(time.perf_counter() - t0, 1)})
    texts = json.loads((WORK / "data" / "texts" / "SOURCES.json").read_text())["files"]
    summary["sources"] = {}
    for s in sources(load_recipe(), "train"):
        split_dir = Path(local_path(s["path"])).parent
        row = {"documents": texts[s["name"]]["documents"], "characters": texts[s["name"]]["characters"]}
        for split in ("train", "eval"):
            m = json.loads((split_dir / split / "manifest.json").read_text())
            row[split] = {"docs": m["num_docs"], "samples": m["num_samples"], "tokens": m["num_tokens"]}
        summary["sources"][s["name"]] = row
        say(
            f"{s['name']}: {row['documents']} documents -> train {row['train']['samples']} samples "
            f"({row['train']['tokens']} tokens), eval {row['eval']['samples']} samples ({row['eval']['tokens']} tokens)"
        )
    atomic_write_text(WORK / "data_summary.json", json.dumps(summary, indent=1) + "\n")


def arm_recipe(name: str, steps: int) -> dict:
    """The recipe with only what the arm changes: output_dir, reweight scheme + params, max_steps,
    checkpoint.at_end; paths moved under WORK."""
    recipe = load_recipe()
    recipe["output_dir"] = str(WORK / "runs" / name)
    recipe["max_steps"] = steps
    recipe["reweight"] = {**ARMS[name], "window": recipe["reweight"]["window"]}
    recipe["checkpoint"] = {**recipe["checkpoint"], "at_end": False}
    recipe["model"] = {**recipe["model"], "path": str(smollm2())}
    recipe["ds_config"] = str(ROOT / recipe["ds_config"])
    recipe["log"] = {**recipe["log"], "tensorboard": False, "progress": False}
    for key in ("train", "eval"):
        recipe["data"][key] = [{**s, "path": local_path(s["path"])} for s in sources(recipe, key)]
    return recipe


def read_runs() -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, RUNS.read_text().splitlines())} if RUNS.exists() else {}


def train(args) -> None:
    """Every arm of --arms not yet in mixture_runs.jsonl with these --steps: train, record."""
    import shutil

    for name in args.arms:
        runs = read_runs()
        if runs.get(name, {}).get("steps") == args.steps:
            say(f"{name}: already in {RUNS.name} ({args.steps} steps)")
            continue
        recipe = arm_recipe(name, args.steps)
        shutil.rmtree(recipe["output_dir"], ignore_errors=True)
        say(f"training {name}: {args.steps} steps, reweight {recipe['reweight']}")
        t0 = time.perf_counter()
        res = launch(recipe, world_size=2, timeout=3 * 3600)
        wall = time.perf_counter() - t0
        times = [t for _, t in res["ranks"][0]["log_times"]]
        intervals = [b - a for a, b in zip(times, times[1:], strict=False)]
        metrics = [json.loads(x) for x in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {
            "name": name,
            "reweight": recipe["reweight"],
            "steps": args.steps,
            "wall_s": wall,
            # the typical optimizer step (the median skips the steps that end with an eval)
            "median_step_s": statistics.median(intervals) if intervals else None,
            "metrics": metrics,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(RUNS, "".join(json.dumps(runs[n]) + "\n" for n in ARMS if n in runs))
        shutil.rmtree(Path(recipe["output_dir"]) / "samples", ignore_errors=True)
        say(f"{name}: {wall:.0f}s")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def summarize(run: dict, names: list[str]) -> dict:
    """Per source: mean sample/weight share over the training steps, final alpha, eval ppl before
    (step 0) and after (the last eval); per arm: mean ESS, overall eval ppl, wall time."""
    metrics = run["metrics"]
    steps = [r for r in metrics if "loss" in r]
    evals = [r for r in metrics if "eval_ppl" in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    per_source = {}
    for n in names:
        per_source[n] = {
            "sample_share": _mean([r.get(f"source/{n}/sample_share") for r in steps]),
            "weight_share": _mean([r.get(f"source/{n}/weight_share") for r in steps]),
            "alpha_final": steps[-1].get(f"source/{n}/alpha") if steps else None,
            "epoch_final": steps[-1].get(f"source/{n}/epoch") if steps else None,
            "loss_mean": _mean([r.get(f"source/{n}/loss") for r in steps]),
            "eval_ppl_before": first.get(f"eval_source/{n}/ppl"),
            "eval_ppl_after": last.get(f"eval_source/{n}/ppl"),
        }
    return {
        "name": run["name"],
        "reweight": run["reweight"],
        "steps": run["steps"],
        "wall_s": run["wall_s"],
        "median_step_s": run.get("median_step_s"),
        "ess_mean": _mean([r.get("ess") for r in steps]),
        "eval_ppl_before": first.get("eval_ppl"),
        "eval_ppl_after": last.get("eval_ppl"),
        "sources": per_source,
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def report(args) -> None:
    runs = read_runs()
    recipe = load_recipe()
    train_sources = sources(recipe, "train")
    names = [s["name"] for s in train_sources]
    total = sum(s["weight"] for s in train_sources)
    targets = {s["name"]: s["weight"] / total for s in train_sources}
    table = [summarize(runs[n], names) for n in ARMS if n in runs]
    if not table:
        raise SystemExit(f"no runs in {RUNS}; run the train stage first")
    data = json.loads((WORK / "data_summary.json").read_text()) if (WORK / "data_summary.json").exists() else {}
    lines = [
        "# Mixture experiment (generated by benchmarks/mixture_experiment.py report)",
        "",
        f"`{RECIPE.relative_to(ROOT)}`: SmolLM2-135M-Instruct, {', '.join(f'{n} {targets[n]:.2f}' for n in names)} "
        f"(target shares), seq 128, 2 ZeRO-3 gloo ranks x micro-batch {recipe['micro_batch_size']} "
        f"(window {recipe['reweight']['window']}), AdamW lr {recipe['optim']['lr']}, seed {recipe['seed']}, "
        f"{table[0]['steps']} steps; arms differ only in `reweight`. Shares are means over the steps; "
        "perplexities on each source's first "
        f"{recipe['eval']['max_samples']} held-out samples, before the first and after the last step.",
        "",
        "| arm | reweight | ESS | eval ppl (all) before → after | wall s | median step s |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        params = ", ".join(f"{k} {v}" for k, v in t["reweight"].items() if k != "window")
        lines.append(
            f"| {t['name']} | {params} | {_fmt(t['ess_mean'])} | {_fmt(t['eval_ppl_before'], '.2f')} → "
            f"{_fmt(t['eval_ppl_after'], '.2f')} | {t['wall_s']:.0f} | {_fmt(t['median_step_s'], '.2f')} |"
        )
    lines += [
        "",
        "| arm | source | target | sample share | weight share | final alpha | eval ppl before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        for n in names:
            s = t["sources"][n]
            lines.append(
                f"| {t['name']} | {n} | {targets[n]:.3f} | {_fmt(s['sample_share'])} | {_fmt(s['weight_share'])} | "
                f"{_fmt(s['alpha_final'])} | {_fmt(s['eval_ppl_before'], '.2f')} → {_fmt(s['eval_ppl_after'], '.2f')} |"
            )
    if data.get("sources"):
        lines += ["", "Data (train / eval samples of <= 128 tokens, and tokens):", ""]
        for n, row in data["sources"].items():
            lines.append(
                f"- {n}: {row['documents']} documents; train {row['train']['samples']} samples, "
                f"{row['train']['tokens']} tokens; eval {row['eval']['samples']} samples, "
                f"{row['eval']['tokens']} tokens"
            )
    lines += ["", f"Figure: `{FIGURE.relative_to(ROOT)}` (sample and weight share per source over the steps, per arm)."]
    markdown = "\n".join(lines) + "\n"
    payload = {"recipe": str(RECIPE.relative_to(ROOT)), "targets": targets, "data": data, "table": table}
    write_results("mixture_experiment", payload, markdown)
    plot({t["name"]: runs[t["name"]]["metrics"] for t in table})
    print(markdown)


def plot(metrics_by_arm: dict[str, list[dict]]) -> None:
    """docs/mixture_shares.png: one panel per arm, drawn by irdro.observe.plot_source_shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from irdro.observe import plot_source_shares

    fig, axes = plt.subplots(1, len(metrics_by_arm), figsize=(5 * len(metrics_by_arm), 4), squeeze=False)
    for ax, (name, metrics) in zip(axes[0], metrics_by_arm.items(), strict=True):
        plot_source_shares(ax, metrics, title=name)
    fig.tight_layout()
    FIGURE.parent.mkdir(exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    say(f"wrote {FIGURE.relative_to(ROOT)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["build", "train", "report", "all"])
    p.add_argument("--steps", type=int, default=load_recipe()["max_steps"], help="training steps per arm")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="train: only these arms")
    args = p.parse_args()
    stages = ["build", "train", "report"] if args.stage == "all" else [args.stage]
    for s in stages:
        globals()[s](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
