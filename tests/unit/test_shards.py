"""irdro.shards: the typed manifest refuses what it does not know, and the format side of the data
pipeline (shards, prepare, the prepare tool) imports without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_shards

from irdro.shards import MANIFEST_NAME, DataError, Manifest, ShardDataset, ShardWriter

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["irdro.shards", "irdro.prepare"])
def test_format_side_imports_without_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_prepare_tool_help_imports_without_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "tools/prepare_data.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "usage: prepare_data.py" in out.stdout
    assert "torch" not in out.stderr  # -X importtime lists every imported module on stderr


def _edit_manifest(path: Path, edit) -> None:
    file = path / MANIFEST_NAME
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


def test_misspelt_manifest_key_is_refused_naming_the_closest(tmp_path: Path) -> None:
    path = write_shards(tmp_path / "ds", [[1, 2, 3]])
    _edit_manifest(path, lambda m: m.update(seqlen=m.pop("seq_len")))
    with pytest.raises(DataError, match=r"manifest.json: unknown key 'seqlen' \(did you mean 'seq_len'\?\)"):
        ShardDataset(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(num_docs="3"), "'num_docs' is str"),
        (lambda m: m.update(has_mask=1), "'has_mask' is int"),
        (lambda m: m["shards"][0].update(extra=1), r"shards\[0\] has unknown key 'extra'"),
        (lambda m: m["tokenizer"].update(hsh="x"), "'tokenizer' must be an object"),
        (lambda m: m.update(num_samples=2), "num_samples is 2 but the shards list 1"),
    ],
)
def test_mistyped_manifest_is_refused(tmp_path: Path, edit, match: str) -> None:
    path = write_shards(tmp_path / "ds", [[1, 2, 3]])
    _edit_manifest(path, edit)
    with pytest.raises(DataError, match=match):
        Manifest.read(path)


def test_manifest_round_trips_and_the_writer_refuses_unknown_keys(tmp_path: Path) -> None:
    path = write_shards(tmp_path / "ds", [[1, 2, 3], [4, 5]])
    manifest = Manifest.read(path)
    on_disk = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest.to_dict() == on_disk and list(manifest.to_dict()) == list(on_disk)
    assert Manifest.from_dict(on_disk) == manifest
    args = dict(vocab_size=10, tokenizer_name="t", tokenizer_hash="h", seq_len=8, eos_token_id=None, pad_token_id=None)
    with pytest.raises(ValueError, match="not manifest keys"):
        ShardWriter(tmp_path / "w", meta={"long_doc": "split"}, **args)
    with ShardWriter(tmp_path / "w", **args) as w, pytest.raises(ValueError, match="not a counter"):
        w.count("num_truncate")
