"""tools/plot_weights.py and irdro.observe on a synthetic run directory (no training)."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_shards

pytest.importorskip("matplotlib", reason="plotting needs the plot extra: pip install -e .[plot]")

from irdro.observe import (
    decode_samples,
    load_dumps,
    load_metrics,
    loss_groups,
    pick_samples,
    plot_source_shares,
    source_names,
    summarise_sources,
)
from irdro.shards import ShardDataset
from irdro_tools.plot_weights import main

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "plot_weights.py"

TEXTS = [
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate.",
    "Rough winds do shake the darling buds of May,",
    "And summer's lease hath all too short a date.",
    "Zebras quarrel loudly over xylophones in the quiet museum.",  # the noisy, trimmed one
    "Sometime too hot the eye of heaven shines,",
    "And often is his gold complexion dimm'd;",
    "Colourless green ideas sleep furiously under the bridge.",  # hard, kept: the heaviest
]
NOISY, HEAVY = 4, 7


def _weights(losses: list[float], lam: float, trim: int) -> list[float]:
    """IR-DRO weights with the `trim` highest losses set to 0 (like reweight.irdro)."""
    loss = np.asarray(losses, dtype=np.float64)
    keep = np.ones(loss.size, dtype=bool)
    keep[np.argsort(-loss)[:trim]] = False
    e = np.where(keep, np.exp((loss - loss[keep].max()) / lam), 0.0)
    return (e / e.sum()).tolist()


def _rows(step: int, window: int, ids: list[int], losses: list[float], trim: int = 1) -> list[dict]:
    weights = _weights(losses, 0.5, trim)
    return [
        {"step": step, "window": window, "sample_id": i, "rank": n % 2, "loss": x, "weight": w}
        for n, (i, x, w) in enumerate(zip(ids, losses, weights, strict=True))
    ]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    """A run dir as irdro.train leaves it with log.samples_every=2: 4 steps, 2 windows of 4."""
    from transformers import AutoTokenizer

    from irdro.shards import tokenizer_fingerprint

    root = tmp_path_factory.mktemp("plot")
    tok = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    shards = write_shards(
        root / "data" / "train",
        [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS],
        vocab_size=len(tok),
        tokenizer_hash=tokenizer_fingerprint(tok),
    )
    run = root / "run"
    shutil.copytree(gpt2_tokenizer_dir, run / "hf")
    (run / "recipe.yaml").write_text(
        f"output_dir: {run}\ndata:\n  train: {shards}\n"
        "reweight:\n  scheme: irdro\n  window: micro\n  lam: 0.5\n  trim_top: 0.25\n"
    )
    samples = run / "samples"
    samples.mkdir()
    dumps = {
        2: _rows(2, 0, [0, 1, 2, 3], [5.0, 5.2, 5.1, 4.9])
        + _rows(2, 1, [4, 5, 6, 7], [9.5, 5.0, 4.8, 6.5]),  # 4: +3 over its window (trimmed)
        4: _rows(4, 0, [7, 6, 5, 4], [4.0] * 4, trim=0)  # equal losses: uniform weights
        + [  # a skipped window: non-finite loss, all weights 0 (json writes NaN)
            {"step": 4, "window": 1, "sample_id": i, "rank": i % 2, "loss": x, "weight": 0.0}
            for i, x in zip([0, 1, 2, 3], [math.nan, 4.0, 4.0, 4.0], strict=True)
        ],
    }
    for step, rows in dumps.items():
        text = "\n".join(json.dumps(r) for r in rows) + "\n"
        (samples / f"step_{step:08d}.jsonl").write_text(text)
    metrics = [{"step": 0, "eval_loss": 6.0, "eval_ppl": 403.4}]
    for step in range(1, 5):
        skipped = step == 4
        metrics.append(
            {
                "step": step,
                "lr": 1e-3,
                "loss": 6.0 - step / 4,
                "weighted_loss": 6.2 - step / 4,
                "ess": None if skipped else 0.9 - step / 20,
                "max_weight": None if skipped else 0.3,
                "tokens": 40,
                "tokens_per_s": 100.0,
                "grad_norm": 1.0,
                "skipped": int(skipped),
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def test_writes_pngs(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(run_dir), "--output", str(tmp_path / "plots")]) == 0
    names = ["weight_vs_loss", "loss_by_weight", "ess_max_weight", "overview"]
    for name in names:
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    out = capsys.readouterr().out
    assert "2 steps" in out and "1 windows with a non-finite loss" in out
    # a single-directory data.train: no per-source figure or table
    assert not list((tmp_path / "plots").glob("sources*")) and "sources:" not in out
    assert summarise_sources(load_metrics(run_dir)) == ""


def test_default_output_and_step(run_dir: Path) -> None:
    assert main([str(run_dir), "--step", "2"]) == 0
    assert (run_dir / "plots" / "overview_step_00000002.png").stat().st_size > 5000


def test_show_text(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(run_dir), "--show-text", "2", "--output", str(run_dir / "p2")]) == 0
    out = capsys.readouterr().out
    hardest, discarded, heaviest = (
        out.index(f"== {g}") for g in ("highest loss", "discarded as noise", "highest weight")
    )
    # The highest-loss sample (4) leads the loss list and is the one trimmed as noise.
    assert out.index(TEXTS[NOISY]) > hardest
    assert f"sample {NOISY}: loss 9.500" in out[hardest:heaviest]
    assert TEXTS[NOISY] in out[discarded:]
    assert TEXTS[HEAVY] in out[heaviest:discarded]


def test_texts_of_another_tokenizers_shards_are_flagged(
    run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="irdro.observe"):
        assert decode_samples(run_dir, [HEAVY]) == {HEAVY: TEXTS[HEAVY]}
    assert "tokenised with" not in caplog.text  # the run's own shards: no warning

    # the same run reading shards whose manifest names another tokenizer
    other = tmp_path / "run"
    shutil.copytree(run_dir / "hf", other / "hf")
    data = ShardDataset(run_dir.parent / "data" / "train")  # the fixture's shards
    samples = [data[i].input_ids for i in range(len(data))]
    shards = write_shards(tmp_path / "other", samples, vocab_size=data.manifest.vocab_size)
    (other / "recipe.yaml").write_text(f"output_dir: {other}\ndata:\n  train: {shards}\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="irdro.observe"):
        assert decode_samples(other, [HEAVY]) == {HEAVY: TEXTS[HEAVY]}
    assert f"{shards} was tokenised with test (hash 000000000000), not with {other / 'hf'}" in caplog.text


def test_pure_functions(run_dir: Path) -> None:
    dumps = load_dumps(run_dir)
    assert len(dumps) == 12 and dumps.num_skipped_windows == 1 and dumps.num_bad_sums == 0
    assert dumps.steps == [2, 4]
    i = int(np.flatnonzero((dumps.step == 2) & (dumps.sample_id == NOISY))[0])
    assert dumps.excess[i] == pytest.approx(9.5 - np.mean([9.5, 5.0, 4.8, 6.5]))
    groups = loss_groups(dumps)
    assert groups["weight 0 (discarded)"].sum() == 2  # one trimmed per window of step 2
    assert groups["top 25% by weight"].sum() == 2  # step 4's uniform window has no top
    assert sum(g.sum() for g in groups.values()) == len(dumps)
    picks = pick_samples(dumps, 1)
    assert picks["highest weight"][0].sample_id == HEAVY
    assert [p.sample_id for p in picks["discarded as noise"]] == [NOISY]


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (lambda p: None, [], "does not exist"),
        (lambda p: p.mkdir(), [], "not an irdro run directory"),
        (lambda p: (p.mkdir(), (p / "metrics.jsonl").write_text("")), [], "log.samples_every"),
    ],
)
def test_bad_run_dir_exit_2(tmp_path: Path, make, args: list[str], message: str) -> None:
    run = tmp_path / "run"
    make(run)
    proc = subprocess.run([sys.executable, str(TOOL), str(run), *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_step_exit_2(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(run_dir), "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dumped steps: 2, 4" in err


# --------------------------------------------------------------------------- mixtures

SOURCES = {"sonnets": TEXTS[:5], "noise.v2": TEXTS[5:]}  # sample ids 0-4 and 5-7 (offset 5)
# Four logged steps of a group_dro mixture; at step 3 no noise.v2 sample was drawn (loss null).
SHARES = {
    "sonnets": {
        "loss": [5.0, 4.5, 4.0, 3.5],
        "sample_share": [0.5, 0.5, 1.0, 0.5],
        "weight_share": [0.4, 0.45, 1.0, 0.35],
        "epoch": [0.4, 0.8, 1.6, 2.0],
        "alpha": [0.55, 0.6, 0.5, 0.65],
    },
    "noise.v2": {
        "loss": [7.0, 6.5, None, 6.0],
        "sample_share": [0.5, 0.5, 0.0, 0.5],
        "weight_share": [0.6, 0.55, 0.0, 0.65],
        "epoch": [0.67, 1.33, 1.33, 2.0],
        "alpha": [0.45, 0.4, 0.5, 0.35],
    },
}


def _mixture_metrics() -> list[dict]:
    evals = {"eval_loss": 6.0, "eval_ppl": 403.4}
    evals.update({f"eval_source/{n}/{k}": v for n in SOURCES for k, v in (("loss", 6.0), ("ppl", 403.4))})
    metrics = [{"step": 0, **evals}]  # eval-only: no source/ keys
    for i, step in enumerate(range(1, 5)):
        line = {"step": step, "lr": 1e-3, "loss": 5.0, "weighted_loss": 5.2, "ess": 0.8, "max_weight": 0.3}
        for name, fields in SHARES.items():
            line.update({f"source/{name}/{k}": v[i] for k, v in fields.items()})
        metrics.append({**line, **(evals if step == 4 else {})})
    return metrics


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    """A group_dro run over two sources as irdro.train leaves it with log.samples_every=2."""
    from transformers import AutoTokenizer

    from irdro.shards import tokenizer_fingerprint

    root = tmp_path_factory.mktemp("mix")
    tok = AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir))
    entries = []
    for name, texts in SOURCES.items():
        path = write_shards(
            root / "data" / name,
            [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
            vocab_size=len(tok),
            tokenizer_hash=tokenizer_fingerprint(tok),
        )
        entries.append(f"    - {{path: {path}, weight: 0.5, name: {name}}}\n")
    run = root / "run"
    shutil.copytree(gpt2_tokenizer_dir, run / "hf")
    (run / "recipe.yaml").write_text(
        f"output_dir: {run}\ndata:\n  train:\n{''.join(entries)}"
        "reweight:\n  scheme: group_dro\n  window: micro\n  eta: 0.1\n  smoothing: 0.01\n"
    )
    (run / "samples").mkdir()
    windows = {2: [[0, 1, 5, 6], [2, 3, 4, 7]], 4: [[4, 7, 0, 1]]}
    for step, ids_per_window in windows.items():
        rows = []
        for w, ids in enumerate(ids_per_window):
            rows += _rows(step, w, ids, [4.0 + 0.5 * (i % 3) + 0.1 * w for i in ids], trim=0)
        for r in rows:
            r["source"] = "sonnets" if r["sample_id"] < 5 else "noise.v2"
        (run / "samples" / f"step_{step:08d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _mixture_metrics()))
    return run


def test_source_names_first_seen_order() -> None:
    metrics = [
        {"step": 0, "eval_source/z/loss": 1.0, "eval_loss": 1.0},
        {"step": 1, "source/b/loss": 1.0, "source/a/loss": None, "source/b/epoch": 0.1, "source/x": 1.0},
        {"step": 2, "source/c/sample_share": 0.2, "source/a/loss": 2.0, "loss": 1.0},
    ]
    assert source_names(metrics) == ["b", "a", "c"]
    assert source_names(_mixture_metrics()) == ["sonnets", "noise.v2"]
    assert source_names([{"step": 1, "loss": 1.0}]) == []


def test_summarise_sources_by_hand() -> None:
    text = summarise_sources(_mixture_metrics())
    print(text)
    title, header, *rows = text.splitlines()
    assert title.startswith("sources: 2, means over 4 logged steps")
    assert header.split() == [
        "source",
        "sample",
        "share",
        "weight",
        "share",
        "weight/sample",
        "last",
        "epoch",
        "last",
        "alpha",
    ]
    table = {r.split()[0]: [float(v) for v in r.split()[1:]] for r in rows}
    # sonnets: sample (0.5+0.5+1+0.5)/4, weight (0.4+0.45+1+0.35)/4, ratio 0.55/0.625, epoch 2.0, alpha 0.65
    assert table["sonnets"] == [0.625, 0.55, 0.88, 2.0, 0.65]
    # noise.v2: (0.5+0.5+0+0.5)/4, (0.6+0.55+0+0.65)/4, 0.45/0.375, 2.0, 0.35
    assert table["noise.v2"] == [0.375, 0.45, 1.2, 2.0, 0.35]
    without_alpha = [{k: v for k, v in m.items() if not k.endswith("/alpha")} for m in _mixture_metrics()]
    assert "alpha" not in summarise_sources(without_alpha)


def test_plot_source_shares_lines() -> None:
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    plot_source_shares(ax, _mixture_metrics(), "mix")
    lines = ax.get_lines()
    assert [ln.get_linestyle() for ln in lines] == ["-", "--", ":"] * 2
    assert lines[0].get_color() == lines[2].get_color() != lines[3].get_color()
    for ln in lines:  # the eval-only step 0 is not drawn
        assert ln.get_xdata().tolist() == [1, 2, 3, 4]
    assert lines[4].get_ydata().tolist() == SHARES["noise.v2"]["sample_share"]
    assert ax.get_ylim()[0] == 0 and ax.get_title() == "mix"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["sonnets", "noise.v2", "weight share", "sample share", "alpha"]


def test_mixture_writes_sources_png(mixture_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(mixture_run), "--output", str(tmp_path / "plots")]) == 0
    for name in ["weight_vs_loss", "loss_by_weight", "ess_max_weight", "sources", "overview"]:
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, png
    out = capsys.readouterr().out
    assert summarise_sources(_mixture_metrics()) in out
    assert main([str(mixture_run), "--step", "2", "--output", str(tmp_path / "p2")]) == 0
    assert (tmp_path / "p2" / "sources_step_00000002.png").stat().st_size > 5000


def test_mixture_without_dumps(mixture_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(mixture_run / "metrics.jsonl", run / "metrics.jsonl")
    assert main([str(run)]) == 0  # the shares need no dumps
    out = capsys.readouterr().out
    assert summarise_sources(_mixture_metrics()) in out and "wrote" in out
    assert (run / "plots" / "sources.png").stat().st_size > 5000
    assert [p.name for p in (run / "plots").iterdir()] == ["sources.png"]
    assert main([str(run), "--show-text", "1"]) == 2  # texts do need them
    assert "log.samples_every" in capsys.readouterr().err


def test_show_text_mixture(mixture_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(mixture_run), "--show-text", "8", "--output", str(mixture_run / "p")]) == 0
    lines = capsys.readouterr().out.splitlines()
    pick = re.compile(r"^step \d+ window \d+ sample (\d+) \(([^)]+)\): loss")
    seen = 0
    for head, text in zip(lines, lines[1:], strict=False):
        m = pick.match(head)
        if m:
            sid, source = int(m.group(1)), m.group(2)
            assert source == ("sonnets" if sid < 5 else "noise.v2")
            assert text.strip() == TEXTS[sid]  # id = offset of its source + row in it
            seen += 1
    assert seen == 2 * len(TEXTS)  # highest loss, highest weight: every sample once
