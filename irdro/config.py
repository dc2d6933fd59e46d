"""Recipes: strict frozen dataclasses loaded from YAML, `a.b=value` overrides, the DeepSpeed JSON merge.

Owns: every user-facing setting, its default and its validation; the DeepSpeed JSON that a recipe
resolves to. Must not: import torch or deepspeed, read data, or touch the filesystem beyond reading
the recipe, the DeepSpeed JSON it names and the model's config.json. Every error is a `ConfigError`
naming the dotted key.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# DeepSpeed keys the recipe owns; a DS JSON that sets them is refused.
RECIPE_OWNED_DS_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
)

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A recipe or DeepSpeed JSON problem; the message names the dotted key and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """Local Hugging Face model folder (config + weights). Exactly one of `path` and `config`."""
    config: dict | None = None
    """Inline HF config (`model_type` plus sizes) for a randomly initialised model (tests, demos)."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to `path`. Must match the data's manifest tokenizer hash."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter/compute dtype; must agree with the DeepSpeed JSON's `bf16.enabled`."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """`auto` = flash_attention_2 for a bf16 model when flash-attn and CUDA are present, else sdpa
    (flash kernels reject fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (less memory, about a third more compute)."""
    trust_remote_code: bool = False
    """Run model code shipped inside the model folder. Off unless you trust the folder."""


# A mixture source's name: it becomes part of metric keys (`source/NAME/...`) and TensorBoard tags.
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class SourceConfig:
    """One source of a mixture (`data.train: [{path, weight, name}, ...]`)."""

    path: str = ""
    """Shard directory written by tools/prepare_data.py."""
    weight: float = 1.0
    """Sampling weight (>= 0); the source's target share is weight / sum of the weights. Unused in
    `data.eval`, where every source is evaluated on its first `eval.max_samples` samples."""
    name: str = ""
    """Its name in metrics.jsonl, TensorBoard and errors; default: the path's last component."""


@dataclass(frozen=True)
class DataConfig:
    train: str | tuple[SourceConfig, ...] = ""
    """Shard directory written by tools/prepare_data.py (holds manifest.json), or a mixture: a list
    of `{path, weight, name}` sources blended by weight (README, "Mixtures")."""
    eval: str | tuple[SourceConfig, ...] | None = None
    """Held-out shard directory for `eval_loss`/`eval_ppl`, or a list of sources (per-source eval
    perplexity as well); none disables evaluation."""
    shuffle: bool = True
    """Seeded global shuffle per epoch; off = manifest order."""
    packing: Literal["none", "boundary"] = "none"
    """`boundary`: pack each micro-batch's samples into as few rows as fit, attention never crossing
    a document; every sample keeps its own loss and weight."""
    pad_to_multiple_of: int = 8
    """Right-pad each micro-batch to the longest sample rounded up to this multiple."""
    verify_checksums: bool = False
    """Recompute every shard's sha256 at start-up (slow on big corpora)."""

    def __post_init__(self) -> None:
        # listed sources get their default names now, so recipe.yaml shows the names metrics use
        for key in ("train", "eval"):
            if self.is_mixture(key):
                object.__setattr__(self, key, self.sources(key))

    def sources(self, key: str = "train") -> tuple[SourceConfig, ...]:
        """`data.train` (or `data.eval`) as sources with names filled in: a plain path is one source
        of weight 1 named after its last component; () when unset."""
        value = getattr(self, key)
        if not value:
            return ()
        if isinstance(value, str):
            value = (SourceConfig(path=value),)
        return tuple(dataclasses.replace(s, name=s.name or Path(s.path.rstrip("/")).name or s.path) for s in value)

    def labelled_sources(self, key: str = "train") -> list[tuple[str, SourceConfig]]:
        """`sources(key)`, each with the label errors name it by: `data.train` for a plain path,
        `data.train[1] (bible)` for a listed source."""
        listed = self.is_mixture(key)
        return [
            (f"data.{key}[{i}] ({s.name})" if listed else f"data.{key}", s) for i, s in enumerate(self.sources(key))
        ]

    def is_mixture(self, key: str = "train") -> bool:
        """Whether `data.<key>` is written as a list of sources (even of one)."""
        return isinstance(getattr(self, key), tuple)


@dataclass(frozen=True)
class ReweightConfig:
    scheme: str = "erm"
    """Registry name: erm | irdro | midrank | transform | group_dro."""
    window: Literal["micro", "step"] = "micro"
    """Samples one weight distribution spans: one micro-batch on every DP rank, or the whole
    optimizer step (exact; see `scoring_pass` for what it costs)."""
    scoring_pass: Literal["auto", "always"] = "auto"
    """Window `step` only: `auto` defers the softmax normaliser (ERM cost) for erm, irdro without
    trim_top and warm-up steps, and runs one no-grad scoring forward per micro-batch for schemes that
    rank the whole step (trim_top, midrank, transform); `always` scores every step (for comparisons)."""
    lam: float = 1.0
    """IR-DRO temperature (> 0): small = emphasise the hardest, large = ERM."""
    trim_top: float = 0.0
    """IR-DRO: fraction of the hardest samples of the window given weight 0, in [0, 1)."""
    frac: float = 0.5
    """MidRanking: band width as a fraction of the window, in (0, 1]."""
    portion: int = 1
    """MidRanking: which band of the descending loss order is kept (0 = the hardest)."""
    transform: Literal["linear", "quadratic_mid", "extremes"] = "linear"
    """`transform` scheme: g applied to the window's losses rescaled to [-delta, delta]."""
    delta: float = 1.0
    """`transform` scheme: half-width of the rescaled loss range (> 0)."""
    eta: float = 0.1
    """`group_dro`: step size of the per-source update alpha_d <- alpha_d * exp(eta * L_d) (>= 0;
    0 keeps alpha at the mixture's target shares: ERM)."""
    smoothing: float = 0.01
    """`group_dro`: after each update alpha <- (1 - smoothing) * alpha + smoothing * target shares, so
    no source's weight falls below smoothing x its target share; in (0, 1]."""
    warmup_steps: int = 0
    """Uniform weights for the first N optimizer steps."""
    signal: Literal["loss", "excess"] = "loss"
    """What the weights are a function of: the per-sample loss l_i, or the excess loss l_i - r_i over
    a reference model's loss r_i (the `reference` scores of `data.train`). Only the weights change:
    the back-propagated losses stay l_i."""
    reference: str = "reference"
    """signal `excess`: the name of the scores of `data.train` (DIR/scores/NAME, from
    tools/score_data.py) that hold the reference losses r_i."""
    normalize: Literal["global", "local"] = "global"
    """`global`: one weight distribution over the window's samples on every DP rank. `local`: each
    DP rank normalises over its own samples only, as the official research code does (for parity
    studies; the weights then depend on the number of ranks). `local` always scores the step."""


@dataclass(frozen=True)
class Scheme:
    """What the recipe, irdro.reweight and irdro.observe know of one weighting scheme (torch-free).

    A scheme is its weight function in irdro.reweight (registered under the same name) plus its entry
    in `SCHEMES`; a unit test checks that the two agree.

    Attributes:
        params: the `reweight.*` fields passed to the weight function as keyword arguments.
        check_window: `(reweight, window size)` -> None, raising ConfigError when the scheme's
            parameters leave no sample to weight (or trim) in a window of that size; None = no check.
        window_inputs: what the weight function needs of the window besides the losses, as keyword
            arguments before `params` (`group_dro`: each sample's source, the group weights alpha
            and the mixture's target shares, which irdro.normalize supplies).
    """

    params: tuple[str, ...] = ()
    check_window: Callable[[ReweightConfig, int], None] | None = None
    window_inputs: tuple[str, ...] = ()


def _check_midrank_window(w: ReweightConfig, n: int) -> None:
    c = math.floor(w.frac * n)
    _check(
        c >= 1,
        "reweight.frac",
        f"MidRanking band is empty: floor({w.frac} x window {n}) = 0; raise frac or the batch",
    )
    _check(
        (w.portion + 1) * c <= n,
        "reweight.portion",
        f"band [{w.portion * c}, {(w.portion + 1) * c}) lies outside the window of {n} samples; lower portion or frac",
    )


def _check_irdro_window(w: ReweightConfig, n: int) -> None:
    if w.trim_top > 0:
        k = math.floor(w.trim_top * n)
        _check(k < n, "reweight.trim_top", f"trims every sample of a window of {n}")
        _check(
            k >= 1,
            "reweight.trim_top",
            f"floor({w.trim_top} x window {n}) = 0 trims nothing; use >= {1 / n:.3g} or a larger window",
        )


# Every scheme by registry name (irdro.reweight registers a weight function under each).
SCHEMES: dict[str, Scheme] = {
    "erm": Scheme(),
    "irdro": Scheme(("lam", "trim_top"), _check_irdro_window),
    "midrank": Scheme(("frac", "portion"), _check_midrank_window),
    "transform": Scheme(("lam", "transform", "delta")),
    "group_dro": Scheme(("eta", "smoothing"), window_inputs=("sources", "alpha", "prior")),
}


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    """Optimizer: adamw (fused on GPU, DeepSpeedCPUAdam with offload) or plain sgd."""
    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw) / L2 (sgd)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.0
    """SGD momentum."""
    grad_clip: float = 1.0
    """Global gradient-norm clip written to the DS JSON; 0 disables clipping."""
    scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    """LR schedule after warm-up, decaying to `min_lr_ratio * lr` at `max_steps`."""
    warmup_steps: int = 0
    """Linear LR warm-up steps."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of `lr` for cosine/linear."""


