"""Crash-safe writes: the one place irdro writes files that must never be seen half-written.

Owns: atomic file writes (temp name beside the target, fsync, rename), staging directories that are
published onto their final name in one rename (the old content removed only afterwards), the
output-directory check every writer shares, the sha256 of a file, and where irdro keeps its
download cache. Must not: know any file format (shards, checkpoints, exports) or import torch.

A reader therefore sees either the previous complete file/dir or the new complete one, never a
partial one, also after `kill -9` or a full disk during the write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputError(Exception):
    """An output path that cannot be written as asked; one line naming the path and what to do."""


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` through a temp file in the same directory, fsync'd, then renamed.

    Args:
        path: the file to (re)place; its parent directory is created if missing.
        data: the whole new content.
        mode: permission bits of the new file (e.g. 0o600 for secrets); default: as `open` makes
            it (0o666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> int:
    """Flush `path`'s data to stable storage; returns its size in bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename into it) durable; a no-op where directories
    cannot be opened for fsync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write `text` (UTF-8) to `path` atomically, as `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def check_output_dir(output: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty directory without ``overwrite``."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"output {output} is not empty; pass --overwrite (overwrite=True) to replace it")


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


@contextmanager
def staged_dir(output: Path, *, overwrite: bool) -> Iterator[Path]:
    """A fresh staging dir beside `output` to fill in the `with` block, then published onto `output`.

    On leaving the block without an error the staging dir is published with `publish_dir` (an old
    `output` is removed only once the new one is in place); on any error, in the block or while
    publishing, the staging dir is removed and `output` is left as it was.

    Args:
        output: the directory to create or replace.
        overwrite: replace a non-empty `output` (else `publish_dir` raises OutputError).
    """
    staging = make_staging_dir(Path(output))
    try:
        yield staging
        publish_dir(staging, Path(output), overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def sha256_file(file: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Root of irdro's download cache: $IRDRO_CACHE, else ~/.cache/irdro."""
    return Path(os.environ.get("IRDRO_CACHE") or Path.home() / ".cache" / "irdro")
