"""What the reweighting did to a run's data: its per-sample dumps as numbers, text and PNGs.

Owns: reading a run directory's `samples/step_<N>.jsonl` dumps (written by
`RankZeroLogger.samples` when `log.samples_every > 0`) and `metrics.jsonl`, picking the samples
worth reading (hardest, most weighted, discarded), turning their ids back into text through the
run's recipe and tokenizer, summarising a mixture's per-source shares (`source/NAME/*` metrics),
and drawing the figures (Agg, no pyplot state) that `tools/plot_weights.py` writes. Must not:
train, import deepspeed or torch.distributed, or print (it returns strings; the tool prints them).

Losses drift down over training, so the samples are ranked by their *excess loss* (loss minus the
mean loss of their window) and their *relative weight* (weight x window size, 1 = uniform): the
quantities the weights are actually a function of, comparable across steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irdro.config import SCHEMES
from irdro.rundir import METRICS_FILE, SAMPLES_DIR, RunDir

log = logging.getLogger(__name__)

_MAX_SCATTER_POINTS = 100_000
_PROGRESS_MIN_FILES = 100  # reading fewer dumps takes well under a second
# A window whose weights are all within this of each other is "uniform" (warm-up, ERM, huge lam).
_UNIFORM_RTOL = 1e-6


class ObserveError(Exception):
    """One-line, user-facing message naming the file or setting to fix."""


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Dumps:
    """Every dumped sample row of a run (or of one step), one array entry per row.

    Rows of skipped windows (non-finite loss: all weights 0) are left out and counted in
    `num_skipped_windows`.

    Attributes:
        step: (N,) int64 optimizer step (1-based, as in metrics.jsonl).
        window: (N,) int64 window index within its step (micro-batch for window `micro`).
        sample_id: (N,) int64 row in the run's `data.train` ShardDataset.
        rank: (N,) int64 data-parallel rank that trained the sample.
        loss: (N,) float64 per-sample mean NLL.
        weight: (N,) float64 the sample's weight p_i (a window's weights sum to 1).
        window_size: (N,) int64 number of samples in the row's window.
        excess: (N,) float64 loss minus the mean loss of the row's window.
        uniform_window: (N,) bool True where the row's window has equal weights everywhere.
        steps: sorted distinct dumped steps (of the files read, skipped windows included).
        num_skipped_windows: windows dropped for a non-finite loss.
        num_bad_sums: windows whose weights do not sum to 1 (within 1e-3); should be 0.
        source: (N,) object array of the mixture source NAME of each row (the dumps' `source`
            field), or None when the dumps carry none (a single-directory `data.train`).
    """

    step: np.ndarray
    window: np.ndarray
    sample_id: np.ndarray
    rank: np.ndarray
    loss: np.ndarray
    weight: np.ndarray
    window_size: np.ndarray
    excess: np.ndarray
    uniform_window: np.ndarray
    steps: list[int]
    num_skipped_windows: int
    num_bad_sums: int
    source: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.step.size)

    @property
    def rel_weight(self) -> np.ndarray:
        """(N,) weight x window size: 1 = what ERM would give, 0 = discarded."""
        return self.weight * self.window_size


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """Return `run_dir` as a Path, or raise ObserveError if it is not a run directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ObserveError(f"run directory {path} does not exist")
    if not RunDir(path).metrics.is_file() and not RunDir(path).samples.is_dir():
        raise ObserveError(
            f"{path} is not an irdro run directory (no {METRICS_FILE} or {SAMPLES_DIR}/); pass the recipe's output_dir"
        )
    return path


def dump_files(run_dir: str | os.PathLike) -> dict[int, Path]:
    """Map step -> samples/step_<N>.jsonl of a run, ascending.

    Raises:
        ObserveError: no samples/ directory or no dump in it.
    """
    folder = RunDir(run_dir).samples
    hint = (
        "set log.samples_every=N in the recipe (or as an override: log.samples_every=10) to dump "
        "every N-th step's per-sample losses and weights, and train again"
    )
    if not folder.is_dir():
        raise ObserveError(f"{folder} does not exist: this run dumped no samples; {hint}")
    files = RunDir(run_dir).sample_dumps()
    if not files:
        raise ObserveError(f"{folder} holds no step_<N>.jsonl dumps; {hint}")
    return files


