"""tools/plot_weights.py and irdro.observe on a synthetic run directory (no training)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_shards

pytest.importorskip("matplotlib", reason="plotting needs the plot extra: pip install -e .[plot]")

from irdro.observe import decode_samples, load_dumps, loss_groups, pick_samples
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
