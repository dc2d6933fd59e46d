"""The run directory: the name of every path a run writes under its `output_dir`.

Owns: the layout of a run directory (`recipe.yaml`, `ds_config.json`, `metrics.jsonl`,
`samples/step_<N>.jsonl`, `checkpoints/`, `tensorboard/`, `hf/`) and the sample-dump file name of a
step, both ways. Writers (irdro.train, irdro.metrics, irdro.checkpoint) and readers (irdro.export,
irdro.observe, tools/) take their paths from here. Must not: read or write a file, know what is
inside one (checkpoint tags are irdro.checkpoint's), or import torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

RECIPE_FILE = "recipe.yaml"
DS_CONFIG_FILE = "ds_config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
HF_DIR = "hf"

_SAMPLE_DUMP = re.compile(r"^step_(\d+)\.jsonl$")


def sample_dump_name(step: int) -> str:
    """File name of the per-sample dump of optimizer step `step`: `step_<N>.jsonl`, N 8 digits."""
    return f"step_{step:08d}.jsonl"


def sample_dump_step(name: str) -> int | None:
    """The step of a sample-dump file name (`sample_dump_name`'s inverse); None for other names."""
    m = _SAMPLE_DUMP.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (`output_dir` of the recipe); nothing is created or checked."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def recipe(self) -> Path:
        """The resolved recipe, `recipe.yaml`."""
        return self.root / RECIPE_FILE

    @property
    def ds_config(self) -> Path:
        """The DeepSpeed JSON the run used, `ds_config.json`."""
        return self.root / DS_CONFIG_FILE

    @property
    def metrics(self) -> Path:
        """One JSON object per logged step, `metrics.jsonl`."""
        return self.root / METRICS_FILE

    @property
    def samples(self) -> Path:
        """Per-sample dumps, `samples/`."""
        return self.root / SAMPLES_DIR

    def sample_dump(self, step: int) -> Path:
        """The per-sample dump of optimizer step `step`, `samples/step_<N>.jsonl`."""
        return self.samples / sample_dump_name(step)

    def sample_dumps(self) -> dict[int, Path]:
        """Step -> its dump file, ascending; {} without `samples/`."""
        if not self.samples.is_dir():
            return {}
        found = {}
        for f in self.samples.iterdir():
            step = sample_dump_step(f.name)
            if step is not None:
                found[step] = f
        return dict(sorted(found.items()))

    @property
    def checkpoints(self) -> Path:
        """DeepSpeed tags + `latest`, `checkpoints/`."""
        return self.root / CHECKPOINT_DIR

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files, `tensorboard/`."""
        return self.root / TENSORBOARD_DIR

    @property
    def hf(self) -> Path:
        """Model config, generation config and tokenizer for exports, `hf/`."""
        return self.root / HF_DIR
