"""Fixtures for launcher tests: the smoke recipe's shards, prepared with the real CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory, gpt2_tokenizer_dir, sonnets_jsonl):
    out = tmp_path_factory.mktemp("e2e") / "sonnets"
    subprocess.run(
        [
            sys.executable,
            "tools/prepare_data.py",
            "--input",
            str(sonnets_jsonl),
            "--tokenizer",
            str(gpt2_tokenizer_dir),
            "--output",
            str(out),
            "--seq-len",
            "128",
            "--eval-fraction",
            "0.1",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out
