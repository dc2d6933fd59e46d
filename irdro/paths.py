"""The recipe's local inputs: whether each path-valued key names something here, and what makes it.

Owns: the rule that every path in a recipe (`model.path`, `model.tokenizer`, `data.train`,
`data.eval`, `ds_config`) names something on this machine, and the one-line error for one that is
missing: the dotted key, the path as written and the command that makes it. The entry points
(irdro.validate, irdro.train) call `check_local_paths` before anything heavy; the model loaders call
`require_local` for their own key.

The rule: irdro never downloads. A value such as `facebook/opt-125m` is a relative local path like
any other; if no such folder exists, the error says how to download it with `hf download` into a
folder, instead of transformers going to the model hub (and, offline, retrying for a minute).

Must not: import torch or transformers, read the inputs (their loaders do), or touch the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from irdro.config import DS_CONFIG_HOW, ConfigError, Recipe, missing_path, resolve_path

# What a bare model hub id looks like: `org/name`, one slash, no leading `.`, `~` or `/`; `org` is
# not one of the local roots this repository's recipes use.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LOCAL_ROOTS = ("models", "assets", "data", "runs")

# Folders this repository makes itself (tools/fetch_assets.py, the Makefile's demo-data target).
_DEMO_DATA = ("assets/gpt2-tokenizer", "data/sonnets/train", "data/sonnets/eval")


def looks_like_hub_id(value: str) -> bool:
    """`org/name` as on the model hub (still read as a local path; only the error message differs)."""
    return bool(_HUB_ID.fullmatch(value)) and value.split("/")[0] not in _LOCAL_ROOTS


def _how_model(key: str, value: str) -> str:
    """How to make the model or tokenizer folder `value` (irdro's own assets, else `hf download`)."""
    name = Path(value).name.lower()
    if "gpt2" in name and key == "model.tokenizer":
        return f"make it with `python tools/fetch_assets.py gpt2-tokenizer --output {value}`"
    if "smollm2" in name:
        return f"make it with `python tools/fetch_assets.py smollm2 --output {value}`"
    if looks_like_hub_id(value):
        local = f"models/{value.split('/')[1]}"
        return (
            f"irdro never downloads from the model hub: `hf download {value} --local-dir {local}`, "
            f"then set {key}={local}"
        )
    return f"it must be a local Hugging Face folder (irdro never downloads): `hf download ORG/NAME --local-dir {value}`"


def _how_data(value: str, tokenizer: str) -> str:
    """The tools/prepare_data.py command that writes the shard directory `value`."""
    p = Path(value)
    if p.name in ("train", "eval"):  # --eval-fraction writes OUTPUT/train and OUTPUT/eval
        return (
            f"make it with `python tools/prepare_data.py --input FILE --tokenizer {tokenizer} "
            f"--output {p.parent} --eval-fraction 0.1`"
        )
    return f"make it with `python tools/prepare_data.py --input FILE --tokenizer {tokenizer} --output {value}`"


def how_to_make(key: str, value: str, tokenizer: str | None = None) -> str:
    """The second half of the missing-path error: the command that makes `value` for `key`.

    Args:
        key: dotted recipe key (`model.path`, `model.tokenizer`, `data.train`, `data.eval`,
            `ds_config`).
        value: the path as written in the recipe.
        tokenizer: the recipe's tokenizer folder, for the data commands.
    """
    if key == "ds_config":
        return DS_CONFIG_HOW
    if key.startswith("data."):
        how = _how_data(value, tokenizer or "TOKENIZER_DIR")
    else:
        how = _how_model(key, value)
    if os.path.normpath(value) in _DEMO_DATA:
        return f"make it with `make demo-data` (or {how.removeprefix('make it with ')})"
    return how


def require_local(
    key: str,
    value: str,
    *,
    kind: Literal["dir", "file"] = "dir",
    resolve: bool = True,
    tokenizer: str | None = None,
) -> Path:
    """The local path a recipe key names, or a one-line `ConfigError` saying how to make it.

    Args:
        key: dotted recipe key, named in the error.
        value: the path as written in the recipe.
        kind: "dir" or "file", what `value` must be.
        resolve: look it up like irdro.config.resolve_path (working directory, then the repository
            root); False: relative to the working directory only (how data directories are opened).
        tokenizer: the recipe's tokenizer folder, for the commands that make data directories.

    Raises:
        ConfigError: the path does not exist, or is a file where a folder is needed (or vice versa).
    """
    path = resolve_path(value) if resolve else Path(value)
    if not path.exists():
        if value.startswith("~") and Path(value).expanduser().exists():
            home = Path(value).expanduser()
            raise ConfigError(f"{key}: {value}: recipes do not expand ~; write {home}")
        raise missing_path(key, value, how_to_make(key, value, tokenizer))
    if kind == "dir" and not path.is_dir():
        what = "shard directory" if key.startswith("data.") else "Hugging Face folder"
        raise ConfigError(f"{key}: {value} is a file; name the {what} instead")
    if kind == "file" and not path.is_file():
        raise ConfigError(f"{key}: {value} is a folder, not a file; {how_to_make(key, value)}")
    return path


def check_local_paths(r: Recipe) -> None:
    """Check that every path the recipe names exists, before any process group or model load.

    Args:
        r: a loaded recipe (irdro.config.load_recipe).

    Raises:
        ConfigError: the first missing one, naming its key and the command that makes it.
    """
    m = r.model
    tokenizer = m.tokenizer if m.tokenizer is not None else m.path
    if m.path is not None:
        require_local("model.path", m.path)
    if m.tokenizer is not None:
        require_local("model.tokenizer", m.tokenizer)
    for split in ("train", "eval"):
        for key, source in r.data.labelled_sources(split):  # opened as given (relative to the working directory)
            require_local(key, source.path, resolve=False, tokenizer=tokenizer)
    require_local("ds_config", r.ds_config, kind="file")
