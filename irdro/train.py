"""The training loop: `deepspeed --module irdro.train RECIPE [a.b=value ...]`.

Reads top to bottom: seed -> data -> model -> engine -> loop (step, log, eval, checkpoint) -> save.
Owns: the order of operations in a step. Must not: call torch.distributed (irdro.dist does), do
weight math (irdro.reweight) or decide the loss scaling (irdro.normalize).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from irdro import __version__, dist
from irdro.checkpoint import CheckpointError, ResumePoint, find_resume, one_line, prepare_elastic, tag_for
from irdro.checkpoint import load as load_checkpoint
from irdro.checkpoint import save as save_checkpoint
from irdro.config import (
    ConfigError,
    Recipe,
    add_recipe_arguments,
    check_parallel_shapes,
    dump_yaml,
    load_recipe,
    resolve_ds_config,
    resolve_path,
    validate,
)
from irdro.data import Batches, Mixture, make_batch
from irdro.engine import exit_rank, gradients_divided_by, init_distributed, initialize, shutdown_distributed
from irdro.faults import EXIT_RANK_FAILURE, EXIT_REQUEUE, Preempted, RankFailure, StopSignals
from irdro.fsio import atomic_write_text, staged_dir
from irdro.metrics import RankZeroLogger
from irdro.model import (
    enable_sequence_parallel,
    load_model,
    load_tokenizer,
    packed_forward,
    packed_sample_nll,
    per_sample_nll,
    sharded_sample_nll,
)
from irdro.normalize import (
    DeferredWindow,
    Reference,
    Sources,
    Window,
    backward_scale,
    defers_normaliser,
    reweight_window,
)
from irdro.paths import check_local_paths
from irdro.rundir import RunDir
from irdro.scores import read_reference_table
from irdro.shards import DataError, ShardDataset, ShardMismatch, check_compatible

log = logging.getLogger("irdro.train")

# Test-only hook: (step, micro, local per-sample losses) -> losses used for weighting/backward.
LossHook = Callable[[int, int, Tensor], Tensor]


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (too many consecutive non-finite steps); `main` exits 3."""


