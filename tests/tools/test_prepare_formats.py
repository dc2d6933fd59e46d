"""irdro.prepare: alpaca/chat formats, loss masks, long documents, inputs and bad input, on the
real GPT-2 tokenizer and the committed ChatterBot and Shakespeare fixtures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import irdro.prepare
from irdro.prepare import ALPACA_TEMPLATE_NO_INPUT, prepare
from irdro.shards import DataError, ShardDataset, tokenizer_fingerprint
from irdro.train import check_shards
from irdro_tools import prepare_data

ROOT = Path(__file__).resolve().parents[2]
CHATTERBOT = ROOT / "tests" / "fixtures" / "chatterbot"
EOS = "<|endoftext|>"
# A ChatML-like template in plain text (GPT-2 has no chat tokens): assistant turns end with EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(gpt2_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def chat_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def alpaca_shards(tmp_path_factory, gpt2_tokenizer_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("alpaca") / "shards"
    return out, _run([CHATTERBOT / "alpaca.jsonl"], gpt2_tokenizer_dir, out)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _run(inputs, tok_dir, out, **kw):
    """prepare(); the format defaults to alpaca for inputs named a*.jsonl (alpaca records)."""
    if all(Path(p).name.startswith("a") and Path(p).suffix == ".jsonl" for p in inputs):
        kw.setdefault("format", "alpaca")
    kw.setdefault("seq_len", 128)
    kw.setdefault("progress", False)
    return prepare([str(p) for p in inputs], str(tok_dir), str(out), **kw)


def _supervised_text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.input_ids[sample.labels != -100])


# ----------------------------------------------------------------------------- formats


def test_alpaca_masks_the_prompt(tmp_path, gpt2_tokenizer_dir, tokenizer, alpaca_shards) -> None:
    records = _lines(CHATTERBOT / "alpaca.jsonl")
    assert len(records) == 200
    path, manifest = alpaca_shards
    assert (manifest.format, manifest.long_docs, manifest.has_mask) == (
        "alpaca",
        "truncate",
        True,
    )
    assert manifest.prompt_template["without_input"] == ALPACA_TEMPLATE_NO_INPUT
    ds = ShardDataset(path)
    assert len(ds) == manifest.num_samples == 200 - sum(manifest.num_skipped.values())
    for i in (0, 57, len(ds) - 1):
        s, rec = ds[i], records[ds[i].doc_id]
        prompt = ALPACA_TEMPLATE_NO_INPUT.format(instruction=rec["instruction"])
        assert tokenizer.decode(s.input_ids) == prompt + rec["output"] + EOS
        assert _supervised_text(tokenizer, s) == rec["output"] + EOS
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert (s.labels[:n_prompt] == -100).all() and (s.labels[n_prompt:] != -100).all()

    all_on = _run([CHATTERBOT / "alpaca.jsonl"], gpt2_tokenizer_dir, tmp_path / "b", train_on_prompt=True)
    assert not all_on.has_mask and all_on.train_on_prompt
    assert not list((tmp_path / "b").glob("*.mask.npy"))
    assert all_on.shards[0].sha256["tokens.npy"] == manifest.shards[0].sha256["tokens.npy"]


def test_alpaca_input_section_and_empty_output(tmp_path, gpt2_tokenizer_dir, tokenizer) -> None:
    src = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say nothing", "output": ""},  # only EOS: 1 supervised token
            {"instruction": " ", "input": "", "output": "  "},  # empty
        ],
    )
    manifest = _run([src], gpt2_tokenizer_dir, tmp_path / "out")
    assert manifest.num_samples == 1
    assert manifest.num_skipped == {
        "bad_json": 0,
        "bad_record": 0,
        "empty": 1,
        "too_short": 1,
        "truncated_response": 0,
    }
    s = ShardDataset(tmp_path / "out")[0]
    expected = "### Instruction:\nTranslate\n\n### Input:\nbonjour\n\n### Response:\nhello"
    assert tokenizer.decode(s.input_ids) == expected + EOS


def test_chat_supervises_every_assistant_turn(tmp_path, gpt2_tokenizer_dir, tokenizer, chat_template) -> None:
    records = _lines(CHATTERBOT / "chat.jsonl")
    manifest = _run(
        [CHATTERBOT / "chat.jsonl"],
        gpt2_tokenizer_dir,
        tmp_path / "c",
        format="chat",
        chat_template=str(chat_template),
        seq_len=1024,
    )
    assert manifest.format == "chat" and manifest.has_mask
    assert manifest.chat_template_sha256 == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    ds = ShardDataset(tmp_path / "c")
    assert len(ds) == 200
    # the template travels with the shards: training gives it to a tokenizer that has none
    assert manifest.chat_template == ds.chat_template == CHAT_TEMPLATE
    bare = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    check_shards(bare, {"data.train": ds, "data.eval": None})
    assert bare.chat_template == CHAT_TEMPLATE
    multi = [i for i in range(len(ds)) if len(records[ds[i].doc_id]["messages"]) > 2]
    assert multi  # the fixture has multi-turn conversations
    tokenizer.chat_template = CHAT_TEMPLATE
    for i in [0, 1, *multi]:
        s, msgs = ds[i], records[ds[i].doc_id]["messages"]
        assert tokenizer.decode(s.input_ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
        answers = [m["content"] + EOS for m in msgs if m["role"] == "assistant"]
        assert _supervised_text(tokenizer, s) == "".join(answers)
        # the user turns and the generation prompts are masked
        masked = tokenizer.decode(s.input_ids[s.labels == -100])
        assert masked.startswith("<|user|>\n" + msgs[0]["content"]) and "<|assistant|>" in masked


def test_chat_template_from_the_tokenizer_and_refusals(tmp_path, gpt2_tokenizer_dir, tokenizer) -> None:
    src = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello there"},
                ]
            }
        ],
    )
    with pytest.raises(DataError, match="no chat template; pass --chat-template"):
        _run([src], gpt2_tokenizer_dir, tmp_path / "x", format="chat")
    tok_dir = tmp_path / "tok"
    shutil.copytree(gpt2_tokenizer_dir, tok_dir)
    with_template = AutoTokenizer.from_pretrained(tok_dir)
    with_template.chat_template = CHAT_TEMPLATE
    with_template.save_pretrained(tok_dir)
    manifest = _run([src], tok_dir, tmp_path / "out", format="chat")
    s = ShardDataset(tmp_path / "out")[0]
    assert _supervised_text(tokenizer, s) == "Hello there" + EOS
    # the chat template is recorded on its own; it does not change the tokenizer identity
    assert manifest.tokenizer.hash == tokenizer_fingerprint(tokenizer)
    assert manifest.chat_template_sha256 == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()

    # a template that renders a turn differently once it is not last: refused, naming the line
    unstable = tmp_path / "unstable.jinja"
    unstable.write_text("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}")
    with pytest.raises(DataError, match=rf"{src}:1: chat template failed: .*prefix-stable"):
        _run([src], gpt2_tokenizer_dir, tmp_path / "y", format="chat", chat_template=str(unstable))


# ----------------------------------------------------------------------------- long documents


def test_long_documents_split_or_truncate(tmp_path, gpt2_tokenizer_dir, tokenizer) -> None:
    long_prompt = " ".join(["word"] * 60)
    src = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": long_prompt, "output": "short answer here"},
            {"instruction": "Q", "output": " ".join(["answer"] * 40)},
        ],
    )
    trunc = _run([src], gpt2_tokenizer_dir, tmp_path / "t", seq_len=32)
    # record 0: the prompt alone exceeds 32 tokens, nothing of the response survives
    assert trunc.num_skipped["truncated_response"] == 1
    assert trunc.num_samples == 1 and trunc.num_truncated == 1
    s = ShardDataset(tmp_path / "t")[0]
    assert len(s.input_ids) == 32 and s.doc_id == 1 and (s.labels != -100).sum() >= 2

    split = _run([src], gpt2_tokenizer_dir, tmp_path / "s", seq_len=32, long_docs="split")
    ds = ShardDataset(tmp_path / "s")
    ids = [(ds[i].doc_id, ds[i].chunk_id) for i in range(len(ds))]
    # record 0: prompt-only chunks 0 and 1 are dropped, the chunk with the answer is kept
    assert (0, 0) not in ids and (0, 2) in ids and (1, 0) in ids and (1, 1) in ids
    assert split.num_dropped_chunks >= 2 and split.num_truncated == 0
    for i in range(len(ds)):
        assert len(ds[i].input_ids) <= 32 and (ds[i].labels[1:] != -100).any()


# ----------------------------------------------------------------------------- inputs


def test_parquet_saved_datasets_globs_and_directories(tmp_path, gpt2_tokenizer_dir, alpaca_shards) -> None:
    import datasets

    records = _lines(CHATTERBOT / "alpaca.jsonl")[:30]
    src = tmp_path / "src"
    src.mkdir()
    ds = datasets.Dataset.from_list(records)
    ds.select(range(10)).to_parquet(src / "a.parquet")
    _write_jsonl(src / "b.jsonl", records[10:20])
    datasets.DatasetDict({"train": ds.select(range(20, 30))}).save_to_disk(src / "c_saved")

    manifest = _run([src], gpt2_tokenizer_dir, tmp_path / "dir", format="alpaca")
    assert manifest.num_samples == 30
    first30 = ShardDataset(alpaca_shards[0])
    got = ShardDataset(tmp_path / "dir")
    for i in range(30):  # same records in the same order (sorted: a.parquet, b.jsonl, c_saved)
        np.testing.assert_array_equal(got[i].input_ids, first30[i].input_ids)
        np.testing.assert_array_equal(got[i].labels, first30[i].labels)

    globbed = _run([str(src / "*.parquet"), src / "c_saved"], gpt2_tokenizer_dir, tmp_path / "g", format="alpaca")
    assert globbed.num_samples == 20
    with pytest.raises(DataError, match="splits train, not 'test'; pass --split"):
        _run([src / "c_saved"], gpt2_tokenizer_dir, tmp_path / "h", format="alpaca", split="test")
    (src / "d.txt").write_text("plain")
    with pytest.raises(DataError, match=r"d.txt: a .txt file is plain text; --format alpaca"):
        _run([src], gpt2_tokenizer_dir, tmp_path / "i", format="alpaca")


def test_parallel_tokenisation_writes_identical_shards(tmp_path, gpt2_tokenizer_dir) -> None:
    src = [ROOT / "tests/fixtures/shakespeare/sonnets.jsonl"]
    one = _run(src, gpt2_tokenizer_dir, tmp_path / "one", seq_len=64, num_proc=1)
    two = _run(src, gpt2_tokenizer_dir, tmp_path / "two", seq_len=64, num_proc=2)
    assert one.shards == two.shards and one.num_samples > 154
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no work dirs left


# ----------------------------------------------------------------------------- bad input


def test_malformed_json_fails_with_file_and_line_or_is_skipped(tmp_path, gpt2_tokenizer_dir):
    src = _write_jsonl(
        tmp_path / "t.jsonl",
        [{"text": "fine"}, '{"text": "broken', {"text": "   "}, {"text": "ok"}],
    )
    with pytest.raises(DataError, match=rf"{src}:2: malformed JSON .*--skip-bad"):
        _run([src], gpt2_tokenizer_dir, tmp_path / "out")
    manifest = _run([src], gpt2_tokenizer_dir, tmp_path / "out", skip_bad=True)
    assert manifest.num_skipped["bad_json"] == 1 and manifest.num_skipped["empty"] == 1
    ds = ShardDataset(tmp_path / "out")
    assert [ds[i].doc_id for i in range(len(ds))] == [0, 3]  # doc ids are record indices


def test_alpaca_and_chat_records_missing_a_field(tmp_path, gpt2_tokenizer_dir, chat_template):
    src = _write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "a", "output": "b c"}, {"instruction": "a", "answer": "b"}],
    )
    with pytest.raises(DataError, match=rf"{src}:2: record has no field 'output' \(fields: answer, instruction\)"):
        _run([src], gpt2_tokenizer_dir, tmp_path / "out")
    manifest = _run([src], gpt2_tokenizer_dir, tmp_path / "out", skip_bad=True)
    assert manifest.num_skipped["bad_record"] == 1 and manifest.num_samples == 1

    chat = _write_jsonl(
        tmp_path / "c.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}],
    )
    with pytest.raises(DataError, match=rf"{chat}:1: field 'messages\[1\].content' is missing"):
        _run([chat], gpt2_tokenizer_dir, tmp_path / "c", format="chat", chat_template=str(chat_template))
    with pytest.raises(DataError, match=rf"{chat}:1: .*field 'instruction'"):
        _run([chat], gpt2_tokenizer_dir, tmp_path / "d", format="alpaca")


def test_a_conversation_without_answer_is_dropped_not_nan(tmp_path, gpt2_tokenizer_dir, chat_template) -> None:
    src = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [{"role": "user", "content": "anyone there?"}]},
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            },
        ],
    )
    manifest = _run([src], gpt2_tokenizer_dir, tmp_path / "c", format="chat", chat_template=str(chat_template))
    assert manifest.num_samples == 1 and manifest.num_skipped["too_short"] == 1
    s = ShardDataset(tmp_path / "c")[0]
    assert (s.labels[1:] != -100).sum() >= 1


def test_token_id_that_does_not_fit_leaves_nothing(tmp_path, gpt2_tokenizer_dir, monkeypatch) -> None:
    out = tmp_path / "out"
    src = _write_jsonl(tmp_path / "t.jsonl", [{"text": "Hello world"}])
    _run([src], gpt2_tokenizer_dir, out)
    before = (out / "manifest.json").read_text()
    # a vocabulary bound below GPT-2's ids: the writer must refuse them
    monkeypatch.setattr(irdro.prepare, "vocab_bound", lambda tok: 1000)
    with pytest.raises(DataError, match=rf"{src}:1: .*token id \d+ is outside the vocabulary \[0, 1000\)"):
        _run([src], gpt2_tokenizer_dir, out, overwrite=True)
    assert (out / "manifest.json").read_text() == before  # the old output is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.jsonl"]


def test_vocab_bound_picks_uint32_past_65536(gpt2_tokenizer_dir, tokenizer) -> None:
    from irdro.prepare import vocab_bound

    assert vocab_bound(tokenizer) == 50257
    big = AutoTokenizer.from_pretrained(gpt2_tokenizer_dir)
    big.add_tokens([f"<extra_{i}>" for i in range(65536 - 50257 + 1)])
    assert vocab_bound(big) == 65537  # the writer then stores uint32


# ----------------------------------------------------------------------------- CLI


def test_cli_alpaca_missing_field_exits_2(tmp_path, gpt2_tokenizer_dir, capsys) -> None:
    src = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a"}])
    args = [
        "--format",
        "alpaca",
        "--input",
        str(src),
        "--tokenizer",
        str(gpt2_tokenizer_dir),
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert prepare_data.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}:1: record has no field 'output'") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_cli_chat_with_flags(tmp_path, gpt2_tokenizer_dir, chat_template, capsys) -> None:
    out = tmp_path / "out"
    args = [
        "--format",
        "chat",
        "--input",
        str(CHATTERBOT / "chat.jsonl"),
        "--tokenizer",
        str(gpt2_tokenizer_dir),
        "--output",
        str(out),
        "--chat-template",
        str(chat_template),
        "--seq-len",
        "64",
        "--long-docs",
        "split",
        "--num-proc",
        "2",
        "--no-progress",
    ]
    assert prepare_data.main(args) == 0
    assert f"wrote {out}: 200 docs" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["long_docs"], manifest["seq_len"]) == ("split", 64)
    assert prepare_data.main(["--verify", str(out)]) == 0
