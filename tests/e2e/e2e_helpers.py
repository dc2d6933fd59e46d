"""Helpers the launcher tests import (a module of its own: `conftest` is not importable by name
once several test folders each have one)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

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