@dataclass
class TrainResult:
    engine: object
    steps: int
    records: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class StepStats:
    """What `train_step` measured on this rank; all but `local_tokens` and `windows.coeffs` are
    identical on every rank.

    Attributes:
        loss: mean over the step's windows of the plain mean per-sample loss.
        weighted_loss: mean over the windows of sum_i p_i l_i; NaN when a loss was non-finite.
        ess: mean over the windows of 1 / sum_i p_i^2 as a fraction of the window; NaN likewise.
        max_weight: the largest weight of any window; NaN likewise.
        skipped: 1 when DeepSpeed did not apply the step (a non-finite loss on some rank), else 0.
        local_tokens: supervised tokens this rank trained on (the loop all-reduces them).
        windows: the step's windows: one per micro-batch (`window: micro`) or one (`step`).
        scoring_pass: 1 when the step ran a no-grad scoring pass (window `step` not deferred, or a
            deferred step that overflowed and was scored), else 0.
        mean_excess: mean over the windows of the plain mean of l_i - r_i (signal `excess`), else None.
    """

    loss: float
    weighted_loss: float
    ess: float
    max_weight: float
    skipped: int
    local_tokens: int
    windows: list[Window]
    scoring_pass: int = 0
    mean_excess: float | None = None

    @classmethod
    def of(cls, windows: list[Window], skipped: bool, local_tokens: int, scoring_pass: bool = False) -> StepStats:
        """The statistics of a step's windows; the weight statistics are NaN unless all are finite."""
        finite = all(w.finite for w in windows)

        def if_finite(x: float) -> float:
            return float(x) if finite else math.nan

        return cls(
            loss=float(np.mean([w.mean_loss for w in windows])),
            weighted_loss=if_finite(np.mean([w.weighted_loss for w in windows])),
            ess=if_finite(np.mean([w.ess for w in windows])),
            max_weight=if_finite(max(w.max_weight for w in windows)),
            skipped=int(skipped),
            local_tokens=local_tokens,
            windows=windows,
            scoring_pass=int(scoring_pass),
            mean_excess=None if windows[0].mean_excess is None else float(np.mean([w.mean_excess for w in windows])),
        )

    def source_metrics(self, names: list[str], alpha: Tensor | None = None) -> dict[str, float | None]:
        """Per source NAME of the mixture: `source/NAME/loss` (plain mean of its samples' losses in
        the step; None when it had none), `weight_share` (sum of its p_i, averaged over the windows,
        as weighted_loss is) and `sample_share` (its samples over the step's); `alpha`, the
        `group_dro` weights after the step, when given. Needs windows labelled with sources. A step
        with a non-finite loss logs weight shares of None (its weighted_loss is NaN) and each source's
        mean over its finite losses."""
        out: dict[str, float | None] = {}
        num = len(names)
        sources = torch.cat([w.sources.cpu() for w in self.windows])
        losses = torch.cat([w.losses.cpu() for w in self.windows]).double()
        counts = torch.bincount(sources, minlength=num).double()
        ok = torch.isfinite(losses)
        scored = torch.bincount(sources[ok], minlength=num).double()
        loss_sums = torch.zeros(num, dtype=torch.float64, device="cpu").index_add_(0, sources[ok], losses[ok])
        shares = torch.stack(
            [
                torch.zeros(num, dtype=torch.float64, device="cpu").index_add_(
                    0, w.sources.cpu(), w.weights.cpu().double()
                )
                for w in self.windows
            ]
        ).mean(0)
        finite = all(w.finite for w in self.windows)
        for d, name in enumerate(names):
            n, m = float(counts[d]), float(scored[d])
            out[f"source/{name}/loss"] = float(loss_sums[d] / m) if m else None
            out[f"source/{name}/weight_share"] = float(shares[d]) if finite else None
            out[f"source/{name}/sample_share"] = n / float(counts.sum())
            if alpha is not None:
                out[f"source/{name}/alpha"] = float(alpha[d])
        return out

    def metrics(self) -> dict[str, float | int]:
        """The step's own metrics.jsonl fields (`mean_excess` with signal `excess` only)."""
        return {
            "loss": self.loss,
            "weighted_loss": self.weighted_loss,
            "ess": self.ess,
            "max_weight": self.max_weight,
            "skipped": self.skipped,
            "scoring_pass": self.scoring_pass,
            **({} if self.mean_excess is None else {"mean_excess": self.mean_excess}),
        }


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical model init and any sampling stays in lock-step."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def forward_losses(engine, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(B,) fp32 per-sample mean NLL and (B,) supervised-token counts of one micro-batch, in the
    order of `batch["sample_ids"]`; packed batches (they carry `segment_ids`) get one loss per
    document segment; sequence-parallel shards (they carry `shift_labels`) the loss of the whole row."""
    if "shift_labels" in batch:
        logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        return sharded_sample_nll(logits, batch["shift_labels"])
    if "segment_ids" in batch:
        logits = packed_forward(engine, batch)
        return packed_sample_nll(logits, batch["labels"], batch["segment_ids"], batch["sample_ids"].numel())
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_nll(logits, batch["labels"])


def rng_state_of(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator's state and, on an accelerator, `device`'s generator state (dropout)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state_of(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_step(
    engine,
    micro_batches: list[dict[str, Tensor]],
    recipe: Recipe,
    step: int,
    loss_hook: LossHook | None = None,
    reference: Reference | None = None,
    sources: Sources | None = None,
) -> StepStats:
    """One optimizer step: weights per window, `DP (x GA) * sum p_i l_i` backward, engine.step().
    Window `step` defers the normaliser where the scheme allows (`irdro.normalize.defers_normaliser`)
    and otherwise, or after an overflow of the deferred exponents, scores the step first.
    `reference`: the reference losses of signal `excess` (`reference_losses`), else None.
    `sources`: the training mixture (labels each window's samples; `group_dro`'s state), else None."""
    if not engine.module.training:  # dropout and gradient checkpointing depend on it
        raise RuntimeError("irdro bug: train_step called with the model in eval mode")
    device = engine.device

    def losses_of(m: int, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        losses, counts = forward_losses(engine, batch)
        return (loss_hook(step, m, losses) if loss_hook else losses), counts

    batches = [{k: v.to(device) for k, v in b.items()} for b in micro_batches]
    alpha = None if sources is None else sources.alpha
    stats = weighted_step(engine, batches, recipe, step, losses_of, reference, sources)
    if stats.skipped and sources is not None:  # the model did not move: neither does group_dro's alpha
        sources.alpha = alpha
    return stats


def weighted_step(
    engine,
    batches: list[dict[str, Tensor]],
    recipe: Recipe,
    step: int,
    losses_of,
    reference: Reference | None,
    sources: Sources | None,
) -> StepStats:
    """`deferred_step` where the step allows it (else, or after an overflow, `scored_step`)."""
    device = engine.device
    if defers_normaliser(recipe.reweight, step):
        rng = rng_state_of(device)
        stats = deferred_step(engine, batches, recipe, step, losses_of, reference, sources)
        if stats is not None:
            return stats
        set_rng_state_of(device, rng)  # the scored retry replays the discarded attempt's dropout masks
    return scored_step(engine, batches, recipe, step, losses_of, reference, sources)


def deferred_step(
    engine,
    batches: list[dict[str, Tensor]],
    recipe: Recipe,
    step: int,
    losses_of,
    reference: Reference | None,
    sources: Sources | None = None,
) -> StepStats | None:
    """The `step` window without a scoring pass (`irdro.normalize.DeferredWindow`). Returns None
    when a micro-batch overflowed: its NaN backward made DeepSpeed discard the step's gradient (on
    every rank: the overflow is decided on gathered losses), and the caller scores the step."""
    scale = backward_scale("step", dist.dp_size(), recipe.grad_accum_steps)
    win = DeferredWindow(recipe.reweight, step, scale, reference, sources)
    tokens = 0
    for m, batch in enumerate(batches):
        losses, counts = losses_of(m, batch)
        coeffs = win.add(losses, counts.gt(0), batch["sample_ids"])
        # None (non-finite or overflow): NaN gradients make every rank's DeepSpeed discard the step
        engine.backward((coeffs * losses).sum() if coeffs is not None else losses.sum() * math.nan)
        with gradients_divided_by(engine, win.divisor if m == len(batches) - 1 else 1.0):
            engine.step()
        tokens += int(counts.sum())
    if win.overflow and win.finite:
        return None
    return StepStats.of([win.window()], skipped=not engine.was_step_applied(), local_tokens=tokens)


def scored_step(
    engine,
    batches: list[dict[str, Tensor]],
    recipe: Recipe,
    step: int,
    losses_of,
    reference: Reference | None,
    sources: Sources | None = None,
) -> StepStats:
    """Window `micro`, or `step` with a no-grad scoring pass over the step's micro-batches before
    the first backward (the grad forward replays each one's RNG state: same dropout masks)."""
    cfg, ga, device = recipe.reweight, recipe.grad_accum_steps, engine.device
    scale = backward_scale(cfg.window, dist.dp_size(), ga)
    windows: list[Window] = []
    rng: list[tuple[Tensor, Tensor | None]] = []
    if cfg.window == "step":  # scoring pass: the whole step's losses before the first backward
        with torch.no_grad():
            scored = []
            for m, b in enumerate(batches):
                rng.append(rng_state_of(device))  # the grad forward replays it: same dropout masks
                scored.append(losses_of(m, b))
        windows.append(
            reweight_window(
                torch.stack([x[0] for x in scored]),
                torch.stack([x[1].gt(0) for x in scored]),
                torch.stack([b["sample_ids"] for b in batches]),
                cfg,
                step,
                scale,
                reference,
                sources,
            )
        )
    tokens = 0
    for m, batch in enumerate(batches):
        if rng:
            set_rng_state_of(device, rng[m])
        losses, counts = losses_of(m, batch)
        if cfg.window == "micro":
            valid = counts.gt(0)
            windows.append(
                reweight_window(
                    losses[None], valid[None], batch["sample_ids"][None], cfg, step, scale, reference, sources
                )
            )
        win = windows[-1]
        coeffs = win.coeffs[0 if cfg.window == "micro" else m]
        if win.finite:
            loss = (coeffs * losses).sum()
        else:  # NaN gradients make every rank's DeepSpeed discard the step (counted as skipped)
            loss = losses.sum() * math.nan
        engine.backward(loss)
        engine.step()
        tokens += int(counts.sum())
    skipped = not engine.was_step_applied()
    return StepStats.of(windows, skipped=skipped, local_tokens=tokens, scoring_pass=cfg.window == "step")


@torch.no_grad()
def evaluate(engine, data: Mixture, recipe: Recipe, pad_id: int) -> dict:
    """Token-weighted held-out NLL over the first `eval.max_samples` samples of each source: the same
    set whatever the number of ranks. `eval_loss`/`eval_ppl` pool every source's tokens; a named
    mixture (`data.eval` written as a list) adds `eval_source/NAME/loss` and `.../ppl`. Every rank
    runs the same number of forwards (short ranks repeat a sample with zero weight). Leaves the
    model in train mode."""
    bsz = recipe.eval.micro_batch_size or recipe.micro_batch_size
    dp, rank, device = dist.dp_size(), dist.dp_rank(), engine.device
    engine.eval()
    nll = torch.zeros(data.num_sources, 2, dtype=torch.float64, device=device)  # [sum NLL, tokens] per source
    for d, first in enumerate(data.offsets[:-1].tolist()):
        n = min(len(data.datasets[d]), recipe.eval.max_samples)
        for j in range(math.ceil(n / (bsz * dp))):
            idx = [j * bsz * dp + rank * bsz + i for i in range(bsz)]
            keep = torch.tensor([i < n for i in idx], dtype=torch.float64, device=device)
            batch = make_batch([data[first + min(i, n - 1)] for i in idx], data, recipe, pad_id, dist.sp_rank())
            losses, counts = forward_losses(engine, {k: v.to(device) for k, v in batch.items()})
            weight = counts.to(torch.float64) * keep
            nll[d] += torch.stack([(losses.double() * weight).sum(), weight.sum()])
    engine.train()
    total = dist.all_reduce_sum(nll)
    out = perplexity("eval", total.sum(0))
    if data.named:
        for d, name in enumerate(data.names):
            out.update(perplexity(f"eval_source/{name}/", total[d]))
    return out


def perplexity(prefix: str, nll_tokens: Tensor) -> dict[str, float]:
    """`{prefix}loss` (token-weighted mean NLL) and `{prefix}ppl` from a [sum NLL, tokens] pair
    (`eval` gets `eval_loss`, `eval_ppl`)."""
    loss = float(nll_tokens[0] / nll_tokens[1].clamp(min=1))
    sep = "" if prefix.endswith("/") else "_"
    return {f"{prefix}{sep}loss": loss, f"{prefix}{sep}ppl": math.exp(min(loss, 50.0))}


def check_shards(tokenizer, shards: dict[str, ShardDataset | None], model_vocab: int | None = None) -> None:
    """`irdro.shards.check_compatible` as a recipe error: the shards must come from the model's
    tokenizer (and chat template, which a tokenizer without one adopts) and fit its vocabulary.

    Args:
        tokenizer: the recipe's tokenizer (model.tokenizer, else model.path); may be modified.
        shards: recipe key (``data.train``, ``data.eval``) -> its dataset, or None when unset.
        model_vocab: the model's vocabulary size; None skips that check.
    """
    try:
        adopted = check_compatible(tokenizer, shards, model_vocab=model_vocab)
    except ShardMismatch as e:
        raise ConfigError(str(e)) from None
    if adopted is not None:
        log.info(
            "tokenizer %s has no chat template: using %s's (sha256 %s), which hf/ and exports carry",
            tokenizer.name_or_path,
            adopted,
            str(shards[adopted].chat_template_sha256)[:12],
        )


def write_run_files(recipe: Recipe, ds_config: dict, model, tokenizer) -> None:
    """recipe.yaml (resolved), ds_config.json and hf/ (the model config, generation config and
    tokenizer that tools/convert_to_hf.py exports with), each written atomically."""
    if not dist.is_main():
        return
    run = RunDir(recipe.output_dir)
    atomic_write_text(run.recipe, dump_yaml(recipe))
    atomic_write_text(run.ds_config, json.dumps(ds_config, indent=2))
    # hf/ is built beside itself and renamed into place; the old one goes only afterwards.
    with staged_dir(run.hf, overwrite=True) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if recipe.model.path is not None:  # the base model's licence travels with every export
            for name in (
                "LICENSE",
                "LICENSE.txt",
                "LICENSE.md",
                "NOTICE",
                "SOURCE.txt",
                "SOURCE.json",
            ):
                src = resolve_path(recipe.model.path) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)