def load_dumps(run_dir: str | os.PathLike, step: int | None = None, progress: bool = False) -> Dumps:
    """Read a run's per-sample dumps (all of them, or only `step`'s).

    Args:
        run_dir: the run directory (`output_dir` of the recipe).
        step: only this step's dump; None reads all.
        progress: allow a tqdm bar over the files (shown only for 100 dumps or more).

    Raises:
        ObserveError: no dumps, no dump for `step`, or a malformed line (naming file:line).
    """
    files = dump_files(run_dir)
    if step is not None:
        if step not in files:
            raise ObserveError(
                f"no dump for step {step} in {RunDir(run_dir).samples}; dumped steps: {_describe_steps(list(files))}"
            )
        files = {step: files[step]}
    cols: dict[str, list] = {k: [] for k in ("step", "window", "sample_id", "rank", "loss", "weight")}
    sources: list[str | None] = []
    from tqdm.auto import tqdm

    for file in tqdm(
        files.values(),
        desc="reading dumps",
        unit="file",
        disable=not progress or len(files) < _PROGRESS_MIN_FILES,
    ):
        with open(file, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)  # accepts the NaN a skipped step writes
                    for k, values in cols.items():
                        v = row[k]
                        values.append(math.nan if v is None else v)
                    sources.append(row.get("source"))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ObserveError(
                        f"{file}:{lineno}: not a sample row ({type(e).__name__}: {e}); expected "
                        '{"step", "window", "sample_id", "rank", "loss", "weight"}'
                    ) from None
    ints = {k: np.asarray(cols[k], dtype=np.int64) for k in ("step", "window", "sample_id", "rank")}
    loss = np.asarray(cols["loss"], dtype=np.float64)
    weight = np.asarray(cols["weight"], dtype=np.float64)
    if loss.size == 0:
        raise ObserveError(f"the dumps in {RunDir(run_dir).samples} hold no sample rows")

    # Group rows by (step, window).
    keys = ints["step"] * (int(ints["window"].max()) + 1) + ints["window"]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=weight)
    finite = np.bincount(inverse, weights=~np.isfinite(loss)) == 0
    skipped = ~finite | (sums <= 0)
    num_bad = int(np.sum(~skipped & (np.abs(sums - 1.0) > 1e-3)))
    if num_bad:
        log.warning("%d dumped windows have weights that do not sum to 1", num_bad)
    mean = np.bincount(inverse, weights=np.where(np.isfinite(loss), loss, 0.0)) / counts
    w_max = np.full(counts.size, -np.inf)
    w_min = np.full(counts.size, np.inf)
    np.maximum.at(w_max, inverse, weight)
    np.minimum.at(w_min, inverse, weight)
    uniform = (w_max - w_min) <= _UNIFORM_RTOL * np.maximum(w_max, 1e-30)

    keep = ~skipped[inverse]
    return Dumps(
        step=ints["step"][keep],
        window=ints["window"][keep],
        sample_id=ints["sample_id"][keep],
        rank=ints["rank"][keep],
        loss=loss[keep],
        weight=weight[keep],
        window_size=counts[inverse][keep],
        excess=(loss - mean[inverse])[keep],
        uniform_window=uniform[inverse][keep],
        steps=sorted(files),
        num_skipped_windows=int(skipped.sum()),
        num_bad_sums=num_bad,
        source=np.asarray(sources, dtype=object)[keep] if any(s is not None for s in sources) else None,
    )


