"""Stopping on purpose: scheduler preemption signals and the exit codes a job script acts on.

Owns: the SIGTERM/SIGUSR1 handlers of a training process (they only record the signal, so a step or
a save in progress always finishes), and the exit codes. Must not: call collectives (the loop agrees
on a stop through `irdro.dist.any_rank` at step boundaries) or save (irdro.train does).

Exit codes of `python -m irdro.train` (and of the `deepspeed` launcher, which passes a rank's on):
0 done, 2 recipe or data error, 3 aborted (non-finite losses), 4 checkpoint save or conversion
failed, 5 another rank died or hung (this one stopped instead of waiting), 75 preempted: a checkpoint
was saved and the same command resumes (`EX_TEMPFAIL`; the sbatch script requeues the job on it).
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_RANK_FAILURE = 5
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """A stop signal reached some rank: every rank saved a checkpoint and stops (`main` exits 75)."""


class RankFailure(RuntimeError):
    """A collective failed because another rank died or hung; the message names it (`main` exits 5)."""


class StopSignals:
    """While active, SIGTERM and SIGUSR1 are recorded instead of ending the process.

    Use as a context manager around the training loop in the main thread; the previous handlers come
    back on exit. `received` is the first signal's name, or None.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
