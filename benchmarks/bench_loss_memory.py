"""Peak memory of the per-sample loss path vs the model's own `outputs.loss`, same batch.

    .venv/bin/python benchmarks/bench_loss_memory.py --reps 3            # SmolLM2, B=4, T=512
    .venv/bin/python benchmarks/bench_loss_memory.py --model smollm2-2l --reps 3   # 2 layers only
    .venv/bin/python benchmarks/bench_loss_memory.py --model tiny --reps 3
    .venv/bin/python benchmarks/bench_loss_memory.py --time --bsz 4 --seq 512 --reps 6  # time only

Variants, each one forward + backward of the same batch in a fresh process (so the allocator
starts clean), in alternating order (A B C, C B A, ...):

- `hf_loss`: `model(input_ids, attention_mask, labels=labels).loss.backward()` (HF's
  ForCausalLMLoss: one cross-entropy over the flattened [B*T, V] logits).
- `irdro_per_sample`: `irdro.model.per_sample_nll(logits, labels)` then `(w * losses).sum()`
  backward (what irdro.train does): `irdro.model.token_nll`, a custom autograd function that keeps
  only the logits and a log-sum-exp per position, and in backward writes softmax - onehot chunk by
  chunk into the logits' gradient.
- `flat_padded` (the plain alternative, defined here): one `F.cross_entropy(..., reduction="none")`
  over the flattened logits with HF's label-padding shift, then a per-row sum.

Peak = VmHWM of the process during forward + backward (reset just before; /proc/self/clear_refs),
with glibc told to map every block over 64 KiB on its own and to trim freed memory (MALLOC_EXACT),
so that RSS follows live memory instead of the allocator's placement;
"above baseline" = peak - RSS just before the forward (model, inputs already resident). A first
check runs all three on a small batch and compares losses and gradients.

Results: benchmarks/results/bench_loss_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import PY, SONNETS, TINY_LLAMA, median, say, smollm2, status_kb, write_results

VARIANTS = ("hf_loss", "irdro_per_sample", "flat_padded")

# glibc: every block over 64 KiB is its own mapping, returned to the kernel when freed, so RSS
# follows live memory. With the default (a threshold that grows with what was freed, and freed
# heap kept) the same variant's peak moved by a whole [B, T, V] buffer between launches.
MALLOC_EXACT = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def flat_per_sample_nll(logits, labels):
    """Same contract as irdro.model.per_sample_nll, with HF's memory profile: one cross-entropy
    over the flattened, unsliced logits (targets shifted by padding the labels, as HF does, so no
    [B, T-1, V] slice copy) with reduction="none", then a per-row sum."""
    import torch
    import torch.nn.functional as F

    bsz, t = labels.shape
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    counts = (targets != -100).sum(dim=1)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
    return nll.view(bsz, t).sum(dim=1) / counts.clamp(min=1).to(torch.float32), counts


def load(model_name: str, dtype: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from irdro.model import DTYPES

    torch_dtype = DTYPES[dtype]
    if model_name == "smollm2":
        path = smollm2()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(path)
    elif model_name == "smollm2-2l":  # SmolLM2's config with 2 layers: the loss path dominates
        path = smollm2()
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = 2
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(path)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**TINY_LLAMA), dtype=torch_dtype, attn_implementation="sdpa"
        )
        from common import gpt2_tokenizer

        tok = AutoTokenizer.from_pretrained(gpt2_tokenizer())
    model.config.use_cache = False
    return model, tok


def batch(tok, bsz: int, seq: int):
    """bsz rows of seq tokens of continuous sonnet text; the last row ends in 64 padding tokens
    (labels -100) so both paths see some unsupervised positions."""
    import torch

    text = "\n\n".join(json.loads(x)["text"] for x in SONNETS.read_text().splitlines())
    ids = tok(text, add_special_tokens=False)["input_ids"][: bsz * seq]
    input_ids = torch.tensor(ids).view(bsz, seq)
    attention = torch.ones_like(input_ids)
    attention[-1, -64:] = 0
    labels = input_ids.masked_fill(attention == 0, -100)
    return input_ids, attention, labels


def step(model, variant: str, input_ids, attention, labels):
    if variant == "hf_loss":
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        return loss
    if variant == "irdro_per_sample":  # the training path itself: irdro.train.forward_losses
        from irdro.train import forward_losses

        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        losses, counts = forward_losses(model, batch)
    else:
        losses, counts = candidate_losses(model, variant, input_ids, attention, labels)
    weights = counts.float() / counts.sum()  # token-weighted: the same objective as HF's mean
    loss = (weights * losses).sum()
    loss.backward()
    return loss


def candidate_losses(model, variant: str, input_ids, attention, labels):
    """Like forward_losses: the logits go out of scope on return (autograd keeps what it needs)."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    return flat_per_sample_nll(logits, labels)


def worker(args) -> int:
    import torch

    torch.manual_seed(0)
    model, tok = load(args.model, args.dtype)
    input_ids, attention, labels = batch(tok, args.bsz, args.seq)
    base = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    loss = step(model, args.variant, input_ids, attention, labels)
    peak = status_kb("VmHWM")
    print(
        json.dumps(
            {
                "variant": args.variant,
                "loss": float(loss),
                "baseline_mb": base / 1024,
                "peak_mb": peak / 1024,
                "above_baseline_mb": (peak - base) / 1024,
            }
        )
    )
    return 0


