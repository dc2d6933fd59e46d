"""Run a recipe on N local gloo ranks without the deepspeed launcher (tests and benchmarks).

Owns: spawning `python -m irdro.testing` workers with RANK/WORLD_SIZE/MASTER_* set, and what a
worker reports back (final consolidated weights, per-step records, an error message). Must not be
imported by the training path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from irdro.engine import free_port


@dataclass
class RankRun:
    returncode: int
    records: list[dict]
    error: str | None
    log: str
    modes: list[bool] = field(default_factory=list)
    losses: list[list] = field(default_factory=list)
    layout: dict = field(default_factory=dict)


@dataclass
class Run:
    ranks: list[RankRun]
    state_dict: dict[str, torch.Tensor] | None
    probe_logits: torch.Tensor | None = None

    @property
    def records(self) -> list[dict]:
        return self.ranks[0].records


def spawn_ranks(
    args: list[str], world_size: int, logdir: Path, *, env: dict | None = None, timeout: float = 300.0
) -> list[int]:
    """Run `python *args` as `world_size` local gloo ranks and wait for them; their exit codes.

    Each rank gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* for one fresh local port, one thread,
    PYTHONFAULTHANDLER (a crashing rank logs its Python stack) and `env`; `{rank}` in `args` is
    replaced by its rank; its output goes to logdir/log{rank}.txt. Past `timeout` seconds every
    rank is killed and subprocess.TimeoutExpired raised (a hang is a failure, not a stuck run).
    """
    port = free_port()
    procs = []
    for rank in range(world_size):
        penv = {
            **os.environ,
            **(env or {}),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1",
        }
        cmd = [sys.executable, *(a.replace("{rank}", str(rank)) for a in args)]
        logf = open(logdir / f"log{rank}.txt", "w")  # closed below
        procs.append((subprocess.Popen(cmd, env=penv, stdout=logf, stderr=subprocess.STDOUT), logf))
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p, _ in procs:
            p.kill()
            p.wait()
        raise
    finally:
        for _, f in procs:
            f.close()
    return [p.returncode for p, _ in procs]


def run_ranks(
    recipe: dict,
    world_size: int,
    *,
    nan_at: list[tuple[int, int]] = (),
    add_at: list[tuple[int, int, float]] = (),
    probe: bool = False,
    record: bool = False,
    full_disk_at: tuple[int, int] | None = None,
    stop_at: tuple[int, int, str] | None = None,
    timeout: float = 300.0,
    env: dict | None = None,
    patches: tuple[str, ...] = (),
) -> Run:
    """`_run_ranks`, tried once more on a fresh port when the rendezvous port was taken in between
    (free_port() releases it before the ranks bind it; another process can grab it)."""
    kw = dict(
        nan_at=nan_at,
        add_at=add_at,
        probe=probe,
        record=record,
        full_disk_at=full_disk_at,
        stop_at=stop_at,
        timeout=timeout,
        env=env,
        patches=patches,
    )
    run = _run_ranks(recipe, world_size, **kw)
    if any("EADDRINUSE" in r.log or "address already in use" in r.log.lower() for r in run.ranks):
        run = _run_ranks(recipe, world_size, **kw)
    return run


def _run_ranks(
    recipe: dict,
    world_size: int,
    *,
    nan_at,
    add_at,
    probe: bool,
    record: bool,
    full_disk_at: tuple[int, int] | None,
    stop_at: tuple[int, int, str] | None,
    timeout: float,
    env: dict | None,
    patches: tuple[str, ...],
) -> Run:
    """Train `recipe` (a plain dict) on `world_size` local processes and collect the results.

    Args:
        recipe: the recipe as a dict (validated in the workers).
        world_size: number of gloo ranks.
        nan_at: (step, rank) pairs at which that rank's first per-sample loss is made NaN.
        add_at: (step, micro, value): every rank adds `value` to the losses of that micro-batch of
            that step (changes the weights, not d loss / d theta: forces a deferred-window overflow).
        probe: also return the trained engine's logits on `irdro.export.probe_tokens`.
        record: each rank also reports `modes` (the model's train flag at every train_step) and
            `losses` ([step, micro, grad_enabled, per-sample losses] for every forward of a step).
        patches: names in `PATCHES` applied in every worker before training (negative controls).
        full_disk_at: (step, rank): that rank's DeepSpeed checkpoint writes for the checkpoint after
            `step` optimizer steps fail with ENOSPC (a full disk), after its first file.
        stop_at: (step, rank, how): as 0-based step `step` starts, that rank dies (`how` = "kill":
            SIGKILL) or freezes ("freeze": SIGSTOP, as a hung node); the others must not hang.
        timeout: seconds before every rank is killed (a hang is a failure, not a stuck test run).
    """
    with tempfile.TemporaryDirectory(prefix="irdro-ranks-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "recipe": recipe,
                    "nan_at": [list(x) for x in nan_at],
                    "add_at": [list(x) for x in add_at],
                    "out": tmp,
                    "probe": probe,
                    "record": record,
                    "patches": list(patches),
                    "full_disk_at": full_disk_at,
                    "stop_at": stop_at,
                }
            )
        )
        codes = spawn_ranks(["-m", "irdro.testing", str(spec)], world_size, Path(tmp), env=env, timeout=timeout)
        ranks = []
        for rank, code in enumerate(codes):
            res = Path(tmp) / f"rank{rank}.json"
            data = json.loads(res.read_text()) if res.exists() else {"records": [], "error": None}
            ranks.append(
                RankRun(
                    code,
                    data["records"],
                    data["error"],
                    (Path(tmp) / f"log{rank}.txt").read_text(),
                    data.get("modes", []),
                    data.get("losses", []),
                    data.get("layout", {}),
                )
            )
        sd_path = Path(tmp) / "state_dict.pt"
        sd = torch.load(sd_path) if sd_path.exists() else None
        probe_path = Path(tmp) / "probe_logits.pt"
        return Run(ranks, sd, torch.load(probe_path) if probe_path.exists() else None)


def _world_gather() -> None:
    """The reweighting gather over the whole world instead of the DP group: with SP > 1 every
    sample enters the window SP times."""
    import dataclasses

    from irdro import dist

    dp_gather = dist.all_gather_losses

    def world_gather(local: torch.Tensor) -> torch.Tensor:
        layout = dist.layout()
        dist._layout = dataclasses.replace(layout, dp_group=None)
        try:
            return dp_gather(local)
        finally:
            dist._layout = layout

    dist.all_gather_losses = world_gather


def _sp_sum_local() -> None:
    """The SP sum's backward as the plain upstream gradient (as if the other shards' sums were
    constants), not the adjoint of the sum."""
    from irdro import dist

    dist._SPSum.backward = staticmethod(lambda ctx, grad: grad)


PATCHES = {"world_gather": _world_gather, "sp_sum_local": _sp_sum_local}
"""Deliberate breakages a test can apply in its workers, to show that its comparison has teeth."""


def _worker(spec_path: str) -> int:
    from irdro.checkpoint import gathered_state_dict
    from irdro.config import recipe_from_dict
    from irdro.engine import init_distributed, shutdown_distributed
    from irdro.train import Hooks, setup_logging, train

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    nan_at = {tuple(x) for x in spec["nan_at"]}
    add_at = {(s, m): v for s, m, v in spec["add_at"]}
    record = bool(spec.get("record"))

    out = {"records": [], "error": None, "modes": [], "losses": []}

    def losses_hook(step: int, micro: int, losses: torch.Tensor) -> torch.Tensor:
        if record:
            out["losses"].append([step, micro, torch.is_grad_enabled(), losses.detach().cpu().tolist()])
        if (step, rank) in nan_at and micro == 0:
            losses = losses.clone()
            losses[0] = math.nan
        if (step, micro) in add_at:
            losses = losses + add_at[step, micro]
        return losses

    def before_step(step: int, engine) -> None:
        if record:
            out["modes"].append(bool(engine.module.training))  # the train flag as each step starts
        if spec.get("stop_at") and spec["stop_at"][:2] == [step, rank]:
            if spec["stop_at"][2] == "freeze":  # a hung node, ended by the test harness 60 s later
                subprocess.Popen(["sh", "-c", f"sleep 60; kill -9 {os.getpid()}"], start_new_session=True)
            os.kill(os.getpid(), signal.SIGKILL if spec["stop_at"][2] == "kill" else signal.SIGSTOP)

    def fill_disk(setup) -> None:  # from the second file of that checkpoint on, the disk is full
        step, on_rank = spec["full_disk_at"]
        ce, tag, seen = setup.engine.checkpoint_engine, f"step_{step:08d}", []
        original = ce.save

        def save(state_dict, path, *args, **kwargs):
            if tag in str(path) and rank == on_rank:
                seen.append(path)
                if len(seen) > 1:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return original(state_dict, path, *args, **kwargs)

        ce.save = save

    hooks = Hooks(
        losses=losses_hook if nan_at or add_at or record else None,
        before_step=before_step if record or spec.get("stop_at") else None,
        after_setup=fill_disk if spec.get("full_disk_at") else None,
    )

    for name in spec.get("patches", []):
        PATCHES[name]()
    setup_logging()
    init_distributed(spec["recipe"].get("collective_timeout_minutes", 10.0))
    code = 0
    try:
        result = train(recipe_from_dict(spec["recipe"]), hooks)
        out["records"] = result.records
        from irdro import dist

        out["layout"] = {"dp_ranks": list(dist.layout().dp_ranks), "mp_ranks": list(dist.layout().mp_ranks)}
        sd = gathered_state_dict(result.engine)
        if sd is not None:
            torch.save(sd, Path(spec["out"]) / "state_dict.pt")
        if spec.get("probe"):  # the training engine's logits on fixed tokens (every rank forwards)
            from irdro.export import probe_tokens

            engine = result.engine
            ids = probe_tokens(engine.module.config.vocab_size).to(engine.device)
            engine.eval()
            with torch.no_grad():
                logits = engine(input_ids=ids).logits.float().cpu()
            if rank == 0:
                torch.save(logits, Path(spec["out"]) / "probe_logits.pt")
    except Exception as e:  # reported to the test, which asserts on it
        out["error"] = f"{type(e).__name__}: {e}"
        code = 1
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out, default=float))
    if code == 0:
        shutdown_distributed()
    return code


if __name__ == "__main__":
    from irdro.engine import exit_rank

    exit_rank(_worker(sys.argv[1]))