@dataclass(frozen=True)
class ParallelConfig:
    sequence_parallel: int = 1
    """Ranks one sample's tokens are split over (DeepSpeed Ulysses); 1 = off."""
    tensor_parallel: int = 1
    """Ranks one layer's weights are split over (DeepSpeed AutoTP); 1 = off."""


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0
    """Held-out evaluation every N steps (0 = only before the first and after the last step)."""
    max_samples: int = 256
    """Held-out samples evaluated: the first N of the eval shards, the same set whatever the number of
    ranks, so `eval_ppl` is comparable across layouts and resumes."""
    micro_batch_size: int = 0
    """Eval micro-batch size per rank (0 = the training micro-batch size)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0
    """DeepSpeed checkpoint every N steps (0 = only at the end)."""
    at_end: bool = True
    """Save a checkpoint after the last step."""
    keep_last: int = 0
    """Keep only the newest N complete checkpoints (0 keeps all); older ones are deleted only after
    the new one is complete."""


@dataclass(frozen=True)
class LogConfig:
    every: int = 1
    """Write a metrics.jsonl line every N steps."""
    tensorboard: bool = True
    """TensorBoard scalars under OUTPUT_DIR/tensorboard (when tensorboard is installed)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    samples_every: int = 0
    """Dump every window's per-sample (step, sample id, rank, loss, weight) to samples/ every N
    steps (0 = off); `tools/plot_weights.py RUN_DIR` turns them into plots."""
    wandb: bool = False
    """Also log to Weights & Biases (`pip install wandb`; WANDB_MODE=offline works without network)."""