def check(args) -> dict:
    """Losses and gradients of the three paths on a small batch agree (to fp32 rounding)."""
    import torch

    model, tok = load(args.model, "fp32")
    input_ids, attention, labels = batch(tok, 2, 64)
    out = {}
    for variant in VARIANTS:
        model.zero_grad(set_to_none=True)
        loss = step(model, variant, input_ids, attention, labels)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[variant] = (float(loss), grads)
    ref_loss, ref_grad = out["hf_loss"]
    return {
        v: {
            "loss_abs_diff": abs(loss - ref_loss),
            "grad_max_abs_diff": float((g - ref_grad).abs().max()),
        }
        for v, (loss, g) in out.items()
        if v != "hf_loss"
    }


def time_loss_paths(args) -> int:
    """Wall time of the loss path alone (loss + backward into the logits, no model), same random
    logits for every variant, variants alternated (A B C D, D C B A, ...); medians."""
    import statistics
    import time

    import torch
    import torch.nn.functional as F

    from irdro.model import per_sample_nll

    torch.manual_seed(0)
    vocab = 49152
    base = torch.randn(args.bsz, args.seq, vocab)
    labels = torch.randint(0, vocab, (args.bsz, args.seq))
    labels[-1, -args.seq // 8 :] = -100

    def hf():
        x = base.clone().requires_grad_()
        shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
        F.cross_entropy(x.view(-1, vocab), shift.reshape(-1), ignore_index=-100).backward()

    def per_sample(fn):
        def run():
            x = base.clone().requires_grad_()
            losses, counts = fn(x, labels)
            (losses * counts / counts.sum()).sum().backward()

        return run

    fns = {
        "hf_loss": hf,
        "irdro_per_sample": per_sample(per_sample_nll),
        "flat_padded": per_sample(flat_per_sample_nll),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# Loss-path time (generated by benchmarks/bench_loss_memory.py --time)",
        "",
        f"Loss + backward into random fp32 logits of B {args.bsz} x T {args.seq} x V {vocab} (no "
        f"model), one thread, {args.reps} alternated repetitions per variant; medians.",
        "",
        "| variant | median s | / hf_loss |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {v / med['hf_loss']:.2f} |" for k, v in med.items()]
    md = "\n".join(lines) + "\n"
    write_results(
        f"bench_loss_time_b{args.bsz}_t{args.seq}", {"config": vars(args), "times": times, "median_s": med}, md
    )
    print(md)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "smollm2-2l", "tiny"], default="smollm2")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--bsz", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--time", action="store_true", help="time the loss path alone instead")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.time:
        return time_loss_paths(args)
    if args.variant:
        return worker(args)
    agreement = check(args)
    say(f"agreement with hf_loss: {agreement}")
    runs = []
    for rep in range(args.reps):
        for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
            cmd = [
                PY,
                __file__,
                "--model",
                args.model,
                "--dtype",
                args.dtype,
                "--bsz",
                str(args.bsz),
                "--seq",
                str(args.seq),
                "--variant",
                variant,
            ]
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **MALLOC_EXACT},
            )
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-3000:])
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["rep"] = rep
            runs.append(row)
            say(f"rep {rep} {variant}: peak {row['peak_mb']:.0f} MB, above baseline {row['above_baseline_mb']:.0f} MB")
    table = []
    for v in VARIANTS:
        rows = [r for r in runs if r["variant"] == v]
        hf = {r["rep"]: r for r in runs if r["variant"] == "hf_loss"}
        table.append(
            {
                "variant": v,
                "peak_mb_median": median([r["peak_mb"] for r in rows]),
                "above_baseline_mb_median": median([r["above_baseline_mb"] for r in rows]),
                "peak_ratio_vs_hf": median([r["peak_mb"] / hf[r["rep"]]["peak_mb"] for r in rows]),
                "above_baseline_ratio_vs_hf": median(
                    [r["above_baseline_mb"] / hf[r["rep"]]["above_baseline_mb"] for r in rows]
                ),
                "loss": rows[0]["loss"],
            }
        )
    vocab = 49152 if args.model.startswith("smollm2") else TINY_LLAMA["vocab_size"]
    fp32_logits_mb = args.bsz * args.seq * vocab * 4 / 2**20
    lines = [
        "# Per-sample loss memory (generated by benchmarks/bench_loss_memory.py)",
        "",
        f"{args.model}, {args.dtype}, batch {args.bsz} x {args.seq} tokens, vocab {vocab}: one "
        f"fp32 [B, T, V] tensor is {fp32_logits_mb:.0f} MB. One process, one forward + backward "
        f"per launch, {args.reps} launches per variant in alternating order; medians. glibc "
        "maps every block over 64 KiB on its own and trims freed memory (MALLOC_EXACT), so RSS "
        "follows live memory.",
        "",
        "| variant | peak RSS (MB) | peak / hf_loss | above baseline (MB) | above baseline / hf_loss |",
        "|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['variant']} | {t['peak_mb_median']:.0f} | {t['peak_ratio_vs_hf']:.3f} | "
            f"{t['above_baseline_mb_median']:.0f} | "
            f"{t['above_baseline_ratio_vs_hf']:.3f} |"
        )
    lines += [
        "",
        "Agreement with hf_loss on a 2 x 64 batch (fp32): "
        + ", ".join(
            f"{v}: |dloss| {a['loss_abs_diff']:.2e}, max |dgrad| {a['grad_max_abs_diff']:.2e}"
            for v, a in agreement.items()
        ),
    ]
    md = "\n".join(lines) + "\n"
    write_results(
        f"bench_loss_memory_{args.model}_{args.dtype}",
        {"config": vars(args), "agreement": agreement, "table": table, "runs": runs},
        md,
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
