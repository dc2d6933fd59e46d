"""tools/make_deepspeed_env.py: what it selects, and that DeepSpeed's own runner carries every value
it writes to a remote shell unchanged."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from irdro_tools.make_deepspeed_env import ds_parse, main, render, select

# Values a cluster really has, including the ones DeepSpeed has to quote.
AWKWARD = {
    "HF_HOME": "/shared/hf cache/with spaces",
    "NCCL_DEBUG_SUBSYS": "INIT,NET",
    "NCCL_SOCKET_IFNAME": "^docker0,lo",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb=128",
    "IRDRO_NOTE": "it's a (test); a=b & c*d|e <f> ~g #h",
    "IRDRO_EMPTY": "",
    "IRDRO_UNICODE": "héllo wörld",
    "WANDB_TAGS": "a=1,b=2",
    "OMP_NUM_THREADS": "1",
}
UNWRITABLE = {
    "IRDRO_DOLLAR": "$HOME/x",
    "IRDRO_QUOTE": 'say "hi"',
    "IRDRO_BACKTICK": "`id`",
    "IRDRO_BACKSLASH": "a\\b",
    "IRDRO_NEWLINE": "a\nb",
    "IRDRO_PADDED": " padded ",
}


def test_select_prefixes_names_and_nothing_else():
    env = {
        **AWKWARD,
        "PATH": "/usr/bin",
        "HOME": "/root",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTHONPATH": "/src",
        "TRANSFORMERS_CACHE": "/c",
        "MY_VAR": "x",
        "XHF_HOME": "no",
    }
    sel = select(env)
    assert set(sel.exports) == set(AWKWARD) | {
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "PYTHONPATH",
        "TRANSFORMERS_CACHE",
    }
    assert not sel.skipped and not sel.errors
    assert select(env, include=["MY_VAR"]).exports["MY_VAR"] == "x"
    assert "HF_HOME" not in select(env, exclude=["HF_HOME"]).exports


def test_secrets_only_when_named():
    env = {"HF_TOKEN": "hf_abc", "WANDB_API_KEY": "k", "HF_HOME": "/h"}
    sel = select(env)
    assert list(sel.exports) == ["HF_HOME"] and set(sel.skipped) == {"HF_TOKEN", "WANDB_API_KEY"}
    assert select(env, include=["HF_TOKEN"]).exports["HF_TOKEN"] == "hf_abc"


def test_values_deepspeed_would_mangle_are_left_out():
    sel = select({**UNWRITABLE, "IRDRO_OK": "fine"})
    assert list(sel.exports) == ["IRDRO_OK"] and set(sel.skipped) == set(UNWRITABLE)
    assert not sel.errors
    named = select(UNWRITABLE, include=["IRDRO_DOLLAR", "NOT_SET_ANYWHERE"])
    assert any("IRDRO_DOLLAR" in e for e in named.errors)
    assert any("NOT_SET_ANYWHERE" in e and "not set" in e for e in named.errors)


def test_file_format_matches_deepspeed_reader():
    text = render(select(AWKWARD).exports)
    assert text.endswith("\n") and all("=" in line for line in text.splitlines())
    assert not any(line.startswith("#") or not line.strip() for line in text.splitlines())
    parsed = ds_parse(text)
    assert parsed["OMP_NUM_THREADS"] == "1" and parsed["HF_HOME"] == '"/shared/hf cache/with spaces"'


def test_deepspeed_runner_round_trip(tmp_path, monkeypatch):
    """The real `deepspeed` runner (pdsh launcher, the process start faked) reads the file and builds
    its `export K=V; ...` prefix; a shell running that prefix sees exactly our values (pdsh hands
    the joined command to the remote shell the same way)."""
    from deepspeed.launcher import runner

    out = tmp_path / ".deepspeed_env"
    assert main(["--output", str(out)], environ=AWKWARD) == 0
    # What the tool refuses to write, written by hand: each arrives changed.
    mangled = {
        "IRDRO_DOLLAR": "$HOME/x",
        "IRDRO_QUOTE": 'say "hi"',
        "IRDRO_BACKTICK": "`echo x`",
        "IRDRO_BACKSLASH": "a\\\\b",
        "IRDRO_PADDED": " padded ",
    }
    with out.open("a") as f:
        f.write(render(mangled))
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    launched = []

    def fake_popen(cmd, env=None):
        launched.append(cmd)
        return SimpleNamespace(wait=lambda: 0, returncode=0, send_signal=lambda s: None)

    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as m:  # runner patches the global subprocess/signal modules
        m.setattr(runner, "DEEPSPEED_ENVIRONMENT_PATHS", ["."])
        m.setattr(runner, "DEEPSPEED_ENVIRONMENT_NAME", ".deepspeed_env")
        m.setattr(runner.PDSHRunner, "backend_exists", lambda self: True)
        m.setattr(runner.subprocess, "Popen", fake_popen)
        m.setattr(runner.signal, "signal", lambda *a: None)
        runner.main(
            [
                "--hostfile",
                str(tmp_path / "hostfile"),
                "--no_ssh_check",
                "--master_addr",
                "10.0.0.1",
                "--module",
                "irdro.train",
                "r.yaml",
            ]
        )
    (cmd,) = launched
    assert cmd[0] == "pdsh"
    exports = next(x for x in cmd if x.startswith("export "))
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    proc = subprocess.run(
        ["bash", "-c", f"{exports} exec {sys.executable} -c '{dump}'"],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(proc.stdout)
    assert {k: seen.get(k) for k in AWKWARD} == AWKWARD
    assert all(seen.get(k) != v for k, v in mangled.items()), {k: seen.get(k) for k in mangled}


def test_cli_writes_refuses_clobber_and_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DS_ENV_FILE", raising=False)
    env = {"HF_HOME": "/h", "HF_TOKEN": "hf_secret", "PATH": "/bin"}
    assert main(["--include-var", "HF_TOKEN"], environ=env) == 0
    path = tmp_path / ".deepspeed_env"
    assert path.read_text() == "HF_HOME=/h\nHF_TOKEN=hf_secret\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    printed = capsys.readouterr().out
    assert "HF_HOME=/h" in printed and "hf_secret" not in printed and "HF_TOKEN=***" in printed

    assert main([], environ={"HF_HOME": "/other"}) == 1
    assert path.read_text().startswith("HF_HOME=/h\n")
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--overwrite"], environ={"HF_HOME": "/other"}) == 0
    assert path.read_text() == "HF_HOME=/other\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".deepspeed_env"]  # no temp left

    assert main(["--dry-run", "--output", "x"], environ=env) == 0 and not (tmp_path / "x").exists()
    assert main(["--include-var", "NOPE"], environ=env) == 2
    monkeypatch.setenv("DS_ENV_FILE", "custom_env")
    assert main([], environ=env) == 0 and (tmp_path / "custom_env").is_file()


def test_script_help_runs():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "tools/make_deepspeed_env.py", "--help"], cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--include-var" in proc.stdout


@pytest.mark.parametrize("name", sorted(UNWRITABLE))
def test_unwritable_value_named_explicitly_is_an_error(name, tmp_path):
    assert main(["--include-var", name, "--output", str(tmp_path / "e")], environ=UNWRITABLE) == 2
    assert not (tmp_path / "e").exists()
