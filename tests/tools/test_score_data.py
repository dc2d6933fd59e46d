"""tools/score_data.py: scores equal a plain transformers recomputation, 2 ranks equal 1, resume, refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, launcher, random_samples, save_tiny_model, write_shards

from irdro.scores import read_scores, scores_dir
from irdro.scoring import _chunk_file, _read_chunk, _write_chunk, partial_dir, score_dataset
from irdro.shards import ShardDataset, tokenizer_fingerprint
from irdro_tools.score_data import main

NUM_SAMPLES = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gpt2_tokenizer_dir: Path) -> Path:
    """The tiny random Llama with the GPT-2 tokenizer beside its weights."""
    path = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    for f in gpt2_tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="module")
def fingerprint(model_dir: Path) -> str:
    from transformers import AutoTokenizer

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(model_dir))


def make_shards(path: Path, tokenizer_hash: str) -> Path:
    """40 random samples of 2..40 tokens, about a third of each sample's tokens unsupervised."""
    rng = np.random.default_rng(7)
    samples = random_samples(NUM_SAMPLES, vocab_size=50257, seed=3)
    masks = [rng.random(len(s)) < 0.7 for s in samples]
    for m in masks:
        m[-2:] = True  # at least one target per sample
    return write_shards(path, samples, vocab_size=50257, masks=masks, tokenizer_hash=tokenizer_hash)


@pytest.fixture
def shards(tmp_path: Path, fingerprint: str) -> Path:
    return make_shards(tmp_path / "data", fingerprint)


def reference_nll(model_dir: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each sample alone through transformers: logits, shift, mean CE over the supervised targets."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ds = ShardDataset(data)
    nll, tokens = np.empty(len(ds)), np.empty(len(ds), dtype=np.int64)
    with torch.no_grad():
        for i in range(len(ds)):
            s = ds[i]
            logits = model(torch.from_numpy(s.input_ids)[None]).logits[0, :-1]
            targets = torch.from_numpy(s.labels[1:])
            nll[i] = float(torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100))
            tokens[i] = int((targets != -100).sum())
    return nll, tokens


