"""The deterministic order in which training reads samples, and their batching.

Owns:
  * the seeded, index-based global sample order (:class:`GlobalOrder`,
    :func:`sample_positions`) that makes resume exact, and its blend over a weighted mixture of
    sources (:class:`BlendOrder` over a :class:`Mixture`: one index space over the sources);
  * batching of samples into padded tensors (:func:`collate`) or into packed rows that keep
    documents apart (:func:`collate_packed`), as the recipe asks (:func:`make_batch`);
  * a rank's micro-batches of an optimizer step (:class:`Batches`).

The shard format and its reader are irdro.shards'; turning input files into shards is
irdro.prepare's.

Must not: call torch.distributed or import deepspeed (rank/world come in as plain ints), read
files other than through irdro.shards, or print.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch

from irdro.shards import IGNORE_INDEX, Sample, ShardDataset

if TYPE_CHECKING:
    from irdro.config import Recipe


def sample_positions(step: int, micro: int, rank: int, dp: int, ga: int, micro_batch_size: int) -> np.ndarray:
    """Global stream positions read by one rank for one micro-batch.

    The global batch of an optimizer step is ``G = dp * ga * B`` consecutive positions; within
    it micro-batch ``micro`` owns a block of ``dp * B`` and rank ``rank`` a block of ``B`` inside
    that. So the step's positions are covered exactly once over (micro, rank), and a fixed
    global batch is independent of how it is split into dp and ga.

    Args:
        step: optimizer step (0-based).
        micro: micro-batch within the step, in [0, ga).
        rank: data-parallel rank, in [0, dp).
        dp: data-parallel world size.
        ga: gradient-accumulation steps.
        micro_batch_size: B, samples per rank per micro-batch.

    Returns:
        (B,) int64 positions ``step*G + micro*dp*B + rank*B + arange(B)``; map them to dataset
        indices with :class:`GlobalOrder`.
    """
    if not (0 <= micro < ga and 0 <= rank < dp and micro_batch_size > 0 and step >= 0):
        raise ValueError(
            f"need step >= 0, 0 <= micro < ga, 0 <= rank < dp, B > 0; got step={step} "
            f"micro={micro} ga={ga} rank={rank} dp={dp} B={micro_batch_size}"
        )
    b = micro_batch_size
    base = step * dp * ga * b + micro * dp * b + rank * b
    return base + np.arange(b, dtype=np.int64)


class GlobalOrder:
    """Deterministic map from global stream position to dataset index, over epochs.

    Position ``p`` is in epoch ``p // N`` and reads ``perm(seed, epoch)[p % N]``, where ``perm``
    is ``np.random.Generator(np.random.PCG64([seed, epoch])).permutation(N)`` (identity when
    shuffle is off). Being a pure function of the position, resuming at a step is exact: no
    sampler state beyond the step counter. The last two epoch permutations are cached.
    """

    _CACHE_SIZE = 2

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, stream: int = 0) -> None:
        """Args:
        num_samples: N, the dataset length (> 0).
        seed: non-negative seed shared by all ranks.
        shuffle: permute each epoch; if False position p reads index p % N.
        stream: which of a mixture's sources this order is for: stream 0 keys its permutations
            PCG64([seed, epoch]) (so a one-source mixture is today's dataset), stream d > 0
            PCG64([seed, epoch, d]).
        """
        if num_samples <= 0:
            raise ValueError(f"GlobalOrder needs num_samples > 0, got {num_samples}")
        if seed < 0:
            raise ValueError(f"GlobalOrder needs a non-negative seed, got {seed}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.stream = int(stream)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        """Map positions to dataset indices.

        Args:
            positions: (...) non-negative integer stream positions.

        Returns:
            (...) int64 dataset indices, same shape as positions.
        """
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and int(pos.min()) < 0:
            raise ValueError("GlobalOrder positions must be non-negative")
        if not self.shuffle:
            return pos % self.num_samples
        epochs, offsets = np.divmod(pos, self.num_samples)
        out = np.empty_like(pos)
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = self.permutation(epoch)[offsets[sel]]
        return out

    def permutation(self, epoch: int) -> np.ndarray:
        """Return the (N,) int64 order of ``epoch`` (cached; treat as read-only)."""
        perm = self._perms.get(epoch)
        if perm is None:
            key = [self.seed, epoch] if self.stream == 0 else [self.seed, epoch, self.stream]
            rng = np.random.Generator(np.random.PCG64(key))
            perm = rng.permutation(self.num_samples).astype(np.int64, copy=False)
            self._perms[epoch] = perm
            while len(self._perms) > self._CACHE_SIZE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm


class BlendOrder:
    """Deterministic map from global stream position to (source, sample) over a weighted mixture.

    Position p goes to a source by earliest-deadline-first over the sources' ideal pick times: the
    k-th pick of source d (0-based) may come at position floor(k / w_d) at the earliest and must come
    before ceil((k + 1) / w_d); among the sources whose next pick is due (released), the one whose
    deadline is nearest (ties: the lower index) takes p (Pfair scheduling on one processor, in place
    of Megatron's "pick the source that lags its share most", which can fall behind by more than one
    sample): after any n positions every source d has floor(w_d n) or ceil(w_d n) picks, so its
    achieved share is within 1/n of w_d in every prefix. The shares are exact rationals (the weights'
    decimal forms), so no rounding can break the bound. With shares u_d / T in lowest common terms,
    the schedule repeats every T positions (after T, every source has exactly u_d picks): a short
    period (`MAX_PERIOD`) is computed once and indexed modulo T, so any position costs O(1).

    The k-th pick of source d reads `GlobalOrder(N_d, seed, shuffle, stream=d)[k]`: its own seeded
    permutation per epoch k // N_d, so a small source repeats (epochs counted by `picks_before`).
    Everything is a pure function of the position (resume needs only the step); the schedule is
    computed once per block of `BLOCK` positions in order, keeping each block's starting counts.
    """

    BLOCK = 1 << 16
    MAX_PERIOD = 1 << 20
    _CACHE_SIZE = 2

    def __init__(self, weights: list[float], lengths: list[int], seed: int, shuffle: bool = True) -> None:
        """Args:
        weights: per source, >= 0, summing to a positive number (normalised here).
        lengths: per source, N_d > 0 samples.
        seed: non-negative seed shared by all ranks.
        shuffle: permute each source per epoch; if False its k-th pick reads k % N_d.
        """
        if len(weights) != len(lengths) or not weights:
            raise ValueError(f"need one weight per source, got {len(weights)} weights for {len(lengths)} sources")
        exact = [Fraction(repr(float(w))) for w in weights]
        if any(w < 0 for w in exact) or sum(exact) <= 0:
            raise ValueError(f"mixture weights must be >= 0 and sum to a positive number, got {weights}")
        scale = math.lcm(*(w.denominator for w in exact))
        units = [int(w * scale) for w in exact]
        common = math.gcd(*units)
        self._units = [u // common for u in units]  # w_d = units_d / total, exactly, in lowest terms
        self._total = sum(self._units)
        self._period: tuple[np.ndarray, np.ndarray] | None = None
        self.shares = np.array([u / self._total for u in self._units], dtype=np.float64)
        self.lengths = [int(n) for n in lengths]
        self.orders = [GlobalOrder(n, seed, shuffle, stream=d) for d, n in enumerate(self.lengths)]
        self._starts: list[list[int]] = [[0] * len(weights)]  # picks per source before each block
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def num_sources(self) -> int:
        return len(self.lengths)

    def _schedule(self, start: int, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(BLOCK,) sources and (BLOCK,) pick numbers of positions [start, start + BLOCK), from the
        picks per source before `start`; `counts` is advanced to the end of the block."""
        units, total = self._units, self._total
        big = float("inf")
        # release = floor(k * total / u), deadline = ceil((k + 1) * total / u) of each next pick k
        release = [(c * total) // u if u else big for c, u in zip(counts, units, strict=True)]
        deadline = [-((-(c + 1) * total) // u) if u else big for c, u in zip(counts, units, strict=True)]
        sources = np.empty(self.BLOCK, dtype=np.int64)
        picks = np.empty(self.BLOCK, dtype=np.int64)
        span = range(len(units))
        for j in range(self.BLOCK):
            t = start + j
            best, due = -1, big
            for d in span:
                if release[d] <= t and deadline[d] < due:
                    best, due = d, deadline[d]
            if best < 0:  # cannot happen: the shares sum to 1, so some pick is always released
                raise RuntimeError(f"irdro bug: no source is due at position {t}")
            c = counts[best]
            sources[j], picks[j] = best, c
            counts[best] = c = c + 1
            release[best] = (c * total) // units[best]
            deadline[best] = -((-(c + 1) * total) // units[best])
        return sources, picks

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._blocks.get(b)
        if hit is not None:
            self._blocks.move_to_end(b)
            return hit
        while len(self._starts) <= b:  # the schedule is sequential: extend the block starts in order
            k = len(self._starts) - 1
            counts = list(self._starts[k])
            self._remember(k, self._schedule(k * self.BLOCK, counts))
            self._starts.append(counts)
        if b not in self._blocks:
            self._remember(b, self._schedule(b * self.BLOCK, list(self._starts[b])))
        return self._blocks[b]

    def _remember(self, b: int, block: tuple[np.ndarray, np.ndarray]) -> None:
        self._blocks[b] = block
        while len(self._blocks) > self._CACHE_SIZE:
            self._blocks.popitem(last=False)

    def _one_period(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Sources and pick numbers of positions [0, T) when T <= MAX_PERIOD, else None."""
        if self._period is None and self._total <= self.MAX_PERIOD:
            block, self.BLOCK = self.BLOCK, self._total
            try:
                self._period = self._schedule(0, [0] * self.num_sources)
            finally:
                self.BLOCK = block
        return self._period

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sources and in-source sample indices of stream positions.

        Args:
            positions: (...) non-negative integer stream positions.

        Returns:
            (...) int64 source index d and (...) int64 sample index within source d.
        """
        pos = np.asarray(positions, dtype=np.int64)
        if pos.size and int(pos.min()) < 0:
            raise ValueError("BlendOrder positions must be non-negative")
        sources, picks = np.empty_like(pos), np.empty_like(pos)
        period = self._one_period()
        if period is not None:
            laps, offsets = np.divmod(pos, self._total)
            sources = period[0][offsets]
            picks = laps * np.asarray(self._units, dtype=np.int64)[sources] + period[1][offsets]
        else:
            blocks, offsets = np.divmod(pos, self.BLOCK)
            for b in np.unique(blocks).tolist():
                sel = blocks == b
                block_sources, block_picks = self._block(b)
                sources[sel], picks[sel] = block_sources[offsets[sel]], block_picks[offsets[sel]]
        index = np.empty_like(pos)
        for d in np.unique(sources).tolist():
            sel = sources == d
            index[sel] = self.orders[d][picks[sel]]
        return sources, index

    def picks_before(self, position: int) -> np.ndarray:
        """(D,) int64 picks of each source at positions [0, position): source d has read
        `picks / N_d` epochs by then."""
        if position < 0:
            raise ValueError("BlendOrder positions must be non-negative")
        period = self._one_period()
        if period is not None:
            laps, offset = divmod(int(position), self._total)
            units = np.asarray(self._units, dtype=np.int64)
            return laps * units + np.bincount(period[0][:offset], minlength=self.num_sources)
        b, offset = divmod(int(position), self.BLOCK)
        block_sources, _ = self._block(b)
        start = np.asarray(self._starts[b], dtype=np.int64)
        return start + np.bincount(block_sources[:offset], minlength=self.num_sources)


class Mixture:
    """A dataset's sources as one index space: sample id `offsets[d] + i` is source d's sample i.

    A plain `data.train` path is a mixture of one source, whose ids are the shard directory's own.

    Attributes:
        names: per source, its name (metrics, errors).
        shares: per source, its target share (weights normalised).
        datasets: per source, its ShardDataset.
        offsets: (D + 1,) int64 first id of each source, then the total.
        named: whether the recipe wrote the sources as a list (then dumps and metrics name them).
    """

    def __init__(
        self, names: list[str], weights: list[float], datasets: list[ShardDataset], named: bool = True
    ) -> None:
        if not (len(names) == len(weights) == len(datasets) >= 1):
            raise ValueError("a mixture needs one name, weight and dataset per source, and at least one source")
        self.names, self.datasets, self.named = list(names), list(datasets), named
        total = float(sum(weights))
        self.weights = [float(w) for w in weights]
        self.shares = np.array([w / total if total > 0 else 0.0 for w in weights], dtype=np.float64)
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_sources(self) -> int:
        return len(self.datasets)

    @property
    def seq_len(self) -> int | None:
        """The longest sources' manifest seq_len (packing capacity); None when one has none."""
        lens = [d.manifest.seq_len for d in self.datasets]
        return None if any(n is None for n in lens) else max(lens)

    def source_of(self, ids: np.ndarray) -> np.ndarray:
        """(...) int64 source index of sample ids."""
        return np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1

    def __getitem__(self, idx: int) -> Sample:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample id {idx} out of range for a mixture of {len(self)} samples")
        d = int(self.source_of(idx))
        sample = self.datasets[d][int(idx - self.offsets[d])]
        return dataclasses.replace(sample, sample_id=int(idx))

    def describe(self, idx: int) -> dict:
        """`ShardDataset.describe` of the sample, plus its `source` name for a named mixture."""
        d = int(self.source_of(idx))
        out: dict = self.datasets[d].describe(int(idx - self.offsets[d]))
        if self.named:
            out["source"] = self.names[d]
        return out

    def verify(self) -> None:
        for d in self.datasets:
            d.verify()

    def order(self, seed: int, shuffle: bool = True) -> BlendOrder:
        """The blended training order of these sources."""
        return BlendOrder(self.weights, [len(d) for d in self.datasets], seed, shuffle)

    def ids_at(self, order: BlendOrder, positions: np.ndarray) -> np.ndarray:
        """(...) int64 sample ids that stream positions read."""
        sources, index = order.locate(positions)
        return self.offsets[sources] + index


def collate(samples: list[Sample], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch.

    Args:
        samples: B samples of lengths L_i.
        pad_id: token id written into padding (never supervised, masked out of attention).
        pad_to_multiple_of: T is max(L_i) rounded up to a multiple of this (1 = no rounding).

    Returns:
        input_ids: (B, T) int64, pad_id on padding.
        labels: (B, T) int64, -100 on padding.
        attention_mask: (B, T) int64, 1 on real tokens.
        sample_ids: (B,) int64.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    longest = max(len(s.input_ids) for s in samples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(samples), width), pad_id, dtype=np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(samples), width), dtype=np.int64)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = s.input_ids
        labels[row, :n] = s.labels
        attention_mask[row, :n] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(attention_mask),
        "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.int64, device="cpu"),  # host side
    }


def packed_row_capacity(seq_len: int, pad_to_multiple_of: int = 8) -> int:
    """Tokens one packed row may hold: ``seq_len`` rounded up to ``pad_to_multiple_of``."""
    if seq_len < 1 or pad_to_multiple_of < 1:
        raise ValueError(f"need seq_len >= 1 and pad_to_multiple_of >= 1, got {seq_len}, {pad_to_multiple_of}")
    return -(-seq_len // pad_to_multiple_of) * pad_to_multiple_of


def collate_packed(
    samples: list[Sample], pad_id: int, seq_len: int, pad_to_multiple_of: int = 8
) -> dict[str, torch.Tensor]:
    """Pack samples first-fit-decreasing into as few rows as fit, keeping them apart.

    Each sample becomes one contiguous segment of a row. Segments never see each other: position
    ids restart at 0 per segment and ``segment_ids`` tell the model side which tokens may attend
    to which (irdro.model builds the block-diagonal mask or the flash-attn varlen layout from
    them). The first token of every segment gets label -100, so the last token of one document is
    never trained to predict the first token of the next; a segment's own first label is never a
    target anyway (labels are unshifted), so per-segment losses equal the unpacked ones.

    The packing is a pure function of the samples (lengths, then position in ``samples`` break
    ties), so every rank and every resume packs a micro-batch identically.

    Args:
        samples: B samples of lengths L_i.
        pad_id: token id written into padding (never supervised, attends only to padding).
        seq_len: row capacity before rounding; normally the manifest's ``seq_len``. A sample
            longer than the capacity gets a row of its own.
        pad_to_multiple_of: capacity and T are rounded up to a multiple of this.

    Returns:
        input_ids: (R, T) int64, pad_id on padding.
        labels: (R, T) int64, -100 on padding and on each segment's first token.
        position_ids: (R, T) int64, 0..L_i-1 within each segment; a row's trailing padding counts
            0, 1, ... as a segment of its own.
        segment_ids: (R, T) int64, index i into ``samples`` of the token's sample, -1 on padding.
        sample_ids: (B,) int64, in the order of ``samples`` (per-sample losses use this order).
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    capacity = packed_row_capacity(seq_len, pad_to_multiple_of)
    lengths = [len(s.input_ids) for s in samples]
    rows: list[list[int]] = []  # sample indices per row, in placement order
    fill: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: (-lengths[i], i)):
        for r in range(len(rows)):
            if fill[r] + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    width = -(-max(fill) // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.full(shape, -1, dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            s, n = samples[i], lengths[i]
            input_ids[r, at : at + n] = s.input_ids
            labels[r, at + 1 : at + n] = s.labels[1:]
            position_ids[r, at : at + n] = np.arange(n)
            segment_ids[r, at : at + n] = i
            at += n
        position_ids[r, at:] = np.arange(width - at)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "sample_ids": torch.tensor([s.sample_id for s in samples], dtype=torch.int64, device="cpu"),  # host side
    }


def shard_sequence(batch: dict[str, torch.Tensor], sp_rank: int, sp_size: int) -> dict[str, torch.Tensor]:
    """This SP rank's slice of a padded batch along the sequence (DeepSpeed Ulysses).

    Labels are shifted over the whole row first, so the target of a shard's last token is the next
    shard's first token; position ids are those of the whole row (Ulysses gathers them back for the
    attention). The attention mask is dropped: Ulysses discards masks and runs causal attention
    over the gathered row, which leaves right padding invisible to the real tokens.

    Args:
        batch: `collate`'s output, T a multiple of `sp_size`.
        sp_rank: this rank's index in its SP group; it gets tokens [k*T/N, (k+1)*T/N).
        sp_size: N, ranks per SP group.

    Returns:
        input_ids, shift_labels (target of each position, -100 if none), position_ids: each
        (B, T/N) int64; sample_ids: (B,) unchanged.
    """
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    if width % sp_size:
        raise ValueError(f"sequence length {width} is not a multiple of sequence_parallel {sp_size}")
    shift_labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    shift_labels[:, :-1] = batch["labels"][:, 1:]
    position_ids = torch.arange(width, dtype=torch.int64, device=input_ids.device).expand(rows, width)
    chunk = slice(sp_rank * width // sp_size, (sp_rank + 1) * width // sp_size)
    return {
        "input_ids": input_ids[:, chunk].contiguous(),
        "shift_labels": shift_labels[:, chunk].contiguous(),
        "position_ids": position_ids[:, chunk].contiguous(),
        "sample_ids": batch["sample_ids"],
    }


def make_batch(
    samples: list[Sample], data: Mixture | ShardDataset, recipe: Recipe, pad_id: int, sp_rank: int = 0
) -> dict:
    """Padded rows (`data.packing: none`) or packed rows of at most the shards' seq_len tokens; with
    `parallel.sequence_parallel` N > 1, padded to a multiple of N too and cut to SP rank `sp_rank`'s
    shard (`shard_sequence`; config.validate refuses packing with N > 1)."""
    multiple, sp = recipe.sequence_multiple, recipe.parallel.sequence_parallel
    if recipe.data.packing == "boundary":
        seq_len = data.seq_len or max(len(s.input_ids) for s in samples)
        return collate_packed(samples, pad_id, int(seq_len), multiple)
    batch = collate(samples, pad_id, multiple)
    return shard_sequence(batch, sp_rank, sp) if sp > 1 else batch


class Batches:
    """This rank's micro-batches of optimizer step s, from the deterministic global order.

    A micro-batch is always B samples (packing changes only how they are laid out in rows), so
    the reweighting window and index-based resume do not depend on `data.packing`.
    """

    def __init__(
        self,
        data: Mixture | ShardDataset,
        recipe: Recipe,
        pad_id: int,
        *,
        dp_rank: int,
        dp_size: int,
        sp_rank: int = 0,
    ) -> None:
        """Args:
        data: the training sources; one shard directory reads as a mixture of one (same order and ids).
        recipe: micro_batch_size, grad_accum_steps, seed, data.shuffle/packing, parallel.
        pad_id: token id of padding.
        dp_rank: this rank's data-parallel rank (irdro.dist.dp_rank()).
        dp_size: the data-parallel world size (irdro.dist.dp_size()).
        sp_rank: this rank's sequence-parallel rank (irdro.dist.sp_rank()): which shard of each
            row it gets; every rank of an SP group reads the same samples.
        """
        if isinstance(data, ShardDataset):
            data = Mixture([data.path.name], [1.0], [data], named=False)
        self.data, self.recipe, self.pad_id = data, recipe, pad_id
        self.dp_rank, self.dp_size, self.sp_rank = dp_rank, dp_size, sp_rank
        self.order = data.order(recipe.seed, shuffle=recipe.data.shuffle)

    def step(self, step: int) -> list[dict[str, torch.Tensor]]:
        """The grad_accum_steps micro-batches of optimizer step ``step`` (0-based) on this rank."""
        r = self.recipe
        out = []
        for micro in range(r.grad_accum_steps):
            pos = sample_positions(step, micro, self.dp_rank, self.dp_size, r.grad_accum_steps, r.micro_batch_size)
            samples = [self.data[int(i)] for i in self.data.ids_at(self.order, pos)]
            out.append(make_batch(samples, self.data, r, self.pad_id, self.sp_rank))
        return out


__all__ = [
    "Batches",
    "BlendOrder",
    "GlobalOrder",
    "Mixture",
    "collate",
    "collate_packed",
    "make_batch",
    "packed_row_capacity",
    "sample_positions",
    "shard_sequence",
]
