"""prepare(format="text") / tools/prepare_data.py / tools/fetch_assets.py with the real GPT-2 tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from irdro.prepare import prepare
from irdro.shards import DataError, ShardDataset, tokenizer_fingerprint
from irdro_tools import prepare_data
from irdro_tools.fetch_assets import GPT2_CHECKS, _check_gpt2, fetch_gpt2_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def sonnets(sonnets_jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in sonnets_jsonl.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def split_dataset(tmp_path_factory, sonnets_jsonl: Path, gpt2_tokenizer_dir: Path):
    out = tmp_path_factory.mktemp("prep") / "sonnets"
    result = prepare(
        [str(sonnets_jsonl)],
        str(gpt2_tokenizer_dir),
        str(out),
        seq_len=SEQ_LEN,
        eval_fraction=0.2,
        seed=1,
        progress=False,
    )
    return out, result


def _docs(ds: ShardDataset) -> dict[int, list[np.ndarray]]:
    """doc_id -> its chunks' input_ids in chunk order."""
    docs: dict[int, list[np.ndarray]] = {}
    for i in range(len(ds)):
        s = ds[i]
        chunks = docs.setdefault(s.doc_id, [])
        assert s.chunk_id == len(chunks)  # chunks are written in order
        chunks.append(s.input_ids)
    return docs


def test_fixture_has_the_154_sonnets(sonnets: list[dict]) -> None:
    assert len(sonnets) == 154
    assert sonnets[0]["id"] == "sonnet-I" and sonnets[-1]["id"] == "sonnet-CLIV"
    assert sonnets[0]["text"].startswith("From fairest creatures we desire increase,")


def test_gpt2_tokenizer_is_real(gpt2_tokenizer_dir: Path, tokenizer) -> None:
    _check_gpt2(tokenizer, str(gpt2_tokenizer_dir))
    assert tokenizer.eos_token_id == GPT2_CHECKS["eos"][1]
    assert fetch_gpt2_tokenizer(str(gpt2_tokenizer_dir)) == str(gpt2_tokenizer_dir)  # no-op


def test_tokenizer_fingerprint_ignores_location_and_call_state(
    tmp_path: Path, gpt2_tokenizer_dir: Path, tokenizer
) -> None:
    copy = tmp_path / "elsewhere"
    shutil.copytree(gpt2_tokenizer_dir, copy)
    other = AutoTokenizer.from_pretrained(copy)
    other.pad_token = other.eos_token
    other(["a b c d e"], truncation=True, max_length=2, padding="max_length")
    assert '"max_length":2' in other.backend_tokenizer.to_str()  # the state that must not count
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tokenizer)


def test_prepare_text_split(split_dataset, sonnets: list[dict], tokenizer) -> None:
    out, result = split_dataset
    assert set(result) == {"train", "eval"}
    train, evals = ShardDataset(out / "train"), ShardDataset(out / "eval")
    train_docs, eval_docs = _docs(train), _docs(evals)

    assert not set(train_docs) & set(eval_docs)
    assert set(train_docs) | set(eval_docs) == set(range(154))
    assert 0 < len(eval_docs) < len(train_docs)
    for ds, docs, manifest in [
        (train, train_docs, result["train"]),
        (evals, eval_docs, result["eval"]),
    ]:
        assert ds.manifest == manifest
        assert manifest.num_docs == len(docs)
        assert manifest.num_samples == len(ds) == sum(len(c) for c in docs.values())
        assert manifest.num_tokens == sum(len(x) for c in docs.values() for x in c)
        assert manifest.to_dict()["tokenizer"] == {
            "name": "gpt2-tokenizer",
            "hash": tokenizer_fingerprint(tokenizer),
        }
        assert (manifest.vocab_size, manifest.eos_token_id, manifest.dtype) == (
            50257,
            50256,
            "uint16",
        )
        assert all(len(x) <= SEQ_LEN for c in docs.values() for x in c)
        ds.verify()

    first = train[0]
    assert first.chunk_id == 0
    text = sonnets[first.doc_id]["text"]
    assert tokenizer.decode(first.input_ids).startswith(text[:100])
    assert len(train_docs[first.doc_id]) > 1  # a sonnet is longer than 64 tokens
    # every document's chunks reassemble to its text + EOS
    for doc_id, chunks in list(eval_docs.items())[:5]:
        assert tokenizer.decode(np.concatenate(chunks)) == sonnets[doc_id]["text"] + "<|endoftext|>"


