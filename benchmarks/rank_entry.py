"""One training rank for the benchmarks: `python benchmarks/rank_entry.py OUT_JSON RECIPE [k=v ...]`
(OUT_JSON may contain `{rank}`, so the deepspeed launcher can start it: `deepspeed --num_gpus 2
--no_local_rank benchmarks/rank_entry.py 'out.{rank}.json' RECIPE`).

Runs `irdro.train.main` with two `irdro.train.Hooks`: once setup is done (model loaded, engine
built) it resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs), so the peak it
reports is the training loop's, not the model load's; after every optimizer step it notes the wall
clock. Writes {rank, rc, peak_rss_train_kb, rss_after_setup_kb, peak_rss_setup_kb,
peak_rss_total_kb, log_times} to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import status_kb  # noqa: E402 - benchmarks/ is this script's directory


def main() -> int:
    out, argv = sys.argv[1].replace("{rank}", os.environ.get("RANK", "0")), sys.argv[2:]
    from irdro.train import Hooks, Setup, StepStats
    from irdro.train import main as train_main

    info: dict = {"rank": int(os.environ.get("RANK", "0"))}

    def after_setup(_setup: Setup) -> None:
        info["rss_after_setup_kb"] = status_kb("VmRSS")
        info["peak_rss_setup_kb"] = status_kb("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS

    # Wall-clock time at the end of every optimizer step, with the step's metrics.jsonl number: the
    # interval between two is the whole loop iteration (data, step, token count, grad norm, logging).
    log_times: list[tuple[int, float]] = []

    def after_step(_step: int, _stats: StepStats, record: dict) -> None:
        log_times.append((int(record["step"]), time.perf_counter()))

    rc = train_main(argv, Hooks(after_setup=after_setup, after_step=after_step))
    info.update(
        rc=rc,
        log_times=log_times,
        peak_rss_train_kb=status_kb("VmHWM"),
    )
    info["peak_rss_total_kb"] = max(info.get("peak_rss_setup_kb", 0), info["peak_rss_train_kb"])
    Path(out).write_text(json.dumps(info))
    return rc


if __name__ == "__main__":
    from irdro.engine import exit_rank

    exit_rank(main())  # skips interpreter finalisation (see exit_rank)