@dataclass(frozen=True)
class Recipe:
    output_dir: str = ""
    """Run directory: recipe.yaml, ds_config.json, metrics.jsonl, checkpoints/, tensorboard/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    """Seeds the data order and model init (same on every rank)."""
    max_steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: int = 1
    """Samples per rank per forward (DeepSpeed train_micro_batch_size_per_gpu)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    global_batch_size: int | None = None
    """Optional check: must equal micro_batch_size * grad_accum_steps * data-parallel size."""
    ds_config: str = "ds_configs/zero3_fp32.json"
    """DeepSpeed JSON with engine settings only (ZeRO stage, offload, dtype)."""
    ds_overrides: dict = field(default_factory=dict)
    """Deep-merged into the DS JSON (engine settings only, e.g. zero_optimization.stage)."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint in output_dir (if any); `never`: start
    fresh; or a checkpoint tag directory (or a checkpoints/ dir, following its `latest`)."""
    max_consecutive_skips: int = 5
    """Abort after this many consecutive steps skipped for a non-finite loss."""
    collective_timeout_minutes: float = 10.0
    """A collective that waits longer fails every rank with an error naming the rank that stopped
    (NCCL's own default is 30). Keep it above the longest checkpoint save or evaluation."""

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of a sample: sequence_parallel x tensor_parallel."""
        return self.parallel.sequence_parallel * self.parallel.tensor_parallel

    @property
    def sequence_multiple(self) -> int:
        """Rows are padded to a multiple of this: data.pad_to_multiple_of, and of
        parallel.sequence_parallel so every SP rank gets an equal shard."""
        return math.lcm(self.data.pad_to_multiple_of, self.parallel.sequence_parallel)

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel ranks of a world of `world_size` ranks (world = DP x SP x TP; validated)."""
        return world_size // self.model_parallel_size

    def global_batch(self, dp: int) -> int:
        """Samples per optimizer step over `dp` data-parallel ranks."""
        return self.micro_batch_size * self.grad_accum_steps * dp

    def window_size(self, dp: int) -> int:
        """Samples in one reweighting window over `dp` data-parallel ranks."""
        per_rank = self.micro_batch_size * (self.grad_accum_steps if self.reweight.window == "step" else 1)
        return per_rank * dp

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------- loading


