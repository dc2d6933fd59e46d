"""Peer: Hugging Face Trainer + DeepSpeed ZeRO-3 (ERM) vs irdro ERM, same model/batch/data/optimizer.

    .venv/bin/python benchmarks/bench_hf_trainer.py --model tiny --reps 3
    .venv/bin/python benchmarks/bench_hf_trainer.py --model smollm2 --reps 1

Both run on 2 CPU ranks started by the real launcher (`deepspeed --num_gpus 2`), with the same
initial weights (a saved folder), the same ZeRO-3 engine settings (ds_configs/zero3_fp32.json; HF
gets "auto" for the batch/clipping keys, as it expects), the same samples per rank per step (our
order with data.shuffle=false; the Trainer gets a sequential sampler, and accelerate deals batch i
to rank i % 2, which is our layout for GA 1), the same padding (irdro.data.collate), torch AdamW
with the same lr/betas/eps, no weight decay, no warm-up, constant LR, grad clip 1.0. Launches
alternate (ours, HF, HF, ours, ...). Per launch: median step time after `--warmup` steps (ours:
tokens / tokens_per_s of metrics.jsonl; HF: a TrainerCallback timing on_step_begin ->
on_step_end on rank 0), peak RSS per rank over the whole run, and the first steps' losses.
tokens/s is the same supervised-token count per step over each side's median step time.

Results: benchmarks/results/bench_hf_trainer_<model>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from common import (
    BENCH,
    EXTENSIONS,
    PY,
    ROOT,
    TINY_LLAMA,
    gpt2_tokenizer,
    median,
    say,
    smollm2,
    sonnet_shards,
    status_kb,
    write_results,
)

from irdro.engine import free_port

DEEPSPEED = str(Path(PY).with_name("deepspeed"))
LR, BETAS, EPS = 1e-4, (0.9, 0.95), 1e-8


def assets(model: str) -> tuple[Path, Path, Path]:
    """(model folder, tokenizer folder, train shards) for `model`."""
    if model == "tiny":
        tok = gpt2_tokenizer()
        path = BENCH / "models" / "tiny-llama"
        if not (path / "config.json").exists():
            import torch
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA)).save_pretrained(path)
        return path, tok, sonnet_shards(tok, "sonnets-gpt2-128", 128)
    path = smollm2()
    return path, path, sonnet_shards(path, "sonnets-smollm2-256", 256)


def ds_engine_settings() -> dict:
    return json.loads((ROOT / "ds_configs" / "zero3_fp32.json").read_text())


# --------------------------------------------------------------------------------- HF worker


def hf_worker(args) -> int:
    """One rank of the HF Trainer run (started by the deepspeed launcher)."""
    import torch
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from irdro.data import collate
    from irdro.shards import ShardDataset

    rank = int(os.environ.get("RANK", "0"))
    shards = ShardDataset(args.data)
    pad_id = args.pad_id

    class Samples(Dataset):
        def __len__(self):
            return len(shards)

        def __getitem__(self, i):
            return shards[i]

    def collator(samples):
        batch = collate(samples, pad_id, 8)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    class Sequential(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    times: list[float] = []
    ends: list[float] = []
    losses: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            times.append(ends[-1] - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append({"step": state.global_step, "loss": logs["loss"]})

    # On CPU the Trainer only distributes with use_cpu=True (MULTI_CPU over gloo); its DeepSpeed
    # branch (no use_cpu) finds no backend and runs a world of 1. DeepSpeed's own comm layer must
    # then be started by hand, else zero.Init sees a world of 1 and rejects the batch size.
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    ds = ds_engine_settings()
    ds.update(
        train_micro_batch_size_per_gpu="auto",
        gradient_accumulation_steps="auto",
        train_batch_size="auto",
        gradient_clipping="auto",
    )
    targs = TrainingArguments(
        output_dir=args.out_dir,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        adam_epsilon=EPS,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        disable_tqdm=True,
        deepspeed=ds,
        ddp_backend="gloo",
        use_cpu=True,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    trainer = Sequential(model=model, args=targs, train_dataset=Samples(), data_collator=collator, callbacks=[Timer()])
    trainer.train()
    hwm = status_kb("VmHWM")
    Path(args.result.replace("{rank}", str(rank))).write_text(
        json.dumps(
            {
                "rank": rank,
                "step_s": times,
                "interval_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
                "losses": losses,
                "peak_rss_total_kb": hwm,
                "deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
                "wrapped": type(trainer.model_wrapped).__name__,
                "distributed_type": str(trainer.accelerator.state.distributed_type),
            }
        )
    )
    from irdro.engine import shutdown_distributed

    shutdown_distributed()
    return 0


# --------------------------------------------------------------------------------- driver


def run_launcher(cmd_tail: list[str], log: Path, timeout: float) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(EXTENSIONS)}
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank", *cmd_tail]
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{log.read_text()[-5000:]}")


def ours(args, model_dir: Path, tok: Path, data: Path, tmp: Path) -> dict:
    out_dir = BENCH / "runs" / f"peer_ours_{args.model}"
    shutil.rmtree(out_dir, ignore_errors=True)
    recipe = {
        "output_dir": str(out_dir),
        "seed": 0,
        "max_steps": args.steps,
        "micro_batch_size": args.micro,
        "grad_accum_steps": 1,
        "ds_config": "ds_configs/zero3_fp32.json",
        "model": {"path": str(model_dir), "tokenizer": str(tok), "dtype": "fp32", "attention": "sdpa"},
        "data": {"train": str(data), "shuffle": False, "pad_to_multiple_of": 8},
        "reweight": {"scheme": "erm"},
        "optim": {
            "name": "adamw",
            "lr": LR,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "scheduler": "constant",
            "warmup_steps": 0,
        },
        "checkpoint": {"at_end": False},
        "log": {"tensorboard": False, "progress": False},
    }
    path = tmp / "ours.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = str(tmp / "ours.{rank}.json")
    run_launcher([str(ROOT / "benchmarks" / "rank_entry.py"), res, str(path)], tmp / "ours.log", args.timeout)
    ranks = [json.loads((tmp / f"ours.{r}.json").read_text()) for r in range(2)]
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens_per_s" in r]
    return {
        "side": "irdro",
        "step_s": [r["tokens"] / r["tokens_per_s"] for r in recs],
        # step k's loop interval: from record k-1 to record k (records are steps 1..N)
        "interval_s": [
            b[1] - a[1] for a, b in zip(ranks[0]["log_times"], ranks[0]["log_times"][1:], strict=False) if a[0] >= 1
        ],
        "tokens": [r["tokens"] for r in recs],
        "losses": [{"step": r["step"], "loss": r["loss"]} for r in recs],
        "peak_rss_total_mb": [r["peak_rss_total_kb"] / 1024 for r in ranks],
    }


def hf(args, model_dir: Path, tok: Path, data: Path, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok)
    pad_id = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
    res = str(tmp / "hf.{rank}.json")
    run_launcher(
        [
            __file__,
            "--worker",
            "--model-dir",
            str(model_dir),
            "--data",
            str(data),
            "--pad-id",
            str(pad_id),
            "--micro",
            str(args.micro),
            "--steps",
            str(args.steps),
            "--out-dir",
            str(tmp / "hf_out"),
            "--result",
            res,
        ],
        tmp / "hf.log",
        args.timeout,
    )
    ranks = [json.loads((tmp / f"hf.{r}.json").read_text()) for r in range(2)]
    return {
        "side": "hf_trainer",
        "step_s": ranks[0]["step_s"],
        "interval_s": ranks[0]["interval_s"],
        "losses": ranks[0]["losses"],
        "peak_rss_total_mb": [r["peak_rss_total_kb"] / 1024 for r in ranks],
        "engine": {k: ranks[0].get(k) for k in ("deepspeed_enabled", "wrapped", "distributed_type")},
    }


def reference_losses(args, model_dir: Path, data: Path, pad_id: int) -> dict:
    """Step-1 losses computed directly from the initial weights (no training), both definitions:
    irdro's `loss` (mean of per-sample means over the step's window) and HF's (token mean per
    rank, averaged over ranks / token mean over the whole step)."""
    import torch
    from transformers import AutoModelForCausalLM

    from irdro.data import collate
    from irdro.model import per_sample_nll
    from irdro.shards import ShardDataset

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    shards = ShardDataset(data)
    per_rank, all_losses, all_counts = [], [], []
    with torch.no_grad():
        for rank in range(2):
            b = collate([shards[rank * args.micro + i] for i in range(args.micro)], pad_id, 8)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            losses, counts = per_sample_nll(logits, b["labels"])
            per_rank.append(float((losses * counts).sum() / counts.sum()))
            all_losses.append(losses)
            all_counts.append(counts)
    losses, counts = torch.cat(all_losses), torch.cat(all_counts)
    return {
        "mean_of_per_sample_means": float(losses.mean()),
        "token_mean_per_rank_then_mean": sum(per_rank) / 2,
        "token_mean_global": float((losses * counts).sum() / counts.sum()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1800)
    # worker mode (started by the deepspeed launcher)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--pad-id", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    tiny = args.model == "tiny"
    args.steps = args.steps or (12 if tiny else 6)
    args.micro = args.micro or (4 if tiny else 2)
    if args.worker:
        return hf_worker(args)
    warmup = args.warmup if args.warmup is not None else (3 if tiny else 2)
    model_dir, tok, data = assets(args.model)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok)
    pad_id = t.pad_token_id if t.pad_token_id is not None else t.eos_token_id
    ref = reference_losses(args, model_dir, data, pad_id)
    say(f"reference step-1 losses: {ref}")
    launches = []
    for rep in range(args.reps):
        for side in ("irdro", "hf") if rep % 2 == 0 else ("hf", "irdro"):
            with tempfile.TemporaryDirectory(prefix="irdro-peer-") as tmp:
                fn = ours if side == "irdro" else hf
                row = fn(args, model_dir, tok, data, Path(tmp))
            row["rep"] = rep
            row["step_s_median"] = median(row["step_s"][warmup:])
            # intervals start at step 2 (between steps 1 and 2), so drop warmup - 1 of them
            row["interval_s_median"] = median(row["interval_s"][max(0, warmup - 1) :])
            launches.append(row)
            say(
                f"rep {rep} {row['side']}: median step {row['step_s_median']:.3f}s, first losses "
                f"{[round(x['loss'], 4) for x in row['losses'][:3]]}"
            )
    md, table = summarise(args, launches, ref, warmup)
    write_results(
        f"bench_hf_trainer_{args.model}",
        {"config": {**vars(args), "warmup": warmup}, "reference_step1": ref, "table": table, "launches": launches},
        md,
    )
    print(md)
    return 0


def summarise(args, launches: list[dict], ref: dict, warmup: int) -> tuple[str, dict]:
    ours_l = [r for r in launches if r["side"] == "irdro"]
    hf_l = [r for r in launches if r["side"] == "hf_trainer"]
    tokens = median(ours_l[0]["tokens"][warmup:])  # the same samples on both sides
    pairs = list(zip(ours_l, hf_l, strict=True))
    loop = [h["interval_s_median"] / o["interval_s_median"] for o, h in pairs]
    inner = [h["step_s_median"] / o["step_s_median"] for o, h in pairs]
    table = {
        "tokens_per_step_median": tokens,
        "irdro_interval_s_median": median([r["interval_s_median"] for r in ours_l]),
        "hf_interval_s_median": median([r["interval_s_median"] for r in hf_l]),
        "irdro_step_s_median": median([r["step_s_median"] for r in ours_l]),
        "hf_step_s_median": median([r["step_s_median"] for r in hf_l]),
        "tokens_per_s_ratio_irdro_over_hf_per_rep": loop,
        "tokens_per_s_ratio_irdro_over_hf": median(loop),
        "inner_step_ratio_per_rep": inner,
        "inner_step_ratio": median(inner),
        "irdro_peak_rss_mb": median([max(r["peak_rss_total_mb"]) for r in ours_l]),
        "hf_peak_rss_mb": median([max(r["peak_rss_total_mb"]) for r in hf_l]),
        "irdro_losses": ours_l[0]["losses"][:3],
        "hf_losses": hf_l[0]["losses"][:3],
    }
    t = table
    lines = [
        f"# Peer: HF Trainer + DeepSpeed ZeRO-3 vs irdro ERM, {args.model} "
        "(generated by benchmarks/bench_hf_trainer.py)",
        "",
        f"2 CPU ranks via `deepspeed --num_gpus 2`, micro-batch {args.micro} per rank, GA 1, "
        f"{args.steps} steps per launch (first {warmup} left out), {args.reps} launches per side "
        "in alternating order on a shared machine; same weights, samples, padding, AdamW, "
        "constant LR, clip 1.0. *Loop interval*: wall time between the ends of two consecutive "
        "steps on rank 0 (everything the loop does: data, step, logging); *inner step*: irdro's "
        "timed region (train_step + token all-reduce; tokens / tokens_per_s) vs the Trainer's "
        "on_step_begin -> on_step_end (excludes its batch fetch).",
        "",
        "| side | loop interval (s) | tokens/s by loop interval | inner step (s) | peak RSS per rank, whole run (MB) |",
        "|---|---|---|---|---|",
        f"| irdro ERM | {t['irdro_interval_s_median']:.3f} | "
        f"{tokens / t['irdro_interval_s_median']:.0f} | {t['irdro_step_s_median']:.3f} | "
        f"{t['irdro_peak_rss_mb']:.0f} |",
        f"| HF Trainer | {t['hf_interval_s_median']:.3f} | "
        f"{tokens / t['hf_interval_s_median']:.0f} | {t['hf_step_s_median']:.3f} | "
        f"{t['hf_peak_rss_mb']:.0f} |",
        "",
        f"tokens/s ratio irdro / HF by loop interval (paired per rep, median): "
        f"**{t['tokens_per_s_ratio_irdro_over_hf']:.3f}** (per rep: "
        f"{', '.join(f'{x:.3f}' for x in loop)}); by inner step: {t['inner_step_ratio']:.3f} "
        f"(per rep: {', '.join(f'{x:.3f}' for x in inner)}).",
        "",
        "First-step loss (same initial weights and batch):",
        "",
        f"- irdro `loss` (mean of per-sample means over the window): "
        f"{t['irdro_losses'][0]['loss']:.6f}; recomputed offline: "
        f"{ref['mean_of_per_sample_means']:.6f}",
        f"- HF Trainer logged `loss`: {t['hf_losses'][0]['loss']:.6f}; recomputed offline as "
        f"token mean per rank, averaged over ranks: {ref['token_mean_per_rank_then_mean']:.6f}; "
        f"as one token mean over the step: {ref['token_mean_global']:.6f}",
        "",
        "Losses of the first 3 steps: irdro "
        + ", ".join(f"{x['loss']:.5f}" for x in t["irdro_losses"])
        + "; HF "
        + ", ".join(f"{x['loss']:.5f}" for x in t["hf_losses"]),
    ]
    return "\n".join(lines) + "\n", table


if __name__ == "__main__":
    from irdro.engine import exit_rank

    exit_rank(main())  # skips interpreter finalisation (see exit_rank)