@dataclass
class Setup:
    engine: object
    train_data: Mixture
    eval_data: Mixture | None
    pad_id: int
    start_step: int
    reference: Tensor | None = None
    sources: Sources | None = None


def open_data(recipe: Recipe, split: str) -> Mixture | None:
    """`data.train` or `data.eval` as a Mixture (a plain path: one source), or None when unset.

    Raises:
        irdro.shards.DataError: a source's shards cannot be opened (or verified); names the source.
    """
    labelled = recipe.data.labelled_sources(split)
    if not labelled:
        return None
    datasets = []
    for label, source in labelled:
        try:
            data = ShardDataset(source.path)
            if recipe.data.verify_checksums:
                data.verify()
        except DataError as e:
            raise DataError(f"{label}: {e}" if label != "data.train" else str(e)) from None
        datasets.append(data)
    names, weights = [s.name for _, s in labelled], [s.weight for _, s in labelled]
    return Mixture(names, weights, datasets, named=recipe.data.is_mixture(split))


def reference_losses(recipe: Recipe) -> Tensor | None:
    """(num_samples,) fp64 CPU reference losses r_i by sample id for `reweight.signal: excess`
    (the `reweight.reference` scores of each data.train source, concatenated in the mixture's id
    order), else None.

    Raises:
        irdro.scores.ScoresError: the scores are missing, stale (other shards) or of another length;
            the message names the source's shard directory and the command that makes them.
    """
    if recipe.reweight.signal != "excess":
        return None
    dirs = [(label, s.path) for label, s in recipe.data.labelled_sources("train")]
    return torch.from_numpy(read_reference_table(dirs, recipe.reweight.reference))


