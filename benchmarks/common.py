"""Shared helpers of the benchmarks: assets, data, launching N gloo ranks, statistics."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irdro.fsio import cache_dir  # noqa: E402 - needs ROOT on sys.path

RESULTS = ROOT / "benchmarks" / "results"
CACHE = cache_dir()
BENCH = CACHE / "benchmarks"  # shards, saved models and runs of the benchmarks
# DeepSpeed's shm_comm op kept being rebuilt in the shared ~/.cache/torch_extensions (other
# processes on this box build it with other settings): the benchmarks use their own dir.
EXTENSIONS = CACHE / "torch_extensions"
BENCH_ENV = {"PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(EXTENSIONS)}  # every rank and tool
SONNETS = ROOT / "tests" / "fixtures" / "shakespeare" / "sonnets.jsonl"
PY = sys.executable

# The reweighting each step-time benchmark compares (bench_step.py, gpu_check.py).
REWEIGHT_VARIANTS = {
    "erm": {"scheme": "erm", "window": "micro"},
    "irdro_micro": {"scheme": "irdro", "lam": 1.0, "window": "micro"},
    "irdro_step": {"scheme": "irdro", "lam": 1.0, "window": "step"},  # deferred normaliser (scoring_pass auto)
    "irdro_step_scored": {"scheme": "irdro", "lam": 1.0, "window": "step", "scoring_pass": "always"},
    "midrank": {"scheme": "midrank", "frac": 0.5, "portion": 1, "window": "micro"},
}

# The tiny model of recipes/tiny/cpu_smoke.yaml (random init, GPT-2 tokenizer).
TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=50257,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    bos_token_id=50256,
    eos_token_id=50256,
)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpt2_tokenizer() -> Path:
    out = CACHE / "assets" / "gpt2-tokenizer"
    if not (out / "tokenizer.json").exists():
        subprocess.run(
            [PY, str(ROOT / "tools" / "fetch_assets.py"), "gpt2-tokenizer", "--output", str(out)], check=True
        )
    return out


def smollm2() -> Path:
    out = CACHE / "assets" / "smollm2-135m-instruct"
    if not (out / "model.safetensors").exists():
        subprocess.run([PY, str(ROOT / "tools" / "fetch_assets.py"), "smollm2"], check=True)
    return out


def sonnet_shards(tokenizer: Path, name: str, seq_len: int) -> Path:
    """The sonnets fixture sharded with `tokenizer` (built once under $IRDRO_CACHE/bench)."""
    from irdro.prepare import prepare

    out = BENCH / "data" / name
    if not (out / "manifest.json").exists():
        prepare(
            [str(SONNETS)],
            str(tokenizer),
            str(out),
            seq_len=seq_len,
            eval_fraction=0.0,
            seed=0,
            overwrite=True,
            progress=False,
        )
    return out


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, ...)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def run_local_ranks(args: list[str], world_size: int, tmp: Path, timeout: float = 1800) -> list[dict]:
    """`irdro.testing.spawn_ranks` with the benchmarks' environment; each rank must write
    tmp/r{rank}.json, which is returned per rank."""
    from irdro.testing import spawn_ranks

    codes = spawn_ranks(args, world_size, tmp, env=BENCH_ENV, timeout=timeout)
    ranks = []
    for rank, code in enumerate(codes):
        res = tmp / f"r{rank}.json"
        if code != 0 or not res.exists():
            tail = (tmp / f"log{rank}.txt").read_text()[-4000:]
            raise RuntimeError(f"rank {rank} exited {code}:\n{tail}")
        ranks.append(json.loads(res.read_text()))
    return ranks


def train_ranks(recipe: dict, world_size: int = 2, timeout: float = 1800, env: dict | None = None):
    """Train `recipe` on `world_size` local gloo ranks with `irdro.testing.run_ranks` (the
    benchmarks' environment plus `env`); raises when a rank failed. Returns its `Run` (metrics
    records, consolidated state dict)."""
    from irdro.testing import run_ranks

    res = run_ranks(recipe, world_size, timeout=timeout, env={**BENCH_ENV, **(env or {})})
    for r in res.ranks:
        if r.returncode != 0:
            raise RuntimeError(f"rank failed: {r.error}\n{r.log[-3000:]}")
    return res


def run_tool(*argv: str, env: dict | None = None) -> None:
    """`python *argv` from the repository root with the benchmarks' environment plus `env`."""
    subprocess.run([PY, *argv], check=True, cwd=ROOT, env={**os.environ, **BENCH_ENV, **(env or {})})


def launch(recipe: dict, world_size: int, timeout: float = 1800) -> dict:
    """Train `recipe` on `world_size` local gloo ranks (benchmarks/rank_entry.py, no launcher).

    Returns {"ranks": [rank_entry JSON per rank], "metrics": metrics.jsonl records}.
    """
    with tempfile.TemporaryDirectory(prefix="irdro-bench-") as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        entry = str(ROOT / "benchmarks" / "rank_entry.py")
        ranks = run_local_ranks([entry, f"{tmp}/r{{rank}}.json", str(path)], world_size, Path(tmp), timeout)
    metrics = Path(recipe["output_dir"]) / "metrics.jsonl"
    return {"ranks": ranks, "metrics": [json.loads(x) for x in metrics.read_text().splitlines()]}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def environment() -> dict:
    """When and on what a result was measured (the load average says how shared the box was)."""
    import platform

    import deepspeed
    import torch
    import transformers

    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_results(name: str, payload: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = environment()
    (RESULTS / f"{name}.json").write_text(json.dumps({"environment": env, **payload}, indent=2))
    title, _, rest = markdown.partition("\n")
    line = (
        f"Measured {env['date_utc']} UTC on {env['cpus']} CPUs, load average "
        f"{env['load_average']} at the end (a shared machine); torch {env['torch']}, "
        f"deepspeed {env['deepspeed']}, transformers {env['transformers']}."
    )
    (RESULTS / f"{name}.md").write_text(f"{title}\n\n{line}\n{rest}")
