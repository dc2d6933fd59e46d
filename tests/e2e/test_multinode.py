"""Multi-node launching (docs/multinode.md). Two "nodes" on loopback: one `deepspeed --no_ssh
--node_rank R` launcher per node, one rank each, give the same run as one launcher with two ranks.
tools/slurm/irdro.sbatch, run against stand-ins for srun/scontrol/deepspeed, launches exactly that
form on every node."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ROOT, launcher, smoke_command

from irdro.checkpoint import check_complete, consolidated_fp32
from irdro.testing import free_port

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
OVERRIDES = (
    "max_steps=3",
    "reweight.window=step",
    "checkpoint.at_end=true",
    "eval.max_samples=4",
    "log.progress=false",
    "log.tensorboard=false",
)
TAG = "step_00000003"
TOL = 1e-6


def node_command(run_dir: Path, data: Path, tokenizer: Path, hostfile: Path, node_rank: int, port: int) -> list[str]:
    """The documented `--no_ssh` form: what each node of tools/slurm/irdro.sbatch runs."""
    one_node = smoke_command(run_dir, data, tokenizer, *OVERRIDES)
    return [
        launcher(),
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        str(node_rank),
        "--num_nodes",
        "2",
        "--num_gpus",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        *one_node[one_node.index("--module") :],
    ]


def run_nodes(
    cmds: list[list[str]],
    logs: list[Path],
    timeout: float,
    stop: Callable[[list[subprocess.Popen]], bool] | None = None,
) -> list[int | None]:
    """Start every node's launcher in its own session, output to `logs`; return their exit codes
    (None: still running at the timeout, or when `stop(procs)` said so, then killed). A node that
    fails ends the others at once (its peers would wait for it until the process-group timeout),
    and every launcher's process group is killed on the way out."""
    procs = []
    try:
        for cmd, path in zip(cmds, logs, strict=True):
            with open(path, "w") as log:
                procs.append(
                    subprocess.Popen(
                        cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs) or (stop and stop(procs)):
                break
            time.sleep(0.2)
        return [p.poll() for p in procs]
    finally:
        for p in procs:  # the launcher, deepspeed.launcher.launch and the rank share one group
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def logged_steps(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_nodes_no_ssh_equal_one_node_two_ranks(tmp_path, smoke_data, gpt2_tokenizer_dir):
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    t0 = time.monotonic()
    ref_cmd = smoke_command(one, smoke_data, gpt2_tokenizer_dir, *OVERRIDES, port=free_port())
    ref_log = tmp_path / "one_node.log"
    assert run_nodes([ref_cmd], [ref_log], timeout=480) == [0], ref_log.read_text()[-3000:]
    t1 = time.monotonic()

    hostfile = tmp_path / "hostfile"  # names are labels under --no_ssh; they need not resolve
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    cmds = [node_command(two, smoke_data, gpt2_tokenizer_dir, hostfile, r, port) for r in (0, 1)]
    log_paths = [tmp_path / f"node{r}.log" for r in (0, 1)]
    codes = run_nodes(cmds, log_paths, timeout=480)
    logs = [p.read_text() for p in log_paths]
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(x[-3000:] for x in logs)
    print(f"1 node x 2 ranks: {t1 - t0:.1f} s; 2 nodes x 1 rank: {time.monotonic() - t1:.1f} s")

    for r in (0, 1):  # really one rank per launcher, in one world of two
        assert f"nnodes=2, num_local_procs=1, node_rank={r}" in logs[r]
        assert "dist_world_size=2" in logs[r]
    assert json.loads((two / "ds_config.json").read_text())["train_batch_size"] == 16
    marker = json.loads((two / "checkpoints" / TAG / "irdro_complete.json").read_text())
    assert marker["world_size"] == 2 and check_complete(two / "checkpoints" / TAG) is None
    assert {"irdro_rng_rank0.pkl", "irdro_rng_rank1.pkl"} <= set(marker["files"])

    ref_steps, got_steps = logged_steps(one), logged_steps(two)
    assert [x["step"] for x in got_steps] == [x["step"] for x in ref_steps] == [0, 1, 2, 3]
    for a, b in zip(ref_steps, got_steps, strict=True):
        for key in ("loss", "weighted_loss", "ess", "max_weight", "grad_norm", "lr", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOL, (a["step"], key, a[key], b[key])
        assert a.get("tokens") == b.get("tokens")

    ref_sd = consolidated_fp32(one / "checkpoints" / TAG)
    got_sd = consolidated_fp32(two / "checkpoints" / TAG)
    assert ref_sd.keys() == got_sd.keys()
    worst = max(float((ref_sd[k].contiguous().detach() - got_sd[k].contiguous().detach()).abs().max()) for k in ref_sd)
    assert worst <= TOL, f"parameters differ by up to {worst:.3g}"
    print(f"max |param difference| = {worst:.3g}")


@pytest.mark.distributed
@pytest.mark.slow
def test_hung_nodes_are_killed(tmp_path, smoke_data, gpt2_tokenizer_dir):
    """Node 0 freezes mid-run (SIGSTOP), so node 1 blocks in the next collective: run_nodes kills
    both launchers and everything they started. (Frozen after the start-up, not during it: a rank
    killed while it loads DeepSpeed's JIT op can leave a stale lock in ~/.cache/torch_extensions
    that hangs every later run on the machine.)"""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, run_dir = free_port(), tmp_path / "run"
    cmds = [node_command(run_dir, smoke_data, gpt2_tokenizer_dir, hostfile, r, port) + ["max_steps=50"] for r in (0, 1)]
    frozen_at: list[float] = []

    def freeze_node0(procs: list[subprocess.Popen]) -> bool:
        if not frozen_at and (run_dir / "metrics.jsonl").exists():  # step 0 eval: past start-up
            os.killpg(procs[0].pid, signal.SIGSTOP)
            frozen_at.append(time.monotonic())
        return bool(frozen_at) and time.monotonic() - frozen_at[0] > 3

    logs = [tmp_path / f"node{r}.log" for r in (0, 1)]
    codes = run_nodes(cmds, logs, timeout=300, stop=freeze_node0)
    assert frozen_at, "the run never got past start-up:\n" + logs[0].read_text()[-2000:]
    assert codes == [None, None], f"node 1 did not wait for the frozen node 0: {codes}"
    text = "".join(p.read_text() for p in logs)
    rank_pids = [int(x) for x in re.findall(r"process (\d+) spawned", text)]
    deadline = time.monotonic() + 10
    alive = list(rank_pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if pid_exists(pid)]
        time.sleep(0.1)
    assert len(rank_pids) == 2 and not alive, f"ranks {alive} outlived run_nodes"


def pid_exists(pid: int) -> bool:
    """A live (not zombie) process `pid`."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
def test_no_ssh_launch_needs_a_hostfile(tmp_path):
    """Without a hostfile the launcher knows only localhost: --num_nodes 2 is refused at once, even
    with --no_ssh (docs/multinode.md: every node needs the same hostfile)."""
    cmd = [
        launcher(),
        "--hostfile",
        str(tmp_path / "missing"),
        "--no_ssh",
        "--node_rank",
        "1",
        "--num_nodes",
        "2",
        "--num_gpus",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "--module",
        "irdro.train",
        "recipes/tiny/cpu_smoke.yaml",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no extra nodes available via hostfile" in proc.stderr + proc.stdout


SBATCH = ROOT / "tools" / "slurm" / "irdro.sbatch"
# Stand-ins: scontrol lists two nodes; srun runs its command once per node with SLURM_NODEID set;
# deepspeed records its arguments and the hostfile it was given.
FAKE_SCONTROL = """[ "$1 $2" = "show hostnames" ] && printf "gpu-a\\ngpu-b\\n"
[ "$1" = requeue ] && echo "$2" >> "$FAKE_OUT/requeued"
exit 0
"""
FAKE_SRUN = """while [ "${1#-}" != "$1" ]; do echo "$1" >> "$FAKE_OUT/srun.opts"; shift; done
for i in 0 1; do SLURM_NODEID=$i "$@" || exit $?; done
"""
FAKE_DEEPSPEED = """tag=${SLURM_NODEID:-pdsh}
printf '%s\\n' "$@" > "$FAKE_OUT/deepspeed.$tag"
cp "$2" "$FAKE_OUT/hostfile.$tag"
if [ -n "${FAKE_RANK:-}" ] && [ "$tag" = 0 ]; then  # a rank that checkpoints and exits 75 on SIGUSR1
    bash -c 'trap "echo USR1 >> $FAKE_OUT/rank.signals; exit 75" USR1; touch $FAKE_OUT/rank.up
             while :; do sleep 0.05; done' -m irdro.train --local_rank=0
    exit $?
fi
"""


def sbatch_env(tmp_path: Path, **env: str) -> dict:
    """The environment of the sbatch script as SLURM would start it on the first of two 4-GPU nodes,
    submitted from a checkout at tmp_path/repo (links to this one), with the stand-ins first on PATH."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    repo.mkdir(exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    for name in ("irdro", "recipes", "ds_configs", "tools"):
        if not (repo / name).exists():
            (repo / name).symlink_to(ROOT / name)
    for name in ("assets/gpt2-tokenizer", "data/sonnets/train", "data/sonnets/eval"):
        # the smoke recipe's inputs: irdro.validate checks that they exist, nothing reads them
        (repo / name).mkdir(parents=True, exist_ok=True)
    for name, body in (
        ("scontrol", FAKE_SCONTROL),
        ("srun", FAKE_SRUN),
        ("deepspeed", FAKE_DEEPSPEED),
    ):
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    python_bin = Path(sys.executable).parent  # the real python, for irdro.validate
    run_env = {
        **os.environ,
        "PATH": f"{bin_dir}:{python_bin}:/usr/bin:/bin",
        "FAKE_OUT": str(tmp_path),
        "SLURM_SUBMIT_DIR": str(repo),
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_PER_TASK": "16",
        **env,
    }
    for name in (
        "VENV",
        "MASTER_ADDR",
        "MASTER_PORT",
        "HOSTFILE",
        "GPUS_PER_NODE",
        "LAUNCH",
        "DS_ENV_FILE",
    ):
        if name not in env:
            run_env.pop(name, None)
    return run_env


def run_sbatch(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the sbatch script (see `sbatch_env`) to its end."""
    run_env = sbatch_env(tmp_path, **env)
    return subprocess.run(["bash", str(SBATCH), *args], env=run_env, capture_output=True, text=True, timeout=120)


def test_sbatch_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_runs_one_no_ssh_launcher_per_node(tmp_path):
    args = ("recipes/tiny/cpu_smoke.yaml", "max_steps=3", "output_dir=runs/with space")
    proc = run_sbatch(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hostfile = tmp_path / "repo" / ".irdro_hostfile.4242"
    for r in (0, 1):
        argv = (tmp_path / f"deepspeed.{r}").read_text().splitlines()
        assert argv == [
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(r),
            "--num_nodes",
            "2",
            "--num_gpus",
            "4",
            "--master_addr",
            "gpu-a",
            "--master_port",
            str(20000 + 4242),
            "--module",
            "irdro.train",
            *args,
        ]
        assert (tmp_path / f"hostfile.{r}").read_text() == "gpu-a slots=4\ngpu-b slots=4\n"
    opts = (tmp_path / "srun.opts").read_text().split()
    assert "--nodes=2" in opts and "--ntasks-per-node=1" in opts and "--kill-on-bad-exit=1" in opts
    assert not hostfile.exists()  # removed when the job ends


def test_sbatch_pdsh_mode_runs_one_launcher(tmp_path):
    proc = run_sbatch(tmp_path, "recipes/tiny/cpu_smoke.yaml", LAUNCH="pdsh", MASTER_PORT="31000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = (tmp_path / "deepspeed.pdsh").read_text().splitlines()
    assert argv[argv.index("--launcher") + 1] == "pdsh" and "--no_ssh" not in argv
    assert argv[argv.index("--master_port") + 1] == "31000"
    assert not (tmp_path / "deepspeed.0").exists()
    env_file = tmp_path / "repo" / ".deepspeed_env"  # written for pdsh, in the submit directory
    assert env_file.is_file() and stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_sbatch_checks_batch_arithmetic_before_launching(tmp_path):
    proc = run_sbatch(tmp_path, "recipes/tiny/cpu_smoke.yaml", "global_batch_size=16")
    assert proc.returncode == 2 and "global_batch_size" in proc.stderr
    assert "2 = 16" not in proc.stderr and "8 = 64" in proc.stderr  # 2 nodes x 4 GPUs
    assert not list(tmp_path.glob("deepspeed.*"))


def test_hostfile_example_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(ROOT / "tools" / "hostfile.example"))
    assert list(pool.items()) == [("node-0", 8), ("node-1", 8)]


def test_sbatch_forwards_the_stop_signal_and_requeues_on_75(tmp_path):
    """SLURM signals the batch shell (--signal=B:USR1@120); the trap passes SIGUSR1 to the ranks on its
    node, training exits 75 after its checkpoint, and the script requeues the job and exits 75."""
    import signal
    import time

    text = SBATCH.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
    job = subprocess.Popen(
        ["bash", str(SBATCH), "recipes/tiny/cpu_smoke.yaml"],
        env=sbatch_env(tmp_path, FAKE_RANK="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while not (tmp_path / "rank.up").exists():
        assert job.poll() is None and time.time() < deadline, job.stdout.read() if job.poll() is not None else ""
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 75, out
    assert (tmp_path / "rank.signals").read_text() == "USR1\n"
    assert (tmp_path / "requeued").read_text() == "4242\n"
    assert "requeueing job 4242" in out