def setup(recipe: Recipe) -> Setup:
    """Data, reference scores, tokenizer check, model, engine and (when a checkpoint exists) its
    resume state."""
    dp = dist.dp_size()
    tokenizer = load_tokenizer(recipe.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_data = open_data(recipe, "train")
    eval_data = open_data(recipe, "eval")
    sources = Sources(train_data.offsets, train_data.shares, train_data.names if train_data.named else ())
    reference = reference_losses(recipe)  # before the model: a missing file fails in seconds
    ds_config = resolve_ds_config(recipe, dist.world_size())
    point = dist.from_main(lambda: find_resume(recipe.output_dir, recipe.resume))
    check_resume_layout(point, recipe, dp)
    elastic = point is not None and point.world_size != dp
    if elastic:
        prepare_elastic(point)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
        warn_layout_change(recipe, point.world_size, dp)
    model = load_model(recipe.model, ds_config)
    shards = {
        label: data.datasets[d]
        for split, data in (("train", train_data), ("eval", eval_data))
        if data is not None
        for d, (label, _) in enumerate(recipe.data.labelled_sources(split))
    }
    check_shards(tokenizer, shards, model.config.vocab_size)
    check_parallel_shapes(recipe, model.config.to_dict(), "the model's config")
    mpu = enable_sequence_parallel(model, recipe.parallel.sequence_parallel, recipe.micro_batch_size)
    engine = initialize(recipe, model, ds_config, mpu)
    write_run_files(recipe, ds_config, model, tokenizer)
    start = 0
    if point is not None:
        state = load_checkpoint(engine, point, elastic, recipe.global_batch(dp))
        start = state["step"]
        restore_sources(sources, state, point.tag_dir)
        truncate_metrics(recipe.output_dir, start)
        log.info("resumed from %s at step %d%s", point.tag_dir, start, " (elastic)" if elastic else "")
    return Setup(engine, train_data, eval_data, pad_id, start, reference, sources)


def restore_sources(sources: Sources, state: dict, where: object) -> None:
    """Refuse a checkpoint of other sources or weights (the blended order would change under it; a
    checkpoint of one shard directory and a recipe of one source are the same order), then put its
    `group_dro` weights back (a checkpoint of an older irdro has none: alpha restarts at the targets)."""
    saved, now = state.get("sources"), sources.describe()
    if (saved or now) and [len(saved or [0]), len(now or [0])] != [1, 1]:
        same = (
            saved is not None
            and now is not None
            and [n for n, _ in saved] == [n for n, _ in now]
            and all(math.isclose(a, b, rel_tol=0, abs_tol=1e-12) for (_, a), (_, b) in zip(saved, now, strict=True))
        )
        if not same:

            def shown(mix: list | None) -> str:
                return ", ".join(f"{n} {s:.4g}" for n, s in mix) if mix else "one shard directory"

            raise ConfigError(
                f"data.train: {where} was written by a run over {shown(saved)}; this recipe blends {shown(now)}, "
                "which would change the data order under the checkpoint; resume with the same sources and weights, "
                "or start a new run (resume: never, or another output_dir)"
            )
    alpha = state.get("group_alpha")
    if alpha is not None and len(alpha) == sources.prior.numel():
        sources.alpha = torch.tensor(alpha, dtype=torch.float64, device="cpu")


@dataclass(frozen=True)
class Hooks:
    """Callbacks into `train` for tests and benchmarks (observe or perturb a run, never configure it).

    Attributes:
        losses: `(step, micro, local per-sample losses) -> losses` weighted and back-propagated.
        after_setup: `(setup)` once the model, engine and resume state are ready.
        before_step: `(step, engine)` as each optimizer step starts.
        after_step: `(step, stats, record)` once each optimizer step is logged; `record` is its
            metrics.jsonl line (`record["step"] == step + 1`).
    """

    losses: LossHook | None = None
    after_setup: Callable[[Setup], None] | None = None
    before_step: Callable[[int, object], None] | None = None
    after_step: Callable[[int, StepStats, dict], None] | None = None


def check_resume_layout(point: ResumePoint | None, recipe: Recipe, dp: int) -> None:
    """A checkpoint resumes on another number of data-parallel ranks (elastic, universal checkpoint)
    only without sequence or tensor parallelism on either side: with SP, ZeRO partitions over DP x SP
    ranks; with TP, DeepSpeed's conversion cannot re-shard AutoTP tags. Either must keep its layout."""
    if point is None:
        return
    p = recipe.parallel
    saved = (point.world_size, point.sequence_parallel, point.tensor_parallel)
    now = (dp, p.sequence_parallel, p.tensor_parallel)
    if saved != now and max(*saved[1:], *now[1:]) > 1:
        raise ConfigError(
            f"parallel: {point.tag_dir} was written by {saved[0]} data-parallel x {saved[1]} sequence-parallel x "
            f"{saved[2]} tensor-parallel ranks, this launch has {now[0]} x {now[1]} x {now[2]}; resume with that "
            "layout, or export it (tools/convert_to_hf.py) and start a new run from the export"
        )


def warn_layout_change(recipe: Recipe, old_dp: int, new_dp: int) -> None:
    """A resume on another number of data-parallel ranks keeps the global batch (checked on load) but
    changes what a `window: micro` spans; say so, with both sizes."""
    if dist.is_main() and recipe.reweight.window == "micro" and recipe.reweight.scheme != "erm":
        log.warning(
            "resume on %d data-parallel ranks (checkpoint: %d): reweight.window micro now spans %d samples "
            "(was %d), so the weights change meaning; use reweight.window=step for a layout-independent window",
            new_dp,
            old_dp,
            recipe.window_size(new_dp),
            recipe.micro_batch_size * old_dp,
        )


def stop_on_hang(message: str) -> None:
    """The heartbeat's watchdog: this rank waited `collective_timeout_minutes` for a peer; say which
    one and end the process (exit code 5), instead of a silent hang or NCCL's abort without a name."""
    log.error(
        "error: rank %d: %s; stopping this rank: rerun to resume from the last checkpoint", dist.global_rank(), message
    )
    exit_rank(EXIT_RANK_FAILURE)


def train(recipe: Recipe, hooks: Hooks | None = None) -> TrainResult:
    """Train `recipe` on the already-initialised process group; returns the engine for callers."""
    hooks = hooks or Hooks()
    validate(recipe, world_size=dist.world_size())
    dist.init_groups(recipe.parallel.sequence_parallel, recipe.parallel.tensor_parallel)
    seed_everything(recipe.seed)
    s = setup(recipe)
    if hooks.after_setup is not None:
        hooks.after_setup(s)
    engine = s.engine
    batches = Batches(
        s.train_data, recipe, s.pad_id, dp_rank=dist.dp_rank(), dp_size=dist.dp_size(), sp_rank=dist.sp_rank()
    )
    logger = RankZeroLogger(
        recipe.output_dir,
        total_steps=recipe.max_steps,
        initial_step=s.start_step,
        tensorboard=recipe.log.tensorboard,
        progress=recipe.log.progress,
        wandb=recipe.log.wandb,
        config=recipe.to_dict(),
    )
    result = TrainResult(engine=engine, steps=s.start_step)
    epochs = SourceEpochs(s.train_data, batches, recipe.global_batch(dist.dp_size()), s.start_step)
    engine.train()  # from_pretrained returns eval mode: dropout and gradient checkpointing need train
    if s.eval_data is not None and s.start_step == 0:
        logger.log({"step": 0, **evaluate(engine, s.eval_data, recipe, s.pad_id)})

    consecutive_skips = 0
    heartbeat = dist.Heartbeat(timeout_s=recipe.collective_timeout_minutes * 60, on_hang=stop_on_hang)
    # The handlers stay for the error path too: a launcher's SIGTERM must not cut the message short.
    with StopSignals() as stop, contextlib.closing(logger):
        try:
            for step in range(s.start_step, recipe.max_steps):
                heartbeat.at_step(step)
                if hooks.before_step is not None:
                    hooks.before_step(step, engine)
                t0, lr = time.perf_counter(), engine.get_lr()[0]  # the LR this step uses
                stats = train_step(engine, batches.step(step), recipe, step, hooks.losses, s.reference, s.sources)
                done = step + 1
                record = step_record(engine, stats, done, lr, t0)
                if s.train_data.named:
                    alpha = s.sources.alpha if recipe.reweight.scheme == "group_dro" else None
                    record.update(stats.source_metrics(s.train_data.names, alpha))
                    record.update(epochs.after(done))
                if s.eval_data is not None and (done == recipe.max_steps or every(done, recipe.eval.every)):
                    record.update(evaluate(engine, s.eval_data, recipe, s.pad_id))
                if every(done, recipe.log.every) or done == recipe.max_steps or "eval_loss" in record:
                    logger.log(record)
                    logger.histogram("weights", torch.cat([w.weights for w in stats.windows]), done)
                if every(done, recipe.log.samples_every):
                    logger.samples(done, stats.windows, describe=s.train_data.describe)
                logger.progress(done, loss=stats.loss, ess=stats.ess, tok_s=record["tokens_per_s"])
                result.records.append(record)
                result.steps = done
                if hooks.after_step is not None:
                    hooks.after_step(step, stats, record)
                consecutive_skips = consecutive_skips + 1 if stats.skipped else 0
                if consecutive_skips >= recipe.max_consecutive_skips:
                    raise TrainingAborted(
                        f"aborting: {consecutive_skips} consecutive steps had a non-finite loss "
                        f"(last at step {done}); lower optim.lr or check the data"
                    )
                saved = every(done, recipe.checkpoint.every) and done < recipe.max_steps
                if saved:
                    save_step(engine, recipe, done, s.sources)
                if dist.any_rank(stop.received is not None) and done < recipe.max_steps:  # one rank's signal stops all
                    if not saved:
                        save_step(engine, recipe, done, s.sources)
                    raise Preempted(
                        f"stop signal ({stop.received or 'on another rank'}): stopped after step {done} with "
                        f"checkpoint {tag_for(done)} saved; run the same command again to resume"
                    )
            if recipe.checkpoint.at_end and result.steps > s.start_step:
                save_step(engine, recipe, result.steps, s.sources)
        except RuntimeError as e:
            if not dist.is_collective_failure(e):
                raise
            raise RankFailure(
                f"step {heartbeat.step + 1}: a collective failed ({one_line(e)}): {heartbeat.describe()}; "
                "this rank stops too: rerun to resume from the last checkpoint"
            ) from None
        finally:
            heartbeat.stop()
    return result


def step_record(engine, stats: StepStats, step: int, lr: float, t0: float) -> dict:
    """The metrics.jsonl line of optimizer step `step` (1-based) begun at `time.perf_counter()` t0:
    the step's stats, the token count over every rank, throughput and grad norm. Call on every rank."""
    local_tokens = torch.tensor([stats.local_tokens], dtype=torch.float64, device=engine.device)
    tokens = int(dist.all_reduce_sum(local_tokens).item())
    grad_norm = engine.get_global_grad_norm()
    return {
        "step": step,
        "lr": lr,
        **stats.metrics(),
        "tokens": tokens,
        "tokens_per_s": tokens / (time.perf_counter() - t0),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
    }


def save_step(engine, recipe: Recipe, step: int, sources: Sources | None = None) -> None:
    """Checkpoint the engine after `step` optimizer steps, with the resume state. Call on every rank."""
    state = client_state(recipe, step, dist.dp_size(), sources)
    save_checkpoint(engine, recipe.output_dir, step, state, recipe.checkpoint.keep_last)


class SourceEpochs:
    """`source/NAME/epoch` of each logged step (epochs of each source read by the end of the step,
    from the blended order), and a log line when a source starts another pass over its samples."""

    def __init__(self, data: Mixture, batches: Batches, global_batch: int, start_step: int) -> None:
        self.data, self.order, self.global_batch = data, batches.order, global_batch
        self.lengths = np.array([len(d) for d in data.datasets], dtype=np.float64)
        self.passes = self.order.picks_before(start_step * global_batch) // self.lengths.astype(np.int64)

    def after(self, step: int) -> dict[str, float]:
        epochs = self.order.picks_before(step * self.global_batch) / self.lengths
        passes = np.floor(epochs).astype(np.int64)
        for d in np.flatnonzero(passes > self.passes).tolist():
            name, n = self.data.names[d], int(self.lengths[d])
            log.info("source %s: epoch %d of its %d samples done by step %d", name, passes[d], n, step)
        self.passes = np.maximum(self.passes, passes)
        return {f"source/{name}/epoch": float(e) for name, e in zip(self.data.names, epochs, strict=True)}


def every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def truncate_metrics(output_dir: str, step: int) -> None:
    """On resume, drop metrics.jsonl lines and sample dumps past the checkpoint (they are redone)."""
    run = RunDir(output_dir)
    if not dist.is_main():
        return
    for dump_step, dump in run.sample_dumps().items():
        if dump_step > step:
            dump.unlink()
    if not run.metrics.exists():
        return
    keep = [line for line in run.metrics.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(run.metrics, "".join(line + "\n" for line in keep))


def client_state(recipe: Recipe, step: int, dp: int, sources: Sources | None = None) -> dict:
    """Resume state stored in every checkpoint next to DeepSpeed's own (with the mixture's `group_dro`
    weights alpha, identical on every rank, as exact floats)."""
    mixture = {} if sources is None else {"group_alpha": sources.alpha.tolist(), "sources": sources.describe()}
    return {
        **mixture,
        "step": step,
        "consumed_samples": step * recipe.global_batch(dp),
        "world_size": dp,
        "sequence_parallel": recipe.parallel.sequence_parallel,
        "tensor_parallel": recipe.parallel.tensor_parallel,
        "recipe": recipe.to_dict(),
        "irdro_version": __version__,
    }


def setup_logging() -> None:
    # DeepSpeed calls collectives torch has renamed; the warning repeats every step and says nothing to users.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\..*` is deprecated", category=FutureWarning)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not os.environ.get("IRDRO_DS_VERBOSE"):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: RECIPE and overrides, with options anywhere (the deepspeed launcher puts
    its `--local_rank=N` before the recipe)."""
    parser = argparse.ArgumentParser(
        prog="deepspeed [--num_gpus N] --module irdro.train",
        description="Train a recipe: deepspeed --num_gpus 2 --module irdro.train RECIPE [a.b=value ...]",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    """The command line; `hooks` lets benchmarks observe the run (see `Hooks`). Returns the exit code:
    0, 2 for a recipe or data error, 3 when training aborted, 4 when a checkpoint could not be saved
    or converted (every rank stops with the same one-line error), 5 when another rank died or hung,
    75 when a stop signal preempted the run after a checkpoint (see irdro.faults)."""
    args = parse_args(argv)
    setup_logging()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_local_paths(recipe)  # before the process group and the model: fail in seconds
        init_distributed(recipe.collective_timeout_minutes)
        train(recipe, hooks)
        shutdown_distributed()
    except (ConfigError, DataError) as e:
        if os.environ.get("RANK", "0") == "0":
            log.error("error: %s: %s", args.recipe, e)
        return 2
    except TrainingAborted as e:
        log.error("error: %s", e)
        return 3
    except Preempted as e:  # raised on every rank together, after the checkpoint
        if os.environ.get("RANK", "0") == "0":
            log.warning("%s (exit code %d: requeue)", e, EXIT_REQUEUE)
        return EXIT_REQUEUE
    except RankFailure as e:  # on each surviving rank: the one that died cannot speak
        log.error("error: rank %d: %s", dist.global_rank(), e)
        return EXIT_RANK_FAILURE
    except CheckpointError as e:  # raised on every rank together
        if os.environ.get("RANK", "0") == "0":
            log.error("error: %s", e)
        return 4
    return 0


if __name__ == "__main__":
    exit_rank(main())  # an exception still exits normally, with its traceback
