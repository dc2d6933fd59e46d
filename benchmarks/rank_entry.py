"""One training rank for the benchmarks: `python benchmarks/rank_entry.py OUT_JSON RECIPE [k=v ...]`
(OUT_JSON may contain `{rank}`, so the deepspeed launcher can start it: `deepspeed --num_gpus 2
--no_local_rank benchmarks/rank_entry.py 'out.{rank}.json' RECIPE`).

Runs `irdro.train.main` unchanged, but resets the kernel's peak-RSS counter (VmHWM, via
/proc/self/clear_refs) once setup is done (model loaded, engine built), so the peak it reports is
the training loop's, not the model load's. Writes {rank, rc, peak_rss_train_kb, rss_after_setup_kb,
peak_rss_setup_kb, peak_rss_total_kb} to OUT_JSON.
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
    import irdro.train as train_mod

    info: dict = {"rank": int(os.environ.get("RANK", "0"))}
    original_setup = train_mod.setup

    def setup(recipe):
        result = original_setup(recipe)
        info["rss_after_setup_kb"] = status_kb("VmRSS")
        info["peak_rss_setup_kb"] = status_kb("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return result

    train_mod.setup = setup  # train() looks `setup` up in its module at call time
    # Wall-clock time of every metrics record (logged once per step): the interval between two
    # records is the whole loop iteration (data, step, token count, grad norm, logging).
    log_times: list[tuple[int, float]] = []
    original_log = train_mod.RankZeroLogger.log

    def log(self, record):
        log_times.append((int(record.get("step", -1)), time.perf_counter()))
        return original_log(self, record)

    train_mod.RankZeroLogger.log = log
    rc = train_mod.main(argv)
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