def load_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every metrics.jsonl line (training and eval-only), ascending by step; [] without the file.

    A resumed run can repeat a step; the last line for a step wins.
    """
    file = RunDir(run_dir).metrics
    if not file.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    with open(file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("%s:%d: skipping a malformed metrics line", file, lineno)
                continue
            by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def describe_reweighting(run_dir: str | os.PathLike) -> str:
    """The run's reweighting settings from recipe.yaml in one phrase ("" without a recipe), e.g.
    `irdro lam=0.3 trim_top=0.1, window micro, warm-up 2 steps`."""
    import yaml

    try:
        recipe = yaml.safe_load(RunDir(run_dir).recipe.read_text(encoding="utf-8"))
        rw = dict(recipe["reweight"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return ""
    scheme = rw.pop("scheme", "?")
    params = SCHEMES[scheme].params if scheme in SCHEMES else ()
    fmt = {k: f"{v:g}" if isinstance(v, int | float) else str(v) for k, v in rw.items()}
    text = " ".join([str(scheme)] + [f"{k}={fmt[k]}" for k in params if k in rw])
    if "window" in rw:
        text += f", window {rw['window']}"
    if rw.get("warmup_steps"):
        text += f", warm-up {rw['warmup_steps']} steps"
    return text


_SOURCE_PREFIX = "source/"


def source_names(metrics: list[dict[str, Any]]) -> list[str]:
    """The mixture sources NAME of a run's `source/NAME/<field>` metrics keys, in first-seen order
    ([] for a single-directory `data.train`). `eval_source/...` keys are not looked at."""
    names: dict[str, None] = {}
    for m in metrics:
        for key in m:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "source" and parts[1]:
                names.setdefault(parts[1], None)
    return list(names)


def _source_key(name: str, field: str) -> str:
    return f"{_SOURCE_PREFIX}{name}/{field}"


def _describe_steps(steps: list[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, {steps[2]}, ..., {steps[-1]}"


# --------------------------------------------------------------------------- summaries


def summarise(dumps: Dumps, metrics: list[dict[str, Any]]) -> str:
    """A few lines describing the dumps (and the run's ESS, and its mixture sources' shares: see
    `summarise_sources`), for the tool to print."""
    n = len(dumps)
    discarded = dumps.weight == 0
    sizes = np.unique(dumps.window_size)
    size = str(int(sizes[0])) if sizes.size == 1 else f"{int(sizes.min())}-{int(sizes.max())}"
    num_windows = int(np.unique(np.stack([dumps.step, dumps.window]), axis=1).shape[1]) if n else 0
    lines = [
        f"dumps: {len(dumps.steps)} step{'s' * (len(dumps.steps) != 1)} "
        f"({_describe_steps(dumps.steps)}), {num_windows} windows "
        f"of {size} samples, {n} rows, {len(np.unique(dumps.sample_id))} distinct samples",
        f"weights: {int(discarded.sum())} rows with weight 0 ({discarded.mean():.1%}), "
        f"{int(np.sum(dumps.uniform_window))} rows in uniform windows (warm-up / ERM), "
        f"max weight x window size {dumps.rel_weight.max():.2f} (1 = uniform)",
    ]
    if dumps.num_skipped_windows:
        lines.append(f"skipped: {dumps.num_skipped_windows} windows with a non-finite loss left out")
    ess = [m["ess"] for m in metrics if isinstance(m.get("ess"), int | float)]
    if ess:
        lines.append(
            f"metrics: {len(ess)} logged steps, ESS median {np.median(ess):.2f} (min {min(ess):.2f}) of the window"
        )
    sources = summarise_sources(metrics)
    if sources:
        lines.append(sources)
    return "\n".join(lines)


def summarise_sources(metrics: list[dict[str, Any]]) -> str:
    """A table of the mixture sources over the logged training steps ("" without `source/` keys).

    Per source: the mean of `sample_share` and of `weight_share` over the steps that log them (nulls
    skipped), their ratio (mean weight share / mean sample share: above 1 the weights favour the
    source's samples, below 1 they discount them; "-" when it never had a sample), the last
    `epoch` (epochs of the source consumed) and, with scheme `group_dro`, the last `alpha`.
    """
    names = source_names(metrics)
    if not names:
        return ""
    num_steps = sum(any(k.startswith(_SOURCE_PREFIX) for k in m) for m in metrics)

    def last(values: np.ndarray) -> str:
        return f"{values[-1]:.3f}" if values.size else "-"

    rows = []
    has_alpha = False
    for name in names:
        sample = _series(metrics, _source_key(name, "sample_share"))[1]
        weight = _series(metrics, _source_key(name, "weight_share"))[1]
        alpha = _series(metrics, _source_key(name, "alpha"))[1]
        has_alpha |= alpha.size > 0
        mean_sample = float(sample.mean()) if sample.size else math.nan
        mean_weight = float(weight.mean()) if weight.size else math.nan
        ratio = mean_weight / mean_sample if mean_sample > 0 and weight.size else math.nan
        rows.append(
            [
                name,
                f"{mean_sample:.3f}" if sample.size else "-",
                f"{mean_weight:.3f}" if weight.size else "-",
                f"{ratio:.2f}" if math.isfinite(ratio) else "-",
                last(_series(metrics, _source_key(name, "epoch"))[1]),
                last(alpha),
            ]
        )
    header = ["source", "sample share", "weight share", "weight/sample", "last epoch", "last alpha"]
    if not has_alpha:
        header, rows = header[:-1], [r[:-1] for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  " + "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    title = (
        f"sources: {len(names)}, means over {num_steps} logged step{'s' * (num_steps != 1)} "
        "(weight/sample > 1: the weights favour the source)"
    )
    return "\n".join([title, line(header), *map(line, rows)])


@dataclass(frozen=True)
class Pick:
    """One dumped row chosen for display."""

    step: int
    window: int
    sample_id: int
    rank: int
    loss: float
    weight: float
    window_size: int
    excess: float
    source: str | None = None
    """The row's mixture source; None without one."""


def pick_samples(dumps: Dumps, k: int) -> dict[str, list[Pick]]:
    """The rows worth reading, each sample id at most once per group.

    Groups (empty ones omitted):
        `highest loss`: largest excess loss over their window's mean.
        `highest weight`: largest weight x window size.
        `discarded as noise`: weight 0 in a non-uniform window although above the window's mean
            loss (IR-DRO's `trim_top`, MidRanking's top band), largest excess first.
    """
    groups = {
        "highest loss": np.argsort(-dumps.excess, kind="stable"),
        "highest weight": np.argsort(-dumps.rel_weight, kind="stable"),
    }
    noise = np.flatnonzero((dumps.weight == 0) & (dumps.excess > 0) & ~dumps.uniform_window)
    if noise.size:
        groups["discarded as noise"] = noise[np.argsort(-dumps.excess[noise], kind="stable")]
    out = {}
    for name, order in groups.items():
        seen: set[int] = set()
        picks = []
        for i in order.tolist():
            sid = int(dumps.sample_id[i])
            if sid in seen:
                continue
            seen.add(sid)
            picks.append(
                Pick(
                    int(dumps.step[i]),
                    int(dumps.window[i]),
                    sid,
                    int(dumps.rank[i]),
                    float(dumps.loss[i]),
                    float(dumps.weight[i]),
                    int(dumps.window_size[i]),
                    float(dumps.excess[i]),
                    None if dumps.source is None else dumps.source[i],
                )
            )
            if len(picks) == k:
                break
        out[name] = picks
    return out


def _find_data_dir(run_dir: Path, value: str) -> Path:
    """`data.train` as written in recipe.yaml: absolute, or relative to where training ran."""
    candidates = [Path(value)] if Path(value).is_absolute() else [Path.cwd() / value]
    if not Path(value).is_absolute():
        candidates += [p / value for p in run_dir.resolve().parents]
    for c in candidates:
        if c.is_dir():
            return c
    raise ObserveError(
        f"data.train {value!r} (from {RunDir(run_dir).recipe}) not found relative to the current "
        "directory or the run directory's parents; run from the directory you trained in"
    )


def _train_paths(recipe_file: Path, train: Any) -> list[str]:
    """recipe.yaml's `data.train` as shard directories in list order: a plain path, or a mixture's
    list of `{path, weight, name}` sources (a bare path allowed per entry)."""
    entries = train if isinstance(train, list) else [train]
    paths = [e.get("path") if isinstance(e, dict) else e for e in entries]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ObserveError(f"{recipe_file}: no data.train shard directory in it")
    return paths


def decode_samples(run_dir: str | os.PathLike, sample_ids: list[int]) -> dict[int, str]:
    """Sample id -> its decoded text, via the run's recipe.yaml (data.train) and hf/ tokenizer.

    For a mixture (`data.train` a list of sources) a sample id is the source's offset (the summed
    lengths of the sources listed before it) plus the sample's row in that source.

    Raises:
        ObserveError: no recipe.yaml / data.train / hf tokenizer, or an unreadable shard dir.
    """
    import yaml

    from irdro.shards import DataError, ShardDataset, ShardMismatch, check_compatible

    run = Path(run_dir)
    recipe_file = RunDir(run).recipe
    if not recipe_file.is_file():
        raise ObserveError(f"{recipe_file} not found; cannot tell which data the sample ids index")
    try:
        recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
        train = recipe["data"]["train"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise ObserveError(f"{recipe_file}: no data.train shard directory in it") from None
    try:
        datasets = [ShardDataset(_find_data_dir(run, p)) for p in _train_paths(recipe_file, train)]
    except DataError as e:
        raise ObserveError(str(e)) from None
    hf = RunDir(run).hf
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ObserveError(f"cannot load the run's tokenizer from {hf}: {first}") from None
    for data in datasets:
        try:
            check_compatible(tokenizer, {"data.train": data}, chat_template=False)
        except ShardMismatch as e:
            if e.found:  # shards that record no tokenizer cannot be checked
                log.warning(
                    "%s was tokenised with %s (hash %s), not with %s (hash %s); texts may be wrong",
                    data.path,
                    data.tokenizer_name,
                    e.found[:12],
                    hf,
                    e.expected[:12],
                )
    offsets = np.cumsum([0] + [len(d) for d in datasets])
    out = {}
    for sid in sample_ids:
        if not 0 <= sid < offsets[-1]:
            where = str(datasets[0].path) if len(datasets) == 1 else f"the {len(datasets)} sources of data.train"
            raise ObserveError(
                f"sample id {sid} is out of range for {where} ({int(offsets[-1])} samples): the dumps "
                "come from other data than recipe.yaml's data.train"
            )
        d = int(np.searchsorted(offsets, sid, side="right")) - 1
        out[sid] = tokenizer.decode(datasets[d][sid - int(offsets[d])].input_ids.tolist())
    return out


def format_picks(groups: dict[str, list[Pick]], texts: dict[int, str], width: int = 200) -> str:
    """Human-readable listing of `pick_samples` output with texts, whitespace collapsed, cut at
    `width` characters."""
    lines = []
    for name, picks in groups.items():
        lines.append(f"== {name} ({len(picks)}) ==")
        for p in picks:
            lines.append(
                f"step {p.step} window {p.window} sample {p.sample_id}"
                f"{f' ({p.source})' if p.source is not None else ''}: loss {p.loss:.3f} "
                f"({p.excess:+.3f} vs window mean), weight {p.weight:.4f} "
                f"(x{p.weight * p.window_size:.2f} uniform)"
            )
            text = " ".join(texts.get(p.sample_id, "").split())
            lines.append("    " + (text if len(text) <= width else text[: width - 3] + "..."))
        lines.append("")
    return "\n".join(lines).rstrip("\n")


# --------------------------------------------------------------------------- figures


def _figure(**kwargs: Any):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ObserveError("matplotlib is not installed; pip install 'matplotlib>=3.8' (or -e '.[plot]')") from None
    return Figure(**kwargs)  # Agg canvas on savefig; no pyplot, no global state


def plot_weight_vs_loss(ax: Any, dumps: Dumps) -> None:
    """Scatter of every dumped row: loss (x) vs weight (y), coloured by step. Log weight axis when
    the positive weights span more than a decade; weight-0 rows are drawn as x at the bottom."""
    idx = np.arange(len(dumps))
    if idx.size > _MAX_SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(idx, _MAX_SCATTER_POINTS, replace=False))
    loss, weight, step = dumps.loss[idx], dumps.weight[idx], dumps.step[idx]
    pos = weight > 0
    lo = float(weight[pos].min()) if pos.any() else 1.0
    log_scale = pos.any() and float(weight[pos].max()) / lo > 10
    floor = lo / 3 if log_scale else 0.0
    by_step = len(np.unique(step)) > 1  # one step: plain colours, no colour bar
    colour = {"cmap": "viridis", "vmin": int(step.min()), "vmax": int(step.max())}
    sc = ax.scatter(
        loss[pos],
        weight[pos],
        s=12,
        alpha=0.7,
        linewidths=0,
        rasterized=True,
        **({"c": step[pos], **colour} if by_step else {"color": "tab:blue"}),
    )
    if (~pos).any():
        ax.scatter(
            loss[~pos],
            np.full(int((~pos).sum()), floor),
            marker="x",
            s=16,
            linewidths=0.8,
            label=f"weight 0 (discarded): {int((~pos).sum())}",
            **({"c": step[~pos], **colour} if by_step else {"color": "tab:red"}),
        )
    if log_scale:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.2, not 2x10^-1
        ax.yaxis.set_minor_formatter(NullFormatter())
    size = float(np.median(dumps.window_size))
    ax.axhline(1.0 / size, color="grey", ls="--", lw=0.8, label=f"uniform 1/{size:g}")
    ax.legend(loc="center right", fontsize=8)
    if by_step:
        ax.figure.colorbar(sc, ax=ax, label="step", pad=0.01)
    shown = "" if by_step else f" at step {int(step[0])}"
    shown += "" if idx.size == len(dumps) else f" ({idx.size} of {len(dumps)} shown)"
    ax.set(
        xlabel="per-sample loss", ylabel="weight p_i" + (" (log)" if log_scale else ""), title=f"weight vs loss{shown}"
    )


def loss_groups(dumps: Dumps) -> dict[str, np.ndarray]:
    """Split rows for the histogram: boolean masks `weight 0 (discarded)`, `top 25% by weight`
    (the ceil(|W|/4) heaviest positive-weight rows of each non-uniform window) and `rest`."""
    discarded = dumps.weight == 0
    top = np.zeros(len(dumps), dtype=bool)
    order = np.lexsort((-dumps.weight, dumps.window, dumps.step))  # by window, heaviest first
    keys = np.stack([dumps.step[order], dumps.window[order]])
    starts = np.flatnonzero(np.r_[True, np.any(keys[:, 1:] != keys[:, :-1], axis=0)])
    for s, e in zip(starts, np.r_[starts[1:], order.size], strict=True):
        rows = order[s:e]
        if dumps.uniform_window[rows[0]]:
            continue
        rows = rows[: math.ceil(rows.size / 4)]
        top[rows[dumps.weight[rows] > 0]] = True
    return {
        "weight 0 (discarded)": discarded,
        "top 25% by weight": top,
        "rest": ~discarded & ~top,
    }


def plot_loss_by_weight(ax: Any, dumps: Dumps) -> None:
    """Stacked histogram of the excess loss (loss minus its window's mean) of the `loss_groups`
    (empty groups left out). Excess, not raw loss: over a run the raw losses drift down by far more
    than they spread within a window, and the weights only see the spread."""
    colours = {
        "weight 0 (discarded)": "tab:red",
        "top 25% by weight": "tab:orange",
        "rest": "tab:blue",
    }
    finite = dumps.excess[np.isfinite(dumps.excess)]
    bins = np.histogram_bin_edges(finite, bins=min(50, max(10, int(np.sqrt(finite.size)))))
    groups = [(name, mask) for name, mask in loss_groups(dumps).items() if mask.any()]
    ax.hist(
        [dumps.excess[m] for _, m in groups],
        bins=bins,
        stacked=True,
        color=[colours[n] for n, _ in groups],
        label=[f"{n}: {int(m.sum())}" for n, m in groups],
    )
    ax.axvline(0.0, color="grey", ls="--", lw=0.8)
    ax.legend(fontsize=8)
    ax.set(xlabel="loss − mean loss of its window", ylabel="samples (stacked)", title="loss by weight group")


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), int | float)]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def plot_ess(ax: Any, metrics: list[dict[str, Any]], window_size: float | None = None, step: int | None = None) -> None:
    """ESS (fraction of the window) and max weight over steps, on one [0, 1] axis."""
    for key, label, colour in (("ess", "ESS / |W|", "tab:green"), ("max_weight", "max weight", "tab:purple")):
        x, y = _series(metrics, key)
        if x.size:
            ax.plot(x, y, marker=".", ms=4, lw=1.2, color=colour, label=label)
    if window_size:
        ax.axhline(1.0 / window_size, color="tab:purple", ls=":", lw=0.8, label=f"uniform weight 1/{window_size:g}")
    skipped = [m["step"] for m in metrics if m.get("skipped")]
    if skipped:
        ax.plot(skipped, [0.0] * len(skipped), "rx", label="skipped step")
    if step is not None:
        ax.axvline(step, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set(xlabel="step", ylabel="fraction", title="effective sample size and max weight")


def plot_losses(ax: Any, metrics: list[dict[str, Any]], step: int | None = None) -> None:
    """Plain mean loss, weighted loss (what is optimised) and eval loss over steps."""
    for key, label, style in (
        ("loss", "loss (plain mean)", "-"),
        ("weighted_loss", "weighted loss  Σ p_i l_i", "-"),
        ("eval_loss", "eval loss", "o--"),
    ):
        x, y = _series(metrics, key)
        if x.size:
            ax.plot(x, y, style, ms=4, lw=1.2, label=label)
    if step is not None:
        ax.axvline(step, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    ax.set(xlabel="step", ylabel="loss", title="training loss")


def plot_source_shares(ax: Any, metrics: list[dict[str, Any]], title: str | None = None) -> None:
    """Each mixture source's shares over steps, one colour per source: `weight_share` (solid, the
    share of the weights p_i its samples got), `sample_share` (dashed, its share of the step's
    samples) and, with scheme `group_dro`, its group weight `alpha` (dotted). Lines without
    `source/` keys (eval-only lines) and null values are skipped; the y axis starts at 0."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names = source_names(metrics)
    styles = (("weight_share", "-", "weight share"), ("sample_share", "--", "sample share"), ("alpha", ":", "alpha"))
    used = set()
    handles = []
    for i, name in enumerate(names):
        colour = f"C{i % 10}"
        first = None
        for field, style, _ in styles:
            x, y = _series(metrics, _source_key(name, field))
            if x.size:
                (line,) = ax.plot(x, y, style, color=colour, lw=1.4, marker="." if x.size < 30 else None, ms=4)
                used.add(field)
                first = first or line
        if first is not None:
            handles.append(Line2D([], [], color=colour, lw=2.5, label=name))
    handles += [Line2D([], [], color="grey", ls=style, label=label) for field, style, label in styles if field in used]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set(xlabel="step", ylabel="share of the step", title=title or "per-source shares")


def make_source_figure(
    metrics: list[dict[str, Any]],
    output: str | os.PathLike,
    step: int | None = None,
    title: str = "",
) -> Path | None:
    """Write `sources.png` (`plot_source_shares`; suffixed `_step_<N>` with a marker at `step` when
    given) into `output` (created) and return its path; None, writing nothing, when the metrics
    have no `source/` keys (a single-directory `data.train`)."""
    if not source_names(metrics):
        return None
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    fig = _figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    plot_source_shares(ax, metrics, f"{title}: per-source shares" if title else None)
    if step is not None:
        ax.axvline(step, color="grey", lw=0.8, ls="--")
    path = out / f"sources{f'_step_{step:08d}' if step is not None else ''}.png"
    fig.savefig(path, dpi=120)
    return path


def make_figures(
    dumps: Dumps,
    metrics: list[dict[str, Any]],
    output: str | os.PathLike,
    step: int | None = None,
    title: str = "",
) -> list[Path]:
    """Write the PNGs into `output` (created) and return their paths.

    Files (suffixed `_step_<N>` when `step` is given): `weight_vs_loss.png`, `loss_by_weight.png`,
    `ess_max_weight.png` (ESS and max weight over + losses under; only with metrics),
    `sources.png` (`make_source_figure`; only for a mixture's metrics) and `overview.png` with the
    four panels of the first three, headed by `title` (e.g. `describe_reweighting`).
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"_step_{step:08d}" if step is not None else ""
    window_size = float(np.median(dumps.window_size))
    written = []

    def save(fig: Any, name: str) -> None:
        path = out / f"{name}{suffix}.png"
        fig.savefig(path, dpi=120)
        written.append(path)

    fig = _figure(figsize=(6.4, 4.4), layout="constrained")
    plot_weight_vs_loss(fig.add_subplot(), dumps)
    save(fig, "weight_vs_loss")
    fig = _figure(figsize=(6.4, 4.4), layout="constrained")
    plot_loss_by_weight(fig.add_subplot(), dumps)
    save(fig, "loss_by_weight")
    if metrics:
        fig = _figure(figsize=(6.4, 6.4), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True)
        plot_ess(top, metrics, window_size, step)
        plot_losses(bottom, metrics, step)
        save(fig, "ess_max_weight")

    sources = make_source_figure(metrics, out, step, title)
    if sources is not None:
        written.append(sources)

    fig = _figure(figsize=(12.8, 8.8) if metrics else (12.8, 4.4), layout="constrained")
    axes = fig.subplots(2 if metrics else 1, 2, squeeze=False)
    plot_weight_vs_loss(axes[0, 0], dumps)
    plot_loss_by_weight(axes[0, 1], dumps)
    if metrics:
        plot_ess(axes[1, 0], metrics, window_size, step)
        plot_losses(axes[1, 1], metrics, step)
    what = f"step {step}" if step is not None else f"{len(dumps.steps)} dumped steps"
    fig.suptitle(f"{title or 'reweighting'}: {what}, {len(dumps)} samples")
    save(fig, "overview")
    return written
