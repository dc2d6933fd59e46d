"""Write a `.deepspeed_env` that carries this shell's training variables to every node.

    python tools/make_deepspeed_env.py [--output ./.deepspeed_env] [--overwrite]
        [--include-var NAME ...] [--exclude-var NAME ...] [--dry-run]

The `deepspeed` launcher, when it starts remote nodes itself (pdsh, the default, or the
openmpi/mpich/impi/mvapich/slurm launchers), reads `~/.deepspeed_env` and then `./.deepspeed_env`
(the file name is `$DS_ENV_FILE` when that is set) on the launching node and exports every line to
every node. It does not read them with `--no_ssh`, where each node's launcher keeps its own
environment. See docs/multinode.md.

Exit codes: 0 written (or shown, with --dry-run); 1 the output exists and --overwrite was not
given; 2 a variable asked for with --include-var is unset or cannot be written, or a bad argument.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from irdro.fsio import atomic_write_text

PREFIXES = ("HF_", "WANDB_", "NCCL_", "TORCH_NCCL_", "OMP_", "TRANSFORMERS_", "IRDRO_")
"""Every set variable starting with one of these is exported."""

NAMES = (
    "PYTHONPATH",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "CUDA_LAUNCH_BLOCKING",
    "PYTORCH_CUDA_ALLOC_CONF",
    "TORCH_DISTRIBUTED_DEBUG",
    "TORCH_EXTENSIONS_DIR",
    "TOKENIZERS_PARALLELISM",
    "GLOO_SOCKET_IFNAME",
    "DEEPSPEED_TIMEOUT",
)
"""These are exported when set."""

# Written in plain text on a shared disk: left out unless named with --include-var.
_SECRET = re.compile(r"TOKEN|API_KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# DeepSpeed (MultiNodeRunner.add_export) double-quotes a value with any character outside this
# class, for the remote shell; inside double quotes these characters would still be interpreted.
_DS_PLAIN = re.compile(r"[^\w@%+=:,./-]")
_UNQUOTABLE = set('"$`\\')


def ds_env_path() -> Path:
    """Where the launcher looks in the directory it is started from: ./$DS_ENV_FILE or ./.deepspeed_env."""
    return Path(".") / os.environ.get("DS_ENV_FILE", ".deepspeed_env")


def problem(name: str, value: str) -> str | None:
    """Why `name=value` would not reach the nodes unchanged through DeepSpeed's parser (it splits
    each line at the first `=`, strips both sides, and double-quotes values for the remote shell);
    None when it would."""
    if not _NAME.fullmatch(name):
        return "not a shell variable name"
    if any(c in value for c in "\n\r\0"):
        return "contains a line break (the file holds one variable per line)"
    if value != value.strip():
        return "has leading/trailing whitespace (DeepSpeed strips it)"
    bad = sorted(_UNQUOTABLE & set(value))
    if bad:
        return f"contains {' '.join(bad)} (the remote shell would interpret it inside DeepSpeed's quotes)"
    return None


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


@dataclass
class Selection:
    exports: dict[str, str] = field(default_factory=dict)
    """name -> value, in the order written."""
    skipped: dict[str, str] = field(default_factory=dict)
    """name -> why it was left out."""
    errors: list[str] = field(default_factory=list)
    """Problems with variables the user named explicitly."""


def select(environ: Mapping[str, str], include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Selection:
    """The variables of `environ` to export: `PREFIXES`, `NAMES` and `include`, minus `exclude`,
    secrets (unless in `include`) and values DeepSpeed cannot pass on."""
    include, exclude = list(dict.fromkeys(include)), set(exclude)
    sel = Selection()
    for name in include:
        if name not in environ:
            sel.errors.append(f"--include-var {name}: not set in this environment")
    wanted = sorted(n for n in environ if n.startswith(PREFIXES) or n in NAMES or n in include)
    for name in wanted:
        value = environ[name]
        if name in exclude:
            continue
        if is_secret(name) and name not in include:
            sel.skipped[name] = f"looks like a secret; pass --include-var {name} to export it"
            continue
        why = problem(name, value)
        if why is not None:
            sel.skipped[name] = why
            if name in include:
                sel.errors.append(f"--include-var {name}: {why}")
            continue
        sel.exports[name] = value
    return sel


def render(exports: Mapping[str, str]) -> str:
    """One `KEY=VALUE` line per variable. No comments or blank lines: DeepSpeed's reader splits
    every line at `=` and fails on a line without one."""
    return "".join(f"{k}={v}\n" for k, v in exports.items())


def ds_parse(text: str) -> dict[str, str]:
    """What DeepSpeed 0.19's runner makes of the file (runner.main + MultiNodeRunner.add_export):
    name -> the word it puts after `export NAME=` in the remote command."""
    out = {}
    for line in text.splitlines(keepends=True):
        key, val = line.split("=", maxsplit=1)
        val = val.strip()
        out[key.strip()] = f'"{val}"' if _DS_PLAIN.search(val) else val
    return out


def write_atomic(path: Path, text: str, overwrite: bool) -> None:
    """Write `text` to `path` (mode 0600) through a temporary file and a rename."""
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    atomic_write_text(path, text, mode=0o600)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Write a .deepspeed_env from the current environment: every set "
            + ", ".join(p + "*" for p in PREFIXES)
            + " and "
            + ", ".join(NAMES)
            + " variable, one KEY=VALUE per line. The deepspeed launcher exports these lines to "
            "every node when it starts the nodes itself (pdsh/mpi/slurm launchers; not with "
            "--no_ssh). Secrets (*TOKEN*, *API_KEY*, ...) are left out unless named with "
            "--include-var. Values DeepSpeed would mangle (line breaks, surrounding spaces, "
            'the characters " $ ` \\) are left out with a warning.'
        ),
        epilog="exit codes: 0 written, 1 output exists (use --overwrite), 2 bad variable or argument",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="file to write (default: ./$DS_ENV_FILE or ./.deepspeed_env, where the "
        "launcher looks when started from this directory; ~/.deepspeed_env "
        "is read too)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument(
        "--include-var",
        action="append",
        default=[],
        metavar="NAME",
        help="also export NAME (repeatable); an error if it is unset",
    )
    parser.add_argument(
        "--exclude-var",
        action="append",
        default=[],
        metavar="NAME",
        help="do not export NAME (repeatable), e.g. a per-node NCCL_IB_HCA",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would be written")
    return parser


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sel = select(os.environ if environ is None else environ, args.include_var, args.exclude_var)
    for name, why in sel.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    if sel.errors:
        for e in sel.errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    text = render(sel.exports)
    assert ds_parse(text).keys() == sel.exports.keys()  # every line survives DeepSpeed's reader
    path = args.output.expanduser() if args.output is not None else ds_env_path()
    if not args.dry_run:
        try:
            write_atomic(path, text, args.overwrite)
        except FileExistsError:
            print(f"error: {path} exists; pass --overwrite to replace it", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"error: cannot write {path}: {e}", file=sys.stderr)
            return 2
    verb = "would write" if args.dry_run else "wrote"
    count = len(sel.exports)
    print(f"{verb} {path} ({count} variable{'' if count == 1 else 's'})")
    for name, value in sel.exports.items():
        print(f"  {name}={'***' if is_secret(name) else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
