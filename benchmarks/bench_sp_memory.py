"""Activation memory per rank against sequence length: sequence parallelism 1 vs 2 (Ulysses), CPU.

    .venv/bin/python benchmarks/bench_sp_memory.py                       # T = 512 .. 4096
    .venv/bin/python benchmarks/bench_sp_memory.py --seq-lens 1024 8192

One process (SP 1) and two gloo processes (SP 2) each build the same random Llama (sdpa, fp32; 8
heads, so each SP rank attends with 4) and run, per sequence length T, one training forward of a
batch of B rows of T tokens with irdro's own path: `irdro.data.shard_sequence` (SP 2: each rank
holds T/2 tokens), `irdro.model.enable_sequence_parallel`, `per_sample_nll` / `sharded_sample_nll`,
then the backward.

Measured: the bytes autograd saves for backward during that forward (torch.autograd.graph.
saved_tensors_hooks; distinct storages, parameters left out). That is the activation memory a
rank holds at the start of the backward, the quantity sequence parallelism divides, and it is
exact and repeatable; peak RSS on CPU mixes in the allocator, the gloo buffers and the model, and
moves between runs by more than the effect at small T. The ratio SP2/SP1 is expected near 0.5:
everything but the attention core holds T/2 tokens, and the attention core holds T tokens of half
the heads.

Results: benchmarks/results/bench_sp_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, run_local_ranks, say, write_results  # benchmarks/ is this script's directory

MODEL = dict(
    model_type="llama",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=16384,
    tie_word_embeddings=False,
)


def saved_bytes(fn, exclude: set[int]) -> tuple[object, int]:
    """Run `fn()`; the bytes of the distinct storages autograd saved for backward meanwhile,
    those in `exclude` (parameter storages) left out."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def worker(out: str, seq_lens: list[int], bsz: int) -> None:
    """One rank: init the process group and SP groups, then one forward + backward per length."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from irdro import dist
    from irdro.data import collate, shard_sequence
    from irdro.engine import init_distributed
    from irdro.model import enable_sequence_parallel, per_sample_nll, sharded_sample_nll
    from irdro.shards import Sample

    init_distributed()
    sp = dist.world_size()
    dist.init_groups(sequence_parallel=sp)
    torch.manual_seed(0)
    cfg = dict(MODEL)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), attn_implementation="sdpa").train()
    enable_sequence_parallel(model, sp, bsz)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = []
    for seq_len in seq_lens:
        rng = np.random.default_rng(seq_len)
        samples = [
            Sample(
                sample_id=i,
                input_ids=(ids := rng.integers(0, cfg["vocab_size"], seq_len)),
                labels=ids,
                doc_id=i,
                chunk_id=0,
            )
            for i in range(bsz)
        ]
        batch = collate(samples, pad_id=0, pad_to_multiple_of=sp)

        def forward(batch=batch):
            if sp == 1:
                return per_sample_nll(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
            shard = shard_sequence(batch, dist.sp_rank(), sp)
            logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
            return sharded_sample_nll(logits, shard["shift_labels"])[0]

        losses, nbytes = saved_bytes(forward, params)
        losses.sum().backward()
        model.zero_grad(set_to_none=True)
        rows.append({"seq_len": seq_len, "saved_bytes": nbytes, "loss": float(losses.mean())})
    Path(out.replace("{rank}", os.environ["RANK"])).write_text(json.dumps({"rank": dist.global_rank(), "rows": rows}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--bsz", type=int, default=2, help="rows per micro-batch")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seq_lens, args.bsz)
        return 0
    per_sp = {}
    for sp in (1, 2):
        say(f"SP {sp}: T = {args.seq_lens}")
        with tempfile.TemporaryDirectory(prefix="irdro-bench-sp-") as tmp:
            cmd = [__file__, "--worker", f"{tmp}/r{{rank}}.json", "--bsz", str(args.bsz), "--seq-lens"]
            per_sp[sp] = run_local_ranks(cmd + [str(t) for t in args.seq_lens], sp, Path(tmp))
    table = []
    for i, seq_len in enumerate(args.seq_lens):
        one = per_sp[1][0]["rows"][i]
        two = [r["rows"][i] for r in per_sp[2]]
        worst = max(r["saved_bytes"] for r in two)
        table.append(
            {
                "seq_len": seq_len,
                "sp1_mib": one["saved_bytes"] / 2**20,
                "sp2_mib_per_rank": [r["saved_bytes"] / 2**20 for r in two],
                "ratio": worst / one["saved_bytes"],
                "loss_sp1": one["loss"],
                "loss_sp2": two[0]["loss"],
            }
        )
    lines = [
        "# Activation memory per rank: sequence parallelism 1 vs 2 (Ulysses, CPU)",
        "",
        f"Bytes saved for backward in one training forward (saved_tensors_hooks, parameters excluded); "
        f"random Llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_attention_heads']} heads, vocab {MODEL['vocab_size']}, fp32, sdpa, B={args.bsz}. "
        f"Command: `{Path(PY).name} benchmarks/bench_sp_memory.py --seq-lens {' '.join(map(str, args.seq_lens))}`.",
        "",
        "| T | SP 1 (MiB) | SP 2, per rank (MiB) | SP 2 / SP 1 | mean loss SP 1 / SP 2 |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        per_rank = " / ".join(f"{x:.1f}" for x in r["sp2_mib_per_rank"])
        lines.append(
            f"| {r['seq_len']} | {r['sp1_mib']:.1f} | {per_rank} | {r['ratio']:.3f} | "
            f"{r['loss_sp1']:.6f} / {r['loss_sp2']:.6f} |"
        )
    write_results("bench_sp_memory", {"model": MODEL, "bsz": args.bsz, "rows": table}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