def load_recipe(
    path: str | os.PathLike | None,
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int | None = None,
) -> Recipe:
    """Load a recipe YAML (or defaults when `path` is None), apply `a.b=value` overrides, validate.

    Args:
        path: recipe file.
        overrides: `dotted.key=value` strings; values are parsed as YAML.
        world_size: all ranks (DP x SP x TP); when given, the layout, batch arithmetic and the reweighting window
            are checked too.
    """
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    recipe = _build(Recipe, raw, "")
    validate(recipe, world_size)
    return recipe


def header_commands(path: str | os.PathLike) -> list[list[str]]:
    """The `python tools/...` commands of a recipe's leading comment block (how its inputs are made),
    continuation lines joined, each split into arguments (the leading `python` included)."""
    commands: list[str] = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].strip()
        if body.startswith("python tools/"):
            commands.append(body)
        elif commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1].rstrip() + " " + body
    return [shlex.split(c) for c in commands]


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The `RECIPE [a.b=value ...]` positionals every irdro entry point takes (argparse).

    Parse with `parser.parse_intermixed_args`, so that options may come before, between or after
    the recipe and its overrides (`RECIPE --world-size 8 a.b=1`); plain `parse_args` stops taking
    overrides at the first option and calls the rest unrecognized.
    """
    parser.add_argument("recipe", help="recipe YAML (see recipes/), e.g. recipes/tiny/cpu_smoke.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (values parsed as YAML)")


def recipe_from_dict(raw: dict, world_size: int | None = None) -> Recipe:
    """Build and validate a recipe from a plain dict (e.g. the one saved in a checkpoint)."""
    recipe = _build(Recipe, copy.deepcopy(raw), "")
    validate(recipe, world_size)
    return recipe


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` applied (value parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Strictly build dataclass `cls` from a mapping; unknown keys and wrong types raise."""
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
        raise ConfigError(f"unknown key {prefix}{key}{hint}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        listed = [a for a in inner if typing.get_origin(a) is tuple]
        if isinstance(value, list | tuple) and listed:  # `str | tuple[X, ...]`: a list takes the tuple
            return _coerce(value, listed[0], key)
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


# ----------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(r: Recipe, world_size: int | None = None) -> None:
    """Cross-field checks; with `world_size` (all ranks: DP x SP x TP), also the parallel layout, the
    batch arithmetic and the reweighting window."""
    _check(bool(r.output_dir), "output_dir", "required (the run directory)")
    m = r.model
    _check(
        (m.path is None) != (m.config is None),
        "model.path",
        "set exactly one of model.path (a local HF folder) and model.config (an inline config)",
    )
    if m.config is not None:
        _check("model_type" in m.config, "model.config.model_type", "required in an inline config")
    _check(
        not (m.attention == "flash_attention_2" and m.dtype == "fp32"),
        "model.attention",
        "flash_attention_2 needs a bf16 model (flash kernels reject fp32); set model.dtype: bf16 "
        "with a *_bf16.json ds_config, or attention: sdpa",
    )
    _check(
        m.tokenizer is not None or m.path is not None,
        "model.tokenizer",
        "required with model.config",
    )
    _check(bool(r.data.train), "data.train", "required (a shard dir from tools/prepare_data.py, or a list of sources)")
    for key in ("train", "eval"):
        _check_sources(r.data, key)
    _check(r.data.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", "must be >= 1")

    w = r.reweight
    if w.scheme not in SCHEMES:
        close = difflib.get_close_matches(w.scheme, list(SCHEMES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"reweight.scheme: {w.scheme!r} is not one of {', '.join(SCHEMES)}{hint}")
    _check(
        w.lam > 0 and math.isfinite(w.lam),
        "reweight.lam",
        f"must be a finite number > 0, got {w.lam}",
    )
    _check(0.0 <= w.trim_top < 1.0, "reweight.trim_top", f"must be in [0, 1), got {w.trim_top}")
    _check(0.0 < w.frac <= 1.0, "reweight.frac", f"must be in (0, 1], got {w.frac}")
    _check(w.portion >= 0, "reweight.portion", f"must be >= 0, got {w.portion}")
    _check(w.delta > 0, "reweight.delta", f"must be > 0, got {w.delta}")
    _check(w.warmup_steps >= 0, "reweight.warmup_steps", "must be >= 0")
    _check(w.eta >= 0 and math.isfinite(w.eta), "reweight.eta", f"must be a finite number >= 0, got {w.eta}")
    _check(
        0.0 < w.smoothing <= 1.0,
        "reweight.smoothing",
        f"must be in (0, 1] (> 0 keeps every source's alpha positive), got {w.smoothing}",
    )
    _check(
        not (w.scheme == "group_dro" and w.normalize == "local"),
        "reweight.normalize",
        "group_dro weights sources over the whole window; use normalize: global",
    )
    _check(
        w.scheme != "group_dro" or len(r.data.sources("train")) >= 2,
        "reweight.scheme",
        "group_dro weights the sources of a mixture: give data.train as a list of at least 2 "
        "{path, weight, name} sources (over one source it is ERM)",
    )
    _check(
        bool(w.reference) and "/" not in w.reference and w.reference not in (".", ".."),
        "reweight.reference",
        f"must be the name of a score set of data.train (DIR/scores/NAME), got {w.reference!r}",
    )

    o = r.optim
    _check(o.lr >= 0, "optim.lr", "must be >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    for i, beta in enumerate(o.betas):
        _check(0.0 <= beta < 1.0, f"optim.betas[{i}]", f"must be in [0, 1), got {beta}")
    _check(o.eps > 0 and math.isfinite(o.eps), "optim.eps", f"must be a finite number > 0, got {o.eps}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(o.momentum >= 0, "optim.momentum", f"must be >= 0, got {o.momentum}")
    _check(0 <= r.seed < 2**32, "seed", f"must be in [0, 2**32), got {r.seed}")

    _check(r.max_steps >= 1, "max_steps", "must be >= 1")
    _check(r.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
    _check(r.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
    _check(r.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")
    _check(
        r.collective_timeout_minutes > 0 and math.isfinite(r.collective_timeout_minutes),
        "collective_timeout_minutes",
        f"must be a finite number > 0, got {r.collective_timeout_minutes}",
    )
    _check(r.eval.every >= 0, "eval.every", "must be >= 0")
    _check(r.eval.max_samples >= 1, "eval.max_samples", "must be >= 1")
    _check(r.eval.micro_batch_size >= 0, "eval.micro_batch_size", "must be >= 0 (0 = micro_batch_size)")
    _check(r.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    _check(r.log.every >= 1, "log.every", "must be >= 1")
    _check(r.log.samples_every >= 0, "log.samples_every", "must be >= 0 (0 = off)")
    _check(r.checkpoint.keep_last >= 0, "checkpoint.keep_last", "must be >= 0 (0 keeps all)")
    _check(bool(r.resume), "resume", "auto, never, or a checkpoint directory")

    p = r.parallel
    _check(p.sequence_parallel >= 1, "parallel.sequence_parallel", "must be >= 1 (1 = off)")
    _check(p.tensor_parallel >= 1, "parallel.tensor_parallel", "must be >= 1 (1 = off)")
    _check(
        p.sequence_parallel == 1 or p.tensor_parallel == 1,
        "parallel",
        "sequence_parallel and tensor_parallel cannot both be > 1 (DeepSpeed's Ulysses and AutoTP do "
        "not compose); pick one",
    )

    if p.sequence_parallel > 1:
        _check_sequence_parallel(r)
    if r.model_parallel_size > 1 and (found := model_config_of(r)) is not None:
        check_parallel_shapes(r, found[1], found[0])

    if world_size is not None:
        _check(world_size >= 1, "world_size", "must be >= 1")
        mp = r.model_parallel_size
        _check(
            world_size % mp == 0,
            "parallel",
            f"world size {world_size} is not divisible by sequence_parallel {p.sequence_parallel} x "
            f"tensor_parallel {p.tensor_parallel} = {mp}; launch a multiple of {mp} ranks",
        )
        dp = r.data_parallel_size(world_size)
        if r.global_batch_size is not None:
            _check(
                r.global_batch_size == r.global_batch(dp),
                "global_batch_size",
                f"{r.global_batch_size} != micro_batch_size {r.micro_batch_size} x grad_accum_steps "
                f"{r.grad_accum_steps} x data-parallel size {dp} = {r.global_batch(dp)}",
            )
        check_window = SCHEMES[w.scheme].check_window
        if check_window is not None:  # normalize local: each rank weights its own share of the window
            check_window(w, r.window_size(dp) // dp if w.normalize == "local" else r.window_size(dp))


def _check_sources(data: DataConfig, key: str) -> None:
    """A list-valued `data.<key>`: every source has a path, a finite weight >= 0 and a unique name
    fit for metric keys; the training weights sum to a positive number."""
    if not data.is_mixture(key):
        return
    sources = data.sources(key)
    _check(bool(sources), f"data.{key}", "an empty list; give at least one {path, weight, name} source")
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        where = f"data.{key}[{i}]"
        _check(bool(s.path), f"{where}.path", "required (a shard dir from tools/prepare_data.py)")
        _check(
            math.isfinite(s.weight) and s.weight >= 0,
            f"{where}.weight",
            f"must be a finite number >= 0, got {s.weight} (source {s.name!r})",
        )
        _check(
            bool(SOURCE_NAME.match(s.name)),
            f"{where}.name",
            f"{s.name!r} may hold only letters, digits, '_', '.' and '-' (it names metrics); set name",
        )
        _check(
            s.name not in seen,
            f"{where}.name",
            f"source {s.name!r} is also data.{key}[{seen.get(s.name)}]; give each source its own name",
        )
        seen[s.name] = i
    if key == "train":
        total = sum(s.weight for s in sources)
        _check(
            total > 0,
            "data.train",
            f"the source weights sum to {total:g}; give at least one source (of {', '.join(seen)}) a weight > 0",
        )


# Attention implementations DeepSpeed Ulysses runs (it refuses eager: it drops 4D masks).
SEQUENCE_PARALLEL_ATTENTION = ("auto", "sdpa", "flash_attention_2")


def _check_sequence_parallel(r: Recipe) -> None:
    """What `parallel.sequence_parallel` > 1 needs of the rest of the recipe (the model's head
    counts are checked by `check_parallel_shapes`)."""
    sp = r.parallel.sequence_parallel
    _check(
        r.model.attention in SEQUENCE_PARALLEL_ATTENTION,
        "model.attention",
        f"{r.model.attention} cannot run with parallel.sequence_parallel {sp} (DeepSpeed Ulysses needs sdpa or "
        "flash_attention_2); set model.attention: sdpa",
    )
    _check(
        r.data.packing == "none",
        "data.packing",
        f"boundary packing cannot be exact with parallel.sequence_parallel {sp}: Ulysses drops the block-diagonal "
        "mask and attends causally over the whole row, across documents; set data.packing: none",
    )
    _check(
        r.eval.micro_batch_size in (0, r.micro_batch_size),
        "eval.micro_batch_size",
        f"must be 0 or micro_batch_size ({r.micro_batch_size}) with parallel.sequence_parallel {sp} (Ulysses is "
        "built for one batch size)",
    )


# Sizes of a model config that AutoTP splits over the TP ranks: each must be a multiple of the TP
# size (for key-value heads DeepSpeed would run with TP > heads, but the extra ranks hold no
# attention shard and that layout is not covered by irdro's tests).
TP_SPLIT_SIZES = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def model_config_of(r: Recipe) -> tuple[str, dict] | None:
    """(where it came from, the HF model config as a dict): `model.config`, else `model.path`'s
    config.json; None while that file is missing (the path checks report it)."""
    if r.model.config is not None:
        return "model.config", dict(r.model.config)
    path = resolve_path(str(r.model.path)) / "config.json"
    return (str(path), json.loads(path.read_text())) if path.is_file() else None


def check_parallel_shapes(r: Recipe, model_config: dict, source: str) -> None:
    """The model's sizes that sequence or tensor parallelism splits must divide by it.

    Ulysses (SP) splits attention heads: num_attention_heads a multiple of SP, num_key_value_heads a
    multiple or a divisor of it (kv heads are then replicated). AutoTP (TP) splits every size of
    `TP_SPLIT_SIZES`.

    Args:
        r: the recipe.
        model_config: the HF model config as a dict (`model_config_of`, or the loaded model's).
        source: what `model_config` came from, for the message.
    """
    sp, tp = r.parallel.sequence_parallel, r.parallel.tensor_parallel
    cfg = model_config.get("text_config") or model_config  # multimodal configs nest the LM's
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    if sp > 1 and heads is not None:  # an inline config without it gets the class default, checked at start
        _check(
            heads % sp == 0,
            "parallel.sequence_parallel",
            f"{sp} does not divide num_attention_heads {heads} ({source}); use a divisor of {heads}",
        )
        _check(
            kv % sp == 0 or sp % kv == 0,
            "parallel.sequence_parallel",
            f"{sp} and num_key_value_heads {kv} ({source}) must divide one another",
        )
    if tp > 1:
        for key, size in zip(TP_SPLIT_SIZES, (heads, kv, cfg.get("intermediate_size")), strict=True):
            if isinstance(size, int) and size % tp:
                raise ConfigError(
                    f"parallel.tensor_parallel: {tp} does not divide {key}={size} of {source}; pick a "
                    f"tensor_parallel that divides {', '.join(TP_SPLIT_SIZES)}"
                )


# ----------------------------------------------------------------------------- DeepSpeed JSON


def resolve_path(path: str) -> Path:
    """A recipe path: absolute, else relative to the working directory, else to the repo root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def missing_path(key: str, value: str, how: str) -> ConfigError:
    """The one-line error for a recipe path that is not there: the key, the path as written, and
    `how` to make it (irdro.paths words it for each key)."""
    return ConfigError(f"{key}: {value} does not exist; {how}")


DS_CONFIG_HOW = "pick one of ds_configs/*.json (zero2, zero3 or zero3_offload; _bf16 or _fp32)"


def _find_auto(node: Any, key: str) -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            hit = _find_auto(v, f"{key}.{k}" if key else k)
            if hit:
                return hit
    elif node == "auto":
        return key
    return None


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_ds_config(r: Recipe, world_size: int) -> dict:
    """The DeepSpeed JSON for this recipe on `world_size` ranks (DP x SP x TP): the engine settings
    of `r.ds_config` + `ds_overrides`, with the recipe-owned batch and clipping keys filled in.

    The optimizer and LR scheduler are built by irdro.engine from `optim` (client objects), so they
    never appear in the JSON.
    """
    path = resolve_path(r.ds_config)
    if not path.is_file():
        raise missing_path("ds_config", r.ds_config, DS_CONFIG_HOW)
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(base, dict):
        raise ConfigError(f"ds_config: {path}: expected a JSON object")
    for source, cfg in ((str(path), base), ("ds_overrides", r.ds_overrides)):
        for k in RECIPE_OWNED_DS_KEYS:
            if k in cfg:
                raise ConfigError(
                    f"ds_config: {source} sets {k!r}, which the recipe owns; remove it "
                    f"(set micro_batch_size / grad_accum_steps / optim.* in the recipe instead)"
                )
        auto = _find_auto(cfg, "")
        if auto:
            raise ConfigError(f'ds_config: {source} sets {auto} = "auto"; irdro needs explicit values')
    ds = _deep_merge(base, r.ds_overrides)
    if ds.get("fp16", {}).get("enabled", False):
        raise ConfigError("ds_config: fp16 is not supported (use bf16 or fp32)")
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    _check(
        bf16 == (r.model.dtype == "bf16"),
        "model.dtype",
        f"{r.model.dtype} but {path.name} has bf16.enabled={str(bf16).lower()}; pick a matching "
        f"ds_configs/*_{r.model.dtype}.json",
    )
    _refuse_unsafe_ds_settings(ds, str(path))
    if bf16 and r.grad_accum_steps > 1:  # bf16 sums of GA micro-gradients lose the small ones
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds["train_micro_batch_size_per_gpu"] = r.micro_batch_size
    ds["gradient_accumulation_steps"] = r.grad_accum_steps
    ds["train_batch_size"] = r.global_batch(r.data_parallel_size(world_size))
    ds["gradient_clipping"] = r.optim.grad_clip
    if r.parallel.sequence_parallel > 1:  # DeepSpeed's batch arithmetic: DP = world / this
        _check(
            zero_stage(ds) == 3,
            "parallel.sequence_parallel",
            f"needs ZeRO stage 3 (irdro.dist._SPSum corrects its gradient average over DP x SP ranks; "
            f"stage 2 averages over DP), {path.name} has stage {zero_stage(ds)}: use ds_configs/zero3_*.json",
        )
        ds["sequence_parallel_size"] = r.parallel.sequence_parallel
    if tp_section := autotp_settings(ds, r.parallel.tensor_parallel, str(path)):
        ds["tensor_parallel"] = tp_section
    if r.optim.name == "sgd":  # a client optimizer DeepSpeed has no own test for; ZeRO handles it fine
        ds["zero_allow_untested_optimizer"] = True
    return ds


# DeepSpeed AutoTP training with ZeRO-3 (gathering TP x ZeRO shards when saving) needs this release.
AUTOTP_ZERO3_MIN_DEEPSPEED = (0, 19, 4)


def autotp_settings(ds: dict, tensor_parallel: int, source: str) -> dict:
    """The DS JSON `tensor_parallel` section (DeepSpeed AutoTP) for `parallel.tensor_parallel`.

    The recipe owns `autotp_size` (refused in the DS JSON at any TP size); with TP > 1 the LM head
    stays gathered (`vocab_parallel_lm_head: false`), so every TP rank sees full logits and the same
    per-sample losses. Other AutoTP keys of the DS JSON (partition_config, preset_model, ...) pass
    through.
    """
    section = dict(ds.get("tensor_parallel") or {})
    for key in ("autotp_size", "tp", "tensor_parallel", "vocab_parallel_lm_head"):
        if section.get(key) is not None:
            raise ConfigError(
                f"ds_config: {source} (or ds_overrides) sets tensor_parallel.{key}, which irdro sets from "
                f"parallel.tensor_parallel (with a gathered LM head for per-sample losses); remove it"
            )
    if tensor_parallel == 1:
        return section
    stage = zero_stage(ds)
    version = installed_deepspeed_version()
    if stage == 3 and version is not None and version < AUTOTP_ZERO3_MIN_DEEPSPEED:
        need = ".".join(map(str, AUTOTP_ZERO3_MIN_DEEPSPEED))
        raise ConfigError(
            f"parallel.tensor_parallel: AutoTP with ZeRO-3 needs deepspeed >= {need}, installed "
            f"{'.'.join(map(str, version))}; upgrade deepspeed or use a ds_configs/zero2_*.json"
        )
    return {**section, "autotp_size": tensor_parallel, "vocab_parallel_lm_head": False}


def installed_deepspeed_version() -> tuple[int, ...] | None:
    """(major, minor, patch) of the installed deepspeed, read from its metadata (no import); None
    when it is not installed (validating a recipe on a machine that does not train)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("deepspeed")
    except PackageNotFoundError:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


# ZeRO stages the equivalence tests cover (1 rank == 2 ranks, GA, resume).
TESTED_ZERO_STAGES = (2, 3)


def _dotted(ds: dict, key: str) -> Any:
    node: Any = ds
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _refuse_unsafe_ds_settings(ds: dict, source: str) -> None:
    """Refuse engine settings that silently break the gradient contract of irdro.normalize or
    the non-finite step skip (the merged DS JSON + ds_overrides; `source` names the file)."""
    refused = (
        (
            "gradient_predivide_factor",
            lambda v: v is not None and float(v) != 1.0,
            "rescales gradients before the data-parallel mean that irdro's backward coefficients undo",
        ),
        (
            "prescale_gradients",
            lambda v: bool(v),
            "divides gradients by the world size before the reduction irdro's coefficients assume",
        ),
        (
            "zero_optimization.reduce_scatter",
            lambda v: v is False,
            "switches ZeRO to an all-reduce path the equivalence tests do not cover",
        ),
        (
            "bf16.check_grad_overflow",
            lambda v: v is False,
            "turns off the overflow check that makes every rank skip a step with a non-finite loss",
        ),
        (
            "zero_optimization.compute_grad_norm",
            lambda v: v is False,
            "drops the global gradient norm that clipping, grad_norm and the non-finite skip use",
        ),
        (
            "sequence_parallel_size",
            lambda v: v is not None,
            "is the recipe's parallel.sequence_parallel (set that instead)",
        ),
        (
            "checkpoint.load_universal",
            lambda v: v is not None,
            "is set by irdro itself when a run resumes on another number of ranks",
        ),
    )
    for key, bad, why in refused:
        value = _dotted(ds, key)
        if bad(value):
            raise ConfigError(
                f"ds_config: {source} (or ds_overrides) sets {key}={json.dumps(value)}, which {why}; remove it"
            )
    stage = zero_stage(ds)
    if stage not in TESTED_ZERO_STAGES:
        raise ConfigError(
            f"ds_config: zero_optimization.stage={stage} in {source} (or ds_overrides) is not covered by irdro's "
            f"equivalence tests; use stage 2 or 3 (ds_configs/zero2_*.json, zero3_*.json)"
        )


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    dev = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")


# ----------------------------------------------------------------------------- dumping


def _to_plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _to_plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_to_plain(v) for v in node]
    return node


def dump_yaml(r: Recipe) -> str:
    return yaml.safe_dump(r.to_dict(), sort_keys=False, default_flow_style=None)
