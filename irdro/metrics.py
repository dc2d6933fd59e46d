"""Run metrics: `metrics.jsonl`, TensorBoard scalars, the rank-0 progress bar.

Owns: writing what the loop measured. Every method is a no-op on ranks other than 0, so the loop
never branches on rank. Must not: compute metrics that need collectives (the loop passes numbers in).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from irdro import dist
from irdro.config import ConfigError
from irdro.fsio import atomic_write_text
from irdro.rundir import RunDir

log = logging.getLogger(__name__)


class RankZeroLogger:
    """metrics.jsonl + optional TensorBoard + tqdm, active on global rank 0 only."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        wandb: bool = False,
        config: dict | None = None,
    ) -> None:
        self.active = dist.is_main()
        self._file = None
        self._tb = None
        self._bar = None
        self._wandb = None
        self.output_dir = Path(output_dir)
        if not self.active:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._file = open(RunDir(out).metrics, "a", buffering=1)  # closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(RunDir(out).tensorboard))
            except ImportError:
                log.info("tensorboard not installed; skipping TensorBoard logging")
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise ConfigError(
                    "log.wandb: wandb is not installed; `pip install wandb` or set log.wandb=false"
                ) from None
            self._wandb = wandb_lib.init(
                project=os.environ.get("WANDB_PROJECT", "irdro"),
                name=out.name,
                dir=str(out),
                config=config or {},
                resume="allow",
            )
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        """Append one JSON line (non-finite floats become null) and mirror scalars to TensorBoard."""
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if k != "step"}, step=int(record.get("step", 0)))

    def samples(self, step: int, windows: list, describe=None) -> None:
        """Write every window's per-sample rows of `step` to samples/step_<N>.jsonl (atomically; a
        resumed run rewrites the file of a redone step). `describe(sample_id) -> dict` adds fields
        such as doc_id/chunk_id/num_tokens; with `reweight.signal: excess` each row also holds its
        reference loss `reference` (r_i; the weights are a function of loss - reference). Non-finite
        numbers become null (strict JSON)."""
        if not self.active:
            return
        run = RunDir(self.output_dir)
        run.samples.mkdir(exist_ok=True)
        lines = []
        for w_idx, w in enumerate(windows):
            refs = w.references.tolist() if w.references is not None else [None] * w.num_samples
            for sid, rank, loss, weight, ref in zip(
                w.ids.tolist(), w.ranks.tolist(), w.losses.tolist(), w.weights.tolist(), refs, strict=True
            ):
                row = {
                    "step": step,
                    "window": w_idx,
                    "sample_id": sid,
                    "rank": rank,
                    "loss": loss if math.isfinite(loss) else None,
                    "weight": weight if math.isfinite(weight) else None,
                }
                if ref is not None:
                    row["reference"] = ref
                if describe is not None:
                    row.update(describe(sid))
                lines.append(json.dumps(row))
        atomic_write_text(run.sample_dump(step), "\n".join(lines) + "\n")

    def histogram(self, name: str, values, step: int) -> None:
        if self.active and self._tb is not None:
            self._tb.add_histogram(name, values, step)

    def progress(self, step: int, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
