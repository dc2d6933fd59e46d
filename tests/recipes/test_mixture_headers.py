"""A mixture recipe's header makes what it reads: every listed source's train/ and eval/ directory is the
output of a `tools/prepare_data.py` command in the header (with --eval-fraction, which writes both)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from irdro.config import header_commands

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
MIXTURES = [p for p in RECIPES if isinstance(yaml.safe_load(p.read_text())["data"]["train"], list)]


def test_there_are_mixture_recipes() -> None:
    assert {p.name for p in MIXTURES} >= {"cpu_mixture.yaml", "slimpajama_mixture.yaml"}


@pytest.mark.parametrize("path", MIXTURES, ids=lambda p: str(p.relative_to(ROOT)))
def test_header_prepares_every_source(path: Path) -> None:
    recipe = yaml.safe_load(path.read_text())
    prepared = {}
    for argv in header_commands(path):
        if argv[1] == "tools/prepare_data.py":
            opts = dict(zip(argv[2::2], argv[3::2], strict=False))
            assert float(opts["--eval-fraction"]) > 0, argv
            prepared[opts["--output"]] = opts
    assert prepared, "no prepare_data command in the header"
    for key in ("train", "eval"):
        for source in recipe["data"][key]:
            split = Path(source["path"])
            assert split.name == key, source
            # A header may give one command for all sources with NAME standing for each.
            out = str(split.parent)
            templated = out.replace(f"/{source['name']}", "/NAME")
            assert out in prepared or templated in prepared, f"{source['path']}: no prepare_data --output {out}"
