"""Crash-safe writes: the one place irdro writes files that must never be seen half-written.

Owns: atomic file writes (temp name beside the target, fsync, rename), staging directories that are
published onto their final name in one rename (the old content removed only afterwards), the
output-directory check every writer shares, and the sha256 of a file. Must not: know any file
format (shards, checkpoints, exports) or import torch.

A reader therefore sees either the previous complete file/dir or the new complete one, never a
partial one, also after `kill -9` or a full disk during the write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


class OutputError(Exception):
    """An output path that cannot be written as asked; one line naming the path and what to do."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory, fsync'd, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty directory without ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputError(
            f"output {output} is not empty; pass --overwrite (overwrite=True) to replace it"
        )


def make_staging_dir(output: Path) -> Path:
    """A fresh hidden temporary directory beside ``output``, to be renamed onto it when done."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the final dir should be shareable
    return staging


def publish_dir(staging: Path, output: Path, overwrite: bool) -> None:
    """Move a complete ``staging`` dir to ``output``; an old output is removed only afterwards."""
    check_output_dir(output, overwrite)
    old = None
    if output.is_dir():
        if any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(output, old)
        else:
            output.rmdir()
    try:
        os.rename(staging, output)
    except OSError:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(file: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
