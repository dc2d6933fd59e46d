"""Shard format, reader, writer, global order and collate (irdro.data); no tokenizer needed."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_samples, write_shards

from irdro.data import GlobalOrder, collate, collate_packed, sample_positions
from irdro.prepare import SKIP_REASONS, cut_document, is_trainable
from irdro.shards import MANIFEST_NAME, DataError, Sample, ShardDataset, ShardWriter


def _writer(path: Path, **kw) -> ShardWriter:
    args = dict(
        vocab_size=1000,
        tokenizer_name="t",
        tokenizer_hash="h",
        seq_len=64,
        eos_token_id=None,
        pad_token_id=None,
        skip_reasons=SKIP_REASONS,
    )
    return ShardWriter(path, **{**args, **kw})


# ----------------------------------------------------------------------------- round trip


def test_round_trip_over_several_shards(tmp_path: Path) -> None:
    samples = random_samples(60, seed=1)
    chunk_ids = [i % 3 for i in range(60)]
    with _writer(tmp_path / "ds", shard_tokens=200) as w:
        for i, s in enumerate(samples):
            w.add(s, doc_id=i // 3, chunk_id=chunk_ids[i])
        manifest = w.finalize()

    ds = ShardDataset(tmp_path / "ds")
    assert len(ds) == 60 == manifest.num_samples == ds.manifest.num_samples
    assert len(manifest.shards) > 1
    assert all(s.num_tokens <= 200 for s in manifest.shards)
    assert manifest.num_tokens == sum(len(s) for s in samples)
    assert manifest.num_docs == 20
    assert manifest.dtype == "uint16"
    for i, s in enumerate(samples):
        got = ds[i]
        assert got.sample_id == i
        assert got.input_ids.dtype == np.int64 and got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.input_ids, s)
        np.testing.assert_array_equal(got.labels, s)
        assert (got.doc_id, got.chunk_id) == (i // 3, chunk_ids[i])
    assert ds[-1].sample_id == 59
    with pytest.raises(IndexError):
        ds[60]
    ds.verify()


@pytest.mark.parametrize(("vocab_size", "dtype", "top_id"), [(65536, "uint16", 65535), (65537, "uint32", 65536)])
def test_dtype_follows_vocab_size(tmp_path: Path, vocab_size: int, dtype: str, top_id: int) -> None:
    write_shards(tmp_path / "ds", [[0, top_id, 7]], vocab_size=vocab_size)
    ds = ShardDataset(tmp_path / "ds")
    assert ds.manifest.dtype == dtype
    assert np.load(tmp_path / "ds" / "shard_00000.tokens.npy").dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ds[0].input_ids, [0, top_id, 7])


def test_mask_read_path(tmp_path: Path) -> None:
    # lengths not multiples of 8, so masks straddle packed bytes
    samples = [np.arange(5), np.arange(11), np.arange(3), np.arange(13)]
    masks = [
        np.array([0, 0, 1, 1, 1], bool),
        None,
        np.array([1, 0, 1], bool),
        np.arange(13) % 3 == 0,
    ]
    write_shards(tmp_path / "ds", samples, masks=masks)
    ds = ShardDataset(tmp_path / "ds")
    assert "mask.npy" in ds.manifest.shards[0].sha256
    for i, (s, m) in enumerate(zip(samples, masks, strict=True)):
        expected = s if m is None else np.where(m, s, -100)
        np.testing.assert_array_equal(ds[i].labels, expected)
        np.testing.assert_array_equal(ds[i].input_ids, s)
    ds.verify()


def test_no_mask_file_means_all_supervised(tmp_path: Path) -> None:
    write_shards(tmp_path / "ds", [[1, 2, 3]])
    assert not (tmp_path / "ds" / "shard_00000.mask.npy").exists()
    np.testing.assert_array_equal(ShardDataset(tmp_path / "ds")[0].labels, [1, 2, 3])


def test_empty_dataset_round_trip(tmp_path: Path) -> None:
    manifest = _writer(tmp_path / "ds").finalize()
    assert manifest.num_samples == 0 and manifest.shards == []
    assert len(ShardDataset(tmp_path / "ds")) == 0


def test_pickle_does_not_copy_the_data(tmp_path: Path) -> None:
    write_shards(tmp_path / "ds", random_samples(200, max_len=200))
    ds = ShardDataset(tmp_path / "ds")
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000
    np.testing.assert_array_equal(pickle.loads(blob)[123].input_ids, ds[123].input_ids)


# ----------------------------------------------------------------------------- integrity


def test_verify_detects_a_corrupted_shard(tmp_path: Path) -> None:
    write_shards(tmp_path / "ds", random_samples(10))
    tokens = tmp_path / "ds" / "shard_00000.tokens.npy"
    raw = bytearray(tokens.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    tokens.write_bytes(bytes(raw))
    ds = ShardDataset(tmp_path / "ds")  # opening only checks sizes
    with pytest.raises(DataError, match="shard_00000.tokens.npy.*sha256"):
        ds.verify()


def test_truncated_shard_is_refused_on_open(tmp_path: Path) -> None:
    write_shards(tmp_path / "ds", random_samples(10))
    tokens = tmp_path / "ds" / "shard_00000.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-4])
    with pytest.raises(DataError, match="shard_00000.tokens.npy"):
        ShardDataset(tmp_path / "ds")


def test_missing_dataset_points_to_prepare_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="prepare_data.py"):
        ShardDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"manifest.json.*prepare_data.py"):
        ShardDataset(tmp_path / "empty")


def test_split_parent_dir_names_the_split(tmp_path: Path) -> None:
    write_shards(tmp_path / "ds" / "train", [[1, 2]])
    with pytest.raises(DataError, match=r"ds/train"):
        ShardDataset(tmp_path / "ds")


def test_missing_shard_file_and_bad_version(tmp_path: Path) -> None:
    write_shards(tmp_path / "ds", [[1, 2]])
    index = tmp_path / "ds" / "shard_00000.index.npy"
    saved = index.read_bytes()
    index.unlink()
    with pytest.raises(DataError, match="shard_00000.index.npy is missing"):
        ShardDataset(tmp_path / "ds")
    index.write_bytes(saved)
    manifest_file = tmp_path / "ds" / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    manifest["format_version"] = 2
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format_version 2"):
        ShardDataset(tmp_path / "ds")


def test_out_of_range_token_id(tmp_path: Path) -> None:
    with _writer(tmp_path / "ds", vocab_size=100) as w:
        with pytest.raises(DataError, match=r"token id 100 is outside the vocabulary \[0, 100\)"):
            w.add([1, 100], doc_id=0, chunk_id=0)
        with pytest.raises(DataError, match="token id -1"):
            w.add(np.array([-1, 5]), doc_id=0, chunk_id=0)


# ----------------------------------------------------------------------------- output handling


def test_non_empty_output_refused_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty.*--overwrite"):
        _writer(out)
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_overwrite_keeps_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_shards(out, [[1, 2, 3]])
    with pytest.raises(RuntimeError, match="boom"):
        with _writer(out, overwrite=True) as w:
            w.add([4, 5, 6, 7], doc_id=0, chunk_id=0)
            raise RuntimeError("boom")
    np.testing.assert_array_equal(ShardDataset(out)[0].input_ids, [1, 2, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind

    write_shards(out, [[4, 5, 6, 7]], overwrite=True)
    np.testing.assert_array_equal(ShardDataset(out)[0].input_ids, [4, 5, 6, 7])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unfinalized_writer_leaves_nothing(tmp_path: Path) -> None:
    with _writer(tmp_path / "out") as w:
        w.add([1, 2], doc_id=0, chunk_id=0)
    assert list(tmp_path.iterdir()) == []


def test_skip_counts(tmp_path: Path) -> None:
    with _writer(tmp_path / "out") as w:
        w.add([1, 2], doc_id=0, chunk_id=0)
        w.skip("empty")
        w.skip("empty")
        w.skip("odd")
        manifest = w.finalize()
    assert manifest.num_skipped == {
        "bad_json": 0,
        "bad_record": 0,
        "empty": 2,
        "too_short": 0,
        "truncated_response": 0,
        "odd": 1,
    }


def test_meta_and_counters_land_in_the_manifest(tmp_path: Path) -> None:
    with _writer(tmp_path / "out", meta={"long_docs": "split"}) as w:
        w.add([1, 2], doc_id=0, chunk_id=0, mask=np.array([False, True]))
        w.count("num_truncated")
        w.count("num_truncated", 2)
        manifest = w.finalize()
    assert (manifest.long_docs, manifest.num_truncated, manifest.has_mask) == (
        "split",
        3,
        True,
    )
    assert ShardDataset(tmp_path / "out").manifest == manifest
    with pytest.raises(ValueError, match="shadow"):
        _writer(tmp_path / "other", meta={"dtype": "x"})


# ----------------------------------------------------------------------------- long documents


@pytest.mark.parametrize(
    ("length", "lengths"),
    [(0, []), (1, []), (2, [2]), (4, [4]), (5, [4]), (6, [4, 2]), (8, [4, 4]), (9, [4, 4])],
)
def test_split_text_documents(length: int, lengths: list[int]) -> None:
    tokens = np.arange(length)
    cut = cut_document(tokens, None, seq_len=4, long_docs="split")
    assert [len(c) for _, c, _ in cut.samples] == lengths
    assert [i for i, _, _ in cut.samples] == list(range(len(lengths)))
    assert cut.skipped == (None if lengths else "too_short")
    assert cut.num_dropped_chunks == (length > 4 and length % 4 == 1)  # a 1-token tail
    if lengths:
        np.testing.assert_array_equal(np.concatenate([c for _, c, _ in cut.samples]), tokens[: sum(lengths)])


def test_truncate_keeps_the_head() -> None:
    cut = cut_document(np.arange(10), None, seq_len=4, long_docs="truncate")
    assert cut.truncated and cut.skipped is None
    assert [c.tolist() for _, c, _ in cut.samples] == [[0, 1, 2, 3]]


def test_masked_documents_drop_unsupervised_chunks_and_truncated_responses() -> None:
    # 6 prompt tokens, 3 response tokens
    mask = np.array([0] * 6 + [1] * 3, dtype=bool)
    tokens = np.arange(9)
    split = cut_document(tokens, mask, seq_len=4, long_docs="split")
    # chunks [0..3] (no supervision) dropped, [4..7] has 2 supervised, [8] has 1: dropped
    assert [(i, c.tolist()) for i, c, _ in split.samples] == [(1, [4, 5, 6, 7])]
    assert split.num_dropped_chunks == 2
    trunc = cut_document(tokens, mask, seq_len=6, long_docs="truncate")
    assert (trunc.samples, trunc.skipped) == ([], "truncated_response")
    partial = cut_document(tokens, mask, seq_len=8, long_docs="truncate")
    assert partial.truncated and [m.tolist() for _, _, m in partial.samples] == [[False] * 6 + [True] * 2]
    one = np.array([0, 0, 1], dtype=bool)  # a 1-token response (e.g. only EOS)
    assert cut_document(np.arange(3), one, seq_len=8, long_docs="split").skipped == "too_short"


def test_is_trainable_needs_a_supervised_target() -> None:
    assert is_trainable(2, None) and not is_trainable(1, None)
    assert not is_trainable(3, np.array([1, 0, 0], dtype=bool))
    assert is_trainable(3, np.array([1, 1, 0], dtype=bool))  # 2 supervised, 1 a target
    assert is_trainable(3, np.array([0, 1, 1], dtype=bool))


# ----------------------------------------------------------------------------- global order


def test_global_order_is_a_fresh_permutation_each_epoch() -> None:
    n = 37
    order = GlobalOrder(n, seed=3)
    epochs = [order[np.arange(e * n, (e + 1) * n)] for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    rng = np.random.Generator(np.random.PCG64([3, 1]))
    np.testing.assert_array_equal(epochs[1], rng.permutation(n))


def test_global_order_is_deterministic_and_stateless() -> None:
    positions = np.array([5, 1000, 3, 77, 999, 0, 5])
    a = GlobalOrder(100, seed=7)[positions]
    # a fresh instance reading in another order (as after a resume) agrees
    b = GlobalOrder(100, seed=7)
    np.testing.assert_array_equal(b[positions[::-1]][::-1], a)
    assert b[positions].dtype == np.int64
    everything = np.arange(100)
    assert not np.array_equal(GlobalOrder(100, seed=8)[everything], b[everything])


def test_global_order_without_shuffle_is_identity() -> None:
    np.testing.assert_array_equal(GlobalOrder(4, seed=0, shuffle=False)[np.arange(10)], np.arange(10) % 4)


# ----------------------------------------------------------------------------- positions


@pytest.mark.parametrize(("dp", "ga", "b"), [(1, 1, 3), (2, 3, 4), (4, 2, 1)])
def test_sample_positions_cover_a_step_exactly_once(dp: int, ga: int, b: int) -> None:
    step = 5
    g = dp * ga * b
    got = np.concatenate([sample_positions(step, m, r, dp, ga, b) for m in range(ga) for r in range(dp)])
    assert got.dtype == np.int64
    np.testing.assert_array_equal(np.sort(got), np.arange(step * g, (step + 1) * g))


def test_sample_positions_step_batch_independent_of_dp_ga_split() -> None:
    def step_set(dp: int, ga: int, b: int) -> set[int]:
        pos = [sample_positions(2, m, r, dp, ga, b) for m in range(ga) for r in range(dp)]
        return set(np.concatenate(pos).tolist())

    assert step_set(1, 4, 2) == step_set(2, 2, 2) == step_set(4, 1, 2) == step_set(2, 1, 4)


def test_sample_positions_rejects_bad_rank() -> None:
    with pytest.raises(ValueError):
        sample_positions(0, 0, 2, 2, 1, 1)


# ----------------------------------------------------------------------------- collate


def _sample(i: int, ids: list[int], labels: list[int] | None = None) -> Sample:
    arr = np.array(ids, dtype=np.int64)
    lab = arr.copy() if labels is None else np.array(labels, dtype=np.int64)
    return Sample(sample_id=i, input_ids=arr, labels=lab, doc_id=i, chunk_id=0)


def test_collate_pads_right_to_multiple() -> None:
    batch = collate([_sample(10, [1, 2, 3]), _sample(11, [4, 5, 6, 7, 8], [-100, -100, 6, 7, 8])], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "sample_ids"}
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [1, 2, 3] + [-100] * 5
    assert batch["labels"][1].tolist() == [-100, -100, 6, 7, 8, -100, -100, -100]
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3]
    assert batch["sample_ids"].tolist() == [10, 11]


def test_collate_without_rounding_and_custom_pad() -> None:
    batch = collate([_sample(0, [1, 2]), _sample(1, [3, 4, 5])], pad_id=99, pad_to_multiple_of=1)
    assert batch["input_ids"].tolist() == [[1, 2, 99], [3, 4, 5]]
    assert batch["labels"].tolist() == [[1, 2, -100], [3, 4, 5]]


def test_collate_reads_dataset_samples(tmp_path: Path) -> None:
    write_shards(tmp_path / "ds", [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], masks=[None, np.arange(9) > 4])
    ds = ShardDataset(tmp_path / "ds")
    batch = collate([ds[1], ds[0]], pad_id=0)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["labels"][0, :9].tolist() == [-100] * 5 + [9, 10, 11, 12]
    assert batch["sample_ids"].tolist() == [1, 0]


# ----------------------------------------------------------------------------- packing


def _packed(lengths: list[int], seq_len: int, multiple: int = 1, masks=None) -> tuple:
    samples = [
        _sample(100 + i, list(range(10 * i + 1, 10 * i + 1 + n)), None if masks is None else masks[i])
        for i, n in enumerate(lengths)
    ]
    return samples, collate_packed(samples, pad_id=0, seq_len=seq_len, pad_to_multiple_of=multiple)


def test_collate_packed_first_fit_decreasing() -> None:
    samples, batch = _packed([3, 5, 2, 4], seq_len=8)
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids", "sample_ids"}
    assert all(t.dtype == torch.int64 for t in batch.values())
    # decreasing: 5 -> row0, 4 -> row1, 3 -> row0 (5+3=8), 2 -> row1 (4+2=6)
    assert batch["segment_ids"].tolist() == [[1] * 5 + [0] * 3, [3] * 4 + [2] * 2 + [-1] * 2]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 0, 1],
    ]
    assert batch["sample_ids"].tolist() == [100, 101, 102, 103]  # input order, not packing order
    ids, seg = batch["input_ids"], batch["segment_ids"]
    for i, s in enumerate(samples):  # every sample's tokens appear as one contiguous segment
        assert ids[seg == i].tolist() == s.input_ids.tolist()
    assert ids[seg == -1].tolist() == [0, 0]


def test_collate_packed_never_supervises_across_documents() -> None:
    masks = [None, [-100, -100, 23, 24]]
    _, batch = _packed([2, 4], seq_len=6, masks=masks)
    # row: sample 1 (4 tokens) then sample 0 (2 tokens)
    assert batch["labels"].tolist() == [[-100, -100, 23, 24, -100, 2]]
    # each segment's first label is -100: the target of the previous segment's last token


def test_collate_packed_rounds_width_and_capacity() -> None:
    _, batch = _packed([5, 5, 5], seq_len=10, multiple=8)
    # capacity 16 (10 rounded up to 8): 5+5+5 = 15 fit one row, width 16
    assert batch["input_ids"].shape == (1, 16)
    _, batch = _packed([5, 5, 5], seq_len=10, multiple=1)
    assert batch["input_ids"].shape == (2, 10)


def test_collate_packed_oversized_sample_gets_its_own_row() -> None:
    _, batch = _packed([12, 3], seq_len=8)
    assert batch["input_ids"].shape == (2, 12)
    assert batch["segment_ids"][1].tolist() == [1] * 3 + [-1] * 9
    with pytest.raises(ValueError):
        collate_packed([], pad_id=0, seq_len=8)