def test_prepare_text_is_deterministic(tmp_path: Path, split_dataset, sonnets_jsonl, gpt2_tokenizer_dir) -> None:
    _, first = split_dataset
    again = prepare(
        [str(sonnets_jsonl)],
        str(gpt2_tokenizer_dir),
        str(tmp_path / "again"),
        seq_len=SEQ_LEN,
        eval_fraction=0.2,
        seed=1,
        progress=False,
    )
    for split in ("train", "eval"):
        assert again[split].shards == first[split].shards


def test_prepare_text_inputs_and_skips(tmp_path: Path, gpt2_tokenizer_dir: Path, tokenizer) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("Shall I compare thee")
    (src / "sub" / "b.jsonl").write_text('{"body": "Thou art more lovely"}\n\n{"body": "   "}\n')
    (src / "sub" / "c.json").write_text(json.dumps([{"body": "and more temperate"}]))
    (src / "ignored.md").write_text("not an input")
    out = tmp_path / "out"
    kw = dict(seq_len=8, text_field="body", progress=False)
    manifest = prepare([str(src)], str(gpt2_tokenizer_dir), str(out), **kw)
    assert manifest.num_docs == 3 and manifest.num_skipped["empty"] == 1
    assert sum(manifest.num_skipped.values()) == 1
    ds = ShardDataset(out)
    assert [ds[i].doc_id for i in range(len(ds))] == [0, 1, 3]  # doc 2 was the empty one
    text = "".join(tokenizer.decode(ds[i].input_ids) for i in range(len(ds)))
    eos = "<|endoftext|>"
    assert text == f"Shall I compare thee{eos}Thou art more lovely{eos}and more temperate{eos}"

    (src / "sub" / "c.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(DataError, match=r"c.json\[record 0\]: record has no field 'body'"):
        prepare([str(src)], str(gpt2_tokenizer_dir), str(out), overwrite=True, **kw)
    assert len(ShardDataset(out)) == len(ds)  # the failed run left the old output intact


def test_malformed_json_line_names_file_and_line(tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=rf"{bad}:2: malformed JSON"):
        prepare([str(bad)], str(gpt2_tokenizer_dir), str(tmp_path / "out"), seq_len=16, progress=False)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no temp dirs left


def test_missing_field_names_file_line_and_field(tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: record has no field 'text' \(fields: content\)"):
        prepare([str(bad)], str(gpt2_tokenizer_dir), str(tmp_path / "out"), seq_len=16, progress=False)


def test_missing_input(tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    with pytest.raises(DataError, match="matches no file"):
        prepare([str(tmp_path / "*.jsonl")], str(gpt2_tokenizer_dir), str(tmp_path / "o"), seq_len=16)


# ----------------------------------------------------------------------------- CLI


def test_cli_bad_input_exits_2_without_traceback(tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--input", str(bad)]
        + [
            "--tokenizer",
            str(gpt2_tokenizer_dir),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {bad}:2: malformed JSON")
    assert "Traceback" not in proc.stderr


def test_cli_prepare_then_verify(tmp_path: Path, sonnets_jsonl: Path, gpt2_tokenizer_dir: Path, capsys) -> None:
    out = tmp_path / "out"
    args = [
        "--input",
        str(sonnets_jsonl),
        "--tokenizer",
        str(gpt2_tokenizer_dir),
        "--output",
        str(out),
    ]
    assert prepare_data.main([*args, "--seq-len", "128", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 154 docs" in printed

    assert prepare_data.main([*args, "--no-progress"]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err

    assert prepare_data.main(["--verify", str(out)]) == 0
    assert "sha256 verified" in capsys.readouterr().out

    tokens = out / "shard_00000.tokens.npy"
    raw = bytearray(tokens.read_bytes())
    raw[200] ^= 1
    tokens.write_bytes(bytes(raw))
    assert prepare_data.main(["--verify", str(out)]) == 2
    assert "shard_00000.tokens.npy" in capsys.readouterr().err


def test_cli_usage_errors(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--input", "x"])
    assert e.value.code == 2
    assert "--tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--help"])
    assert e.value.code == 0
    assert "--eval-fraction" in capsys.readouterr().out


def test_fetch_assets_refuses_a_foreign_dir(tmp_path: Path, capsys) -> None:
    from irdro_tools import fetch_assets

    (tmp_path / "stuff.txt").write_text("x")
    assert fetch_assets.main(["gpt2-tokenizer", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
