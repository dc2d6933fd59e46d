"""tools/select_data.py: the kept band, parent ids, the selection's scores and manifest, refusals."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import random_samples, write_shards

from irdro.scores import ScoresMeta, manifest_sha256, read_scores, write_scores
from irdro.shards import ShardDataset
from irdro_tools.select_data import main

N = 101


@pytest.fixture
def scored(tmp_path: Path) -> Path:
    """101 masked random samples with scores that have ties (rounded to 0.5)."""
    rng = np.random.default_rng(5)
    samples = random_samples(N, seed=2)
    masks = [rng.random(len(s)) < 0.6 for s in samples]
    data = write_shards(tmp_path / "data", samples, masks=masks, doc_ids=[i // 2 for i in range(N)], shard_tokens=500)
    nll = np.round(rng.normal(3.0, 1.0, N) * 2) / 2
    tokens = rng.integers(1, 40, N)
    meta = ScoresMeta(
        name="ref",
        model={"path": "m", "name": "m", "sha256": "x"},
        dtype="fp32",
        num_samples=N,
        manifest_sha256=manifest_sha256(data),
        tokenizer_hash="0" * 64,
    )
    write_scores(data, meta, nll, tokens)
    return data


def numpy_band(scores: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Ranks low -> high by a stable sort (ties by id), keep [floor(lo*n), floor(hi*n))."""
    order = np.argsort(scores, kind="stable")
    return np.sort(order[math.floor(lo * len(scores)) : math.floor(hi * len(scores))])


@pytest.mark.parametrize(
    ("args", "lo", "hi"),
    [(["--keep", "0.25:0.75"], 0.25, 0.75), (["--drop-top", "0.1", "--drop-bottom", "0.2"], 0.2, 0.9)],
)
def test_selection_is_the_band_with_parent_ids_scores_and_manifest(scored, tmp_path, args, lo, hi, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--data", str(scored), "--scores", "ref", *args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    parent, child = ShardDataset(scored), ShardDataset(out)
    child.verify()
    parent_scores = read_scores(scored, "ref")
    expected = numpy_band(parent_scores.nll, lo, hi)
    ids = np.load(out / "parent_ids.npy")
    assert np.array_equal(ids, expected) and len(child) == len(expected)
    for row, pid in enumerate(ids.tolist()):  # rows map back to identical samples
        a, b = child[row], parent[pid]
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
        assert (a.doc_id, a.chunk_id) == (b.doc_id, b.chunk_id)
    child_scores = read_scores(out, "ref")  # tied to OUT's manifest
    assert np.array_equal(child_scores.nll, parent_scores.nll[ids])
    assert np.array_equal(child_scores.tokens, parent_scores.tokens[ids])
    sel = child.manifest.selection
    assert sel["parent"] == str(scored.resolve()) and sel["scores"] == "ref"
    assert sel["parent_manifest_sha256"] == manifest_sha256(scored) and sel["band"] == [lo, hi]
    m, pm = child.manifest, parent.manifest
    assert (m.tokenizer, m.vocab_size, m.seq_len, m.has_mask) == (pm.tokenizer, pm.vocab_size, pm.seq_len, True)
    assert json.loads((out / "manifest.json").read_text())["selection"]["rule"] == sel["rule"]
    assert (out / "scores_histogram.png").stat().st_size > 1000
    kept = parent_scores.nll[ids]
    assert f"kept {len(ids)} of {N} samples" in printed and f"{kept.mean():.4f}" in printed
    assert f"{kept.min():.4f} .. {kept.max():.4f}" in printed


@pytest.mark.parametrize(
    "rule",
    [["--keep", "0.8:0.2"], ["--keep", "0:1.5"], ["--keep", "0.1:0.5", "--drop-top", "0.1"], ["--drop-top", "1.2"], []],
)
def test_bad_rule_is_a_one_line_error(scored, tmp_path, rule, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--data", str(scored), "--scores", "ref", *rule, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not out.exists()


def test_plot_path_and_overwrite(scored, tmp_path, capsys) -> None:
    out, png = tmp_path / "out", tmp_path / "plots" / "h.png"
    args = ["--data", str(scored), "--scores", "ref", "--drop-top", "0.05", "--output", str(out), "--plot", str(png)]
    assert main(args) == 0 and png.stat().st_size > 1000 and not (out / "scores_histogram.png").exists()
    before = (out / "manifest.json").read_bytes()
    assert main(["--data", str(scored), "--scores", "ref", "--keep", "0:0.5", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "manifest.json").read_bytes() == before
    assert main(["--data", str(scored), "--scores", "ref", "--keep", "0:0.5", "--output", str(out), "--overwrite"]) == 0
    assert len(ShardDataset(out)) == N // 2
    assert main(["--data", str(scored), "--scores", "nope", "--keep", "0:0.5", "--output", str(tmp_path / "o2")]) == 2
    assert "no scores named 'nope'" in capsys.readouterr().err


def test_without_matplotlib_the_selection_succeeds_or_is_refused_before_writing(
    scored, tmp_path, monkeypatch, capsys
) -> None:
    """matplotlib is the optional extra `plot`: without it the default histogram is skipped (exit 0,
    OUT complete), and an explicit --plot is refused before OUT is written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "out"
    args = ["--data", str(scored), "--scores", "ref", "--keep", "0.25:0.75"]
    assert main([*args, "--output", str(out)]) == 0
    assert "no histogram" in capsys.readouterr().out and len(ShardDataset(out)) == 50
    assert not (out / "scores_histogram.png").exists()
    other = tmp_path / "other"
    assert main([*args, "--output", str(other), "--plot", str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and not other.exists()