@pytest.mark.parametrize("packing", ["none", "boundary"])
def test_scores_equal_a_plain_transformers_recomputation(model_dir, shards, packing, capsys) -> None:
    args = ["--data", str(shards), "--model", str(model_dir), "--packing", packing, "--micro-batch-size", "8"]
    assert main([*args, "--chunk-size", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"scored {NUM_SAMPLES} samples" in out and "mean NLL" in out
    scores = read_scores(shards)
    nll, tokens = reference_nll(model_dir, shards)
    assert (scores.tokens == tokens).all() and tokens.min() >= 1
    diff = float(np.abs(scores.nll - nll).max())
    with capsys.disabled():
        print(f"\nscore_data vs transformers ({packing}): max |nll diff| = {diff:.3e}")
    assert diff < 1e-5
    assert scores.meta.model["sha256"] and scores.meta.dtype == "fp32" and scores.meta.num_samples == NUM_SAMPLES
    assert not partial_dir(shards, "reference").exists()


def test_resume_keeps_finished_chunks_and_equals_an_uninterrupted_run(model_dir, shards) -> None:
    kw = dict(chunk_size=8, micro_batch_size=4, progress=False)
    whole = score_dataset(shards, model_dir, name="whole", **kw)
    assert (whole.computed_chunks, whole.reused_chunks) == (5, 0)

    # a partial run of another dtype is discarded, not mixed in
    score_dataset(shards, model_dir, name="cut", dtype="bf16", stop_after_chunks=1, **kw)
    stopped = score_dataset(shards, model_dir, name="cut", stop_after_chunks=2, **kw)
    assert (stopped.path, stopped.computed_chunks, stopped.reused_chunks) == (None, 2, 0)
    partial = partial_dir(shards, "cut")
    assert sorted(p.name for p in partial.glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert not scores_dir(shards, "cut").exists()

    # mark chunk 1 so that a recomputation would show: the final scores must carry the mark
    key = str(np.load(_chunk_file(partial, 0))["key"])
    nll1, tokens1 = _read_chunk(_chunk_file(partial, 1), key, 8)
    _write_chunk(_chunk_file(partial, 1), key, nll1 + 100.0, tokens1)

    resumed = score_dataset(shards, model_dir, name="cut", **kw)
    assert (resumed.computed_chunks, resumed.reused_chunks) == (3, 2)
    assert not partial.exists()
    a, b = read_scores(shards, "whole"), read_scores(shards, "cut")
    b_nll = b.nll.copy()
    assert np.allclose(b_nll[8:16], a.nll[8:16] + 100.0)  # chunk 1 was reused, not recomputed
    b_nll[8:16] -= 100.0
    assert np.array_equal(b.tokens, a.tokens) and np.abs(b_nll - a.nll).max() < 1e-9


def test_refuses_shards_of_another_tokenizer(model_dir, tmp_path, capsys) -> None:
    data = make_shards(tmp_path / "other", "0" * 64)
    assert main(["--data", str(data), "--model", str(model_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenised with" in err and "Traceback" not in err
    assert not (data / "scores").exists() or not any((data / "scores").glob("*/scores.json"))


def test_refuses_existing_scores_without_overwrite(model_dir, shards, capsys) -> None:
    args = ["--data", str(shards), "--model", str(model_dir), "--chunk-size", "16", "--no-progress"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in scores_dir(shards).iterdir()}
    capsys.readouterr()
    assert main([*args, "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in scores_dir(shards).iterdir()} == before
    assert main([*args, "--dtype", "bf16", "--overwrite"]) == 0
    assert read_scores(shards).meta.dtype == "bf16"


@pytest.mark.parametrize("bad", ["data", "model"])
def test_bad_input_is_one_line(model_dir, shards, tmp_path, bad, capsys) -> None:
    data, model = str(shards), str(model_dir)
    if bad == "data":
        data = str(tmp_path / "nowhere")
    else:
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    assert main(["--data", data, "--model", model, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert ("not a Hugging Face model folder" if bad == "model" else "does not exist") in err


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_zero3_equal_one_process(model_dir, shards) -> None:
    """`deepspeed --num_gpus 2 --module tools.score_data --zero3` on CPU: 3 chunks over 2 ranks (rank
    1 runs dummy forwards to keep ZeRO-3's gathers in step) give the single process's scores."""
    common = ["--data", str(shards), "--model", str(model_dir), "--chunk-size", "16", "--no-progress"]
    assert main([*common, "--name", "one"]) == 0
    port = str(29500 + os.getpid() % 1000 + 7)
    cmd = [launcher(), "--num_gpus", "2", "--master_port", port, "--module", "tools.score_data", *common]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [*cmd, "--name", "two", "--zero3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = read_scores(shards, "one"), read_scores(shards, "two")
    diff = float(np.abs(one.nll - two.nll).max())
    print(f"\n2 ranks (ZeRO-3) vs 1 process: max |nll diff| = {diff:.3e}")
    assert np.array_equal(one.tokens, two.tokens) and diff <= 1e-6
    assert two.meta.extra["zero3"] is True


def test_a_partial_run_of_another_packing_is_discarded_not_mixed_in(model_dir, shards) -> None:
    """The scores record one `packing`: a resume with the other must not reuse the chunks of the first."""
    kw = dict(name="mixed", chunk_size=8, micro_batch_size=4, progress=False)
    score_dataset(shards, model_dir, packing="none", stop_after_chunks=1, **kw)
    resumed = score_dataset(shards, model_dir, packing="boundary", **kw)
    assert (resumed.computed_chunks, resumed.reused_chunks) == (5, 0)
    assert read_scores(shards, "mixed").meta.extra["packing"] == "boundary"


def test_a_write_error_is_one_line(model_dir, shards, monkeypatch, capsys) -> None:
    """A read-only or full disk (OSError while writing chunks or scores) is a one-line error, exit 2."""
    import irdro_tools.score_data as tool

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(Path(shards) / "scores"))

    monkeypatch.setattr(tool, "score_dataset", refuse)
    assert main(["--data", str(shards), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Permission denied" in err and "scores" in err and "writable" in err
