"""The tools as console scripts (setup.cfg) and as `python tools/X.py`, neither editing sys.path."""

from __future__ import annotations

import configparser
import importlib
import subprocess
import sys

import pytest
from helpers import ROOT


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> "module:function"."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


SCRIPTS = console_scripts()
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem != "__init__")


def test_every_tool_but_the_demo_is_a_console_script() -> None:
    """The demo runs the repository's recipes and fixtures, so it stays `make demo`."""
    targets = {target.split(":")[0] for target in SCRIPTS.values()}
    assert targets == {f"irdro_tools.{tool}" for tool in TOOLS if tool != "demo"}
    assert all(
        name == "irdro-" + target.split(".")[1].split(":")[0].replace("_", "-") for name, target in SCRIPTS.items()
    )


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_target_shows_help(name: str, capsys) -> None:
    module, function = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_edits_no_sys_path(tool: str) -> None:
    assert "sys.path" not in (ROOT / "tools" / f"{tool}.py").read_text()


@pytest.mark.parametrize("tool", ["fetch_assets", "plot_weights", "select_data"])
def test_script_runs_from_any_directory(tool: str, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {tool}.py"), proc.stderr
