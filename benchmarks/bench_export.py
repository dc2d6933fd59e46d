#!/usr/bin/env python
"""Peak memory and wall time of tools/convert_to_hf.py on a real ZeRO-3 checkpoint of SmolLM2-135M.

    python benchmarks/bench_export.py [--run-dir runs/bench_export_smollm2] [--repeats 2]

1. Unless RUN_DIR already holds a complete checkpoint, trains recipes/smollm2/cpu_irdro.yaml for
   one step on 2 CPU ranks (`deepspeed --num_gpus 2`, ZeRO-3, fp32) to make one.
2. Runs `python tools/convert_to_hf.py RUN_DIR --output ... --dtype {bf16,fp32} [--verify]` in a
   child process per case and measures its wall time and peak RSS (os.wait4's ru_maxrss, which
   counts resident file-backed pages, e.g. touched pages of memory-mapped checkpoint files, as
   well as anonymous memory; /proc/PID/status is polled too to split the peak into RssAnon and
   RssFile).
3. Measures the same interpreter importing what convert_to_hf imports (the fixed baseline).

Figures are relative to the fp32 model size (unique parameters x 4 bytes). Writes
benchmarks/results/bench_export.json and bench_export.md. Needs the smollm2 asset and the
prepared data named in the recipe's header. Linux only (/proc, os.wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT

from irdro.engine import free_port

RECIPE = "recipes/smollm2/cpu_irdro.yaml"
CASES = [  # (name, extra convert_to_hf arguments)
    ("export bf16", ["--dtype", "bf16"]),
    ("export fp32", ["--dtype", "fp32"]),
    ("export bf16 --verify", ["--dtype", "bf16", "--verify"]),
    ("export fp32 --verify", ["--dtype", "fp32", "--verify"]),
    # Diagnostic: the whole shard is buffered in memory before safetensors writes it, so a smaller
    # shard bounds the anonymous part of the peak (the model is one 2 GB-default shard here).
    ("export fp32 --max-shard-size 100MB", ["--dtype", "fp32", "--max-shard-size", "100MB"]),
]
BASELINE_CODE = (
    "import irdro_tools.convert_to_hf, torch, safetensors.torch, transformers;"
    "from transformers import AutoConfig, AutoModelForCausalLM;"
    "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint"
)


HOW_TO_READ = [
    "How to read it. Peak RSS is the child's `ru_maxrss`: anonymous memory plus resident",
    "file-backed pages (the anon / file split is polled from /proc at the peak; about 80 MiB of",
    "the file part is shared libraries). `irdro.checkpoint.consolidated_fp32` uses DeepSpeed's",
    "`zero_to_fp32` in lazy mode: each rank's `*_optim_states.pt` is memory-mapped and only the",
    "fp32 master partitions are read (the Adam moments are dropped untouched), so the file part",
    "grows to about the fp32 model size as tensors are gathered, and stays mapped until",
    "`export_hf` returns (clean pages the kernel can reclaim, but counted in RSS). The export",
    "writes each safetensors shard tensor by tensor (header from the planned shapes first), so the",
    "anonymous part above the baseline is about one tensor plus allocator slack, whatever",
    "`--max-shard-size` is (the 49152 x 576 embedding is the largest). `--verify` (same process, after the export)",
    "adds the reloaded model (anonymous for bf16; for fp32, transformers keeps it memory-mapped",
    "from the exported safetensors: file pages), a randomly initialised reference model filled in place from the",
    "checkpoint mapping (no second copy of the weights). Wall times come from a shared 2-core machine",
    "(the 1-minute load average before each run is in the JSON) and are indicative only.",
]


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of a live process, in KiB ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str], env: dict[str, str] | None = None, poll_s: float = 0.02) -> dict:
    """Run `cmd`; wall seconds, exit code, peak RSS (ru_maxrss) and the polled RSS split."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    samples: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            s = _status_kb(proc.pid)
            if s:
                samples.append((time.perf_counter() - t0, s))
            time.sleep(poll_s)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = max(samples, key=lambda s: s[1].get("VmRSS", 0)) if samples else (0.0, {})
    # ~100 points of the RSS curve (MiB) for the record
    step = max(1, len(samples) // 100)
    curve = [
        [round(t, 2), round(s.get("RssAnon", 0) / 1024), round(s.get("RssFile", 0) / 1024)] for t, s in samples[::step]
    ]
    return {
        "cmd": " ".join(cmd),
        "rc": proc.returncode,
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
        "polled_peak": {k: v * 1024 for k, v in peak[1].items()},
        "polled_peak_at_s": round(peak[0], 2),
        "max_rss_anon_bytes": max((s.get("RssAnon", 0) for _, s in samples), default=0) * 1024,
        "max_rss_file_bytes": max((s.get("RssFile", 0) for _, s in samples), default=0) * 1024,
        "curve_s_anon_mib_file_mib": curve,
        "output_tail": output[-1500:],
    }


def make_checkpoint(run_dir: Path, recipe: str) -> dict:
    """Train one step of `recipe` on 2 CPU ranks into `run_dir` (which is replaced)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cmd = [
        deepspeed,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "irdro.train",
        recipe,
        f"output_dir={run_dir}",
        "max_steps=1",
        "eval.every=0",
        "data.eval=null",
        "optim.warmup_steps=0",
        "checkpoint.at_end=true",
        "checkpoint.keep_last=0",
        "resume=never",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    print(f"training 1 step to make a ZeRO-3 checkpoint: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"training failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    info = {"cmd": " ".join(cmd), "wall_s": round(time.perf_counter() - t0, 1)}
    info["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    (run_dir / "bench_training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def checkpoint_files(run_dir: Path) -> dict[str, int]:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    tag_dir = run_dir / "checkpoints" / tag
    return {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}


def count_params(hf_dir: Path) -> int:
    """Unique parameters of the run's model (tied embeddings counted once), built on meta."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once


def versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "deepspeed", "transformers", "safetensors")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def write_markdown(result: dict, path: Path) -> None:
    mib = 2**20
    size = result["model"]["fp32_bytes"]
    base = result["baseline"]["peak_rss_bytes"]
    lines = [
        "# tools/convert_to_hf.py: peak memory and time (SmolLM2-135M, ZeRO-3, 2 ranks)",
        "",
        f"Generated by `python benchmarks/bench_export.py` on {result['date']} "
        f"({result['machine']['cpus']} CPUs, load average {result['machine']['loadavg_start']} at "
        f"start; versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}).",
        "",
        f"Model: {result['model']['num_params']:,} parameters; fp32 size "
        f"{size / mib:.0f} MiB. Checkpoint: "
        f"{sum(result['checkpoint']['files'].values()) / mib:.0f} MiB in "
        f"{len(result['checkpoint']['files'])} files. Baseline (the interpreter with "
        f"convert_to_hf's imports): {base / mib:.0f} MiB.",
        "",
        "| case | wall s (median) | peak RSS MiB | peak / fp32 size | (peak - baseline) / size "
        "| at the peak: anon / file MiB |",
        "|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        pk = case["peak_rss_bytes"]
        anon = case["polled_peak"].get("RssAnon", 0) / mib
        file = case["polled_peak"].get("RssFile", 0) / mib
        lines.append(
            f"| `{case['name']}` | {case['wall_s_median']:.1f} | {pk / mib:.0f} | "
            f"{pk / size:.2f} | {(pk - base) / size:.2f} | {anon:.0f} / {file:.0f} |"
        )
    lines += ["", *HOW_TO_READ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/bench_export_smollm2", help="run dir (reused)")
    p.add_argument("--recipe", default=RECIPE, help="recipe trained for one step")
    p.add_argument("--repeats", type=int, default=2, help="runs per case (median wall time)")
    p.add_argument("--retrain", action="store_true", help="make a new checkpoint even if one exists")
    p.add_argument("--results", default="benchmarks/results", help="where the JSON/MD go")
    args = p.parse_args(argv)

    run_dir = (ROOT / args.run_dir).resolve()
    if args.retrain or not (run_dir / "checkpoints" / "latest").is_file():
        make_checkpoint(run_dir, args.recipe)
    made = run_dir / "bench_training.json"  # how the checkpoint was made (when this script did)
    training = json.loads(made.read_text()) if made.is_file() else None
    num_params = count_params(run_dir / "hf")
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
        },
        "versions": versions(),
        "recipe": args.recipe,
        "training_1_step": training,
        "model": {"num_params": num_params, "fp32_bytes": num_params * 4},
        "checkpoint": {
            "run_dir": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
            "files": checkpoint_files(run_dir),
        },
    }
    print("baseline: importing what convert_to_hf imports ...", flush=True)
    result["baseline"] = measure([sys.executable, "-c", BASELINE_CODE])
    if result["baseline"]["rc"] != 0:
        sys.exit(f"baseline failed:\n{result['baseline']['output_tail']}")
    cases = []
    out_dir = run_dir / "bench_export_out"
    for name, extra in CASES:
        runs = []
        for i in range(args.repeats):
            cmd = [sys.executable, "tools/convert_to_hf.py", str(run_dir), "--output", str(out_dir)]
            cmd += [*extra, "--overwrite", "--no-progress"]
            load = os.getloadavg()[0]
            r = measure(cmd)
            r["loadavg_1min_before"] = round(load, 2)
            print(
                f"{name} #{i + 1}: rc {r['rc']}, {r['wall_s']:.1f}s, peak RSS "
                f"{r['peak_rss_bytes'] / 2**20:.0f} MiB "
                f"({r['peak_rss_bytes'] / (num_params * 4):.2f} x fp32 size), load {load:.1f}",
                flush=True,
            )
            if r["rc"] != 0:
                sys.exit(f"{name} failed (rc {r['rc']}):\n{r['output_tail']}")
            runs.append(r)
        worst = max(runs, key=lambda r: r["peak_rss_bytes"])
        cases.append(
            {
                "name": name,
                "args": extra,
                "wall_s": [r["wall_s"] for r in runs],
                "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                "loadavg_1min_before": [r["loadavg_1min_before"] for r in runs],
                **{k: v for k, v in worst.items() if k not in ("wall_s", "loadavg_1min_before")},
            }
        )
    shutil.rmtree(out_dir, ignore_errors=True)
    result["cases"] = cases
    size = num_params * 4
    result["summary"] = {
        c["name"]: {
            "wall_s": round(c["wall_s_median"], 2),
            "peak_rss_over_fp32_size": round(c["peak_rss_bytes"] / size, 3),
            "peak_minus_baseline_over_fp32_size": round(
                (c["peak_rss_bytes"] - result["baseline"]["peak_rss_bytes"]) / size, 3
            ),
        }
        for c in cases
    }
    results = ROOT / args.results
    results.mkdir(parents=True, exist_ok=True)
    (results / "bench_export.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, results / "bench_export.md")
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {results / 'bench_export.json'} and {results / 'bench_export.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
