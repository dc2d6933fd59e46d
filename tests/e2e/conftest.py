"""Fixtures for launcher tests: the smoke recipe's shards, prepared with the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def launcher() -> str:
    path = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which(
        "deepspeed"
    )
    assert path, "the deepspeed launcher is not installed"
    return path


def smoke_command(
    run_dir: Path, data: Path, tokenizer: Path, *overrides: str, port: int | None = None
) -> list[str]:
    """`deepspeed --num_gpus 2 --module irdro.train recipes/tiny/cpu_smoke.yaml ...` on test paths."""
    port = port or 29500 + os.getpid() % 1000
    return [launcher(), "--num_gpus", "2", "--master_port", str(port), "--module", "irdro.train",
            "recipes/tiny/cpu_smoke.yaml", f"output_dir={run_dir}", f"model.tokenizer={tokenizer}",
            f"data.train={data / 'train'}", f"data.eval={data / 'eval'}", *overrides]  # fmt: skip


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory, gpt2_tokenizer_dir, sonnets_jsonl):
    out = tmp_path_factory.mktemp("e2e") / "sonnets"
    subprocess.run([sys.executable, "tools/prepare_data.py", "--input", str(sonnets_jsonl),
                    "--tokenizer", str(gpt2_tokenizer_dir), "--output", str(out), "--seq-len", "128",
                    "--eval-fraction", "0.1"], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    return out
