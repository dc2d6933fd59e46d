"""irdro.validate and irdro.train take options and `a.b=value` overrides in any order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from irdro import validate

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "recipes" / "tiny" / "cpu_smoke.yaml")


def smoke_inputs(tmp_path: Path) -> list[str]:
    """Overrides pointing the smoke recipe at folders that exist (empty: validate only checks
    that they are there)."""
    out = []
    for key, sub in (
        ("model.tokenizer", "tok"),
        ("data.train", "d/train"),
        ("data.eval", "d/eval"),
    ):
        (tmp_path / sub).mkdir(parents=True)
        out.append(f"{key}={tmp_path / sub}")
    return out


@pytest.mark.parametrize(
    "order",
    [
        ["R", "--world-size", "4", "max_steps=3", "seed=7"],
        ["--world-size", "4", "R", "max_steps=3", "seed=7"],
        ["R", "max_steps=3", "seed=7", "--world-size", "4"],
        ["R", "max_steps=3", "--world-size=4", "seed=7"],
    ],
)
def test_validate_takes_options_anywhere(tmp_path, capsys, order):
    paths = smoke_inputs(tmp_path)
    argv = [a for x in order for a in ([SMOKE, *paths] if x == "R" else [x])]
    assert validate.main(argv) == 0
    out = capsys.readouterr().out
    assert "world size 4" in out and "max_steps: 3" in out and "seed: 7" in out
    assert '"train_batch_size": 32' in out  # 4 x GA 2 x 4 ranks


@pytest.mark.parametrize(
    "argv",
    [
        ["--local_rank=1", "R", "max_steps=3", "seed=7"],  # how the deepspeed launcher calls it
        ["R", "max_steps=3", "seed=7", "--local_rank=1"],
        ["R", "max_steps=3", "--local_rank", "1", "seed=7"],
    ],
)
def test_train_takes_options_anywhere(argv):
    from irdro.train import parse_args

    args = parse_args([SMOKE if a == "R" else a for a in argv])
    assert (args.recipe, args.overrides, args.local_rank) == (SMOKE, ["max_steps=3", "seed=7"], 1)


def test_validate_cli_with_intermixed_arguments(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "irdro.validate", SMOKE, "--world-size", "2", "max_steps=3", *smoke_inputs(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 3" in proc.stdout and '"train_batch_size": 16' in proc.stdout


def test_train_main_reads_a_recipe_error_after_an_option(caplog):
    from irdro.train import main

    # a bad override stops main before any process group: the exit code shows the line was parsed
    assert main([SMOKE, "max_steps=3", "--local_rank=0", "optim.lr=fast"]) == 2
    assert "optim.lr: expected a number" in caplog.text


def test_validate_names_missing_reference_scores(tmp_path, capsys):
    """signal excess: validate (with path checks) refuses missing scores in one line naming the shard
    dir and the command that makes them, and passes once they are there."""
    import numpy as np
    from helpers import random_samples, write_shards

    from irdro.scores import ScoresMeta, manifest_sha256, write_scores

    paths = smoke_inputs(tmp_path)
    train = tmp_path / "d" / "train"
    write_shards(train, random_samples(6), overwrite=True)
    argv = [SMOKE, *paths, "reweight.signal=excess", "reweight.reference=ref"]
    assert validate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"reweight.reference: {train} has no scores named 'ref'" in err and "tools.score_data" in err
    assert validate.main([*argv, "--no-path-checks"]) == 0
    meta = ScoresMeta(
        name="ref", model={"path": "m"}, dtype="fp32", num_samples=6, manifest_sha256=manifest_sha256(train)
    )
    write_scores(train, meta, np.zeros(6), np.ones(6))
    capsys.readouterr()
    assert validate.main(argv) == 0
    assert "signal: excess" in capsys.readouterr().out
