"""Keep a band of a shard directory's samples by score percentile (a thin front end over irdro.selection).

    python tools/select_data.py --data DIR --scores NAME --keep 0.25:0.75 --output OUT [--plot PNG] [--overwrite]
    python tools/select_data.py --data DIR --scores NAME --drop-top 0.05 [--drop-bottom 0.1] --output OUT

Exit codes: 0 ok, 2 bad arguments, a bad rule or bad input (one-line message on stderr, no
traceback; an existing output is left as it was).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

from irdro import fsio
from irdro.scores import DEFAULT_NAME
from irdro.selection import Selection, parse_rule, select_shards
from irdro.shards import DataError

_DESCRIPTION = """\
Write a new shard directory OUT with the samples of DIR whose score (DIR/scores/NAME, from
tools/score_data.py) lies in a band of percentiles, scores ranked low -> high with ties broken by
sample id: --keep A:B keeps ranks [floor(A*n), floor(B*n)) (0.25:0.75, the paper's "moderately
high" band of a reference model's losses, keeps the middle half); --drop-top F drops the F highest,
--drop-bottom F the F lowest.

OUT holds the kept samples' shards (tokens, masks, doc and chunk ids; the parent's tokenizer info
and seq_len), parent_ids.npy (the parent's sample id of each row), a manifest whose `selection`
records the parent, its manifest sha256, the scores' name and the rule, and OUT/scores/NAME (the
kept samples' scores, so reweight.signal: excess works on OUT), plus a histogram of the scores with
the kept band shaded."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="select_data.py",
        description=_DESCRIPTION,
        epilog=(
            "examples:\n"
            "  python tools/select_data.py --data data/sonnets-smollm2/train --scores reference --keep 0.25:0.75 \\\n"
            "      --output data/sonnets-smollm2-mid\n"
            "  python tools/select_data.py --data data/sonnets-smollm2/train --drop-top 0.05 \\\n"
            "      --output data/sonnets-smollm2-clean"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR", help="shard directory with scores")
    p.add_argument("--scores", default=DEFAULT_NAME, metavar="NAME", help=f"score set (default: {DEFAULT_NAME})")
    p.add_argument("--keep", metavar="A:B", help="keep the percentile band [A, B) of the scores, low -> high")
    p.add_argument("--drop-top", type=float, metavar="F", help="drop the fraction F of highest scores")
    p.add_argument("--drop-bottom", type=float, metavar="F", help="drop the fraction F of lowest scores")
    p.add_argument("--output", required=True, metavar="OUT", help="shard directory to write")
    p.add_argument("--plot", metavar="PNG", help="histogram path (default: OUT/scores_histogram.png)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p


def have_matplotlib() -> bool:
    """Whether the histogram can be drawn (matplotlib is the optional extra `plot`)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_histogram(sel: Selection, path: Path, title: str) -> None:
    """The scores' histogram with the kept band shaded (matplotlib, Agg), written atomically."""
    try:
        import matplotlib
    except ImportError:
        raise DataError("--plot needs matplotlib: pip install -e .[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(sel.scores, bins=min(100, max(10, len(sel.scores) // 20)), color="0.55", label="all samples")
    lo, hi = sel.thresholds
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.3, label=f"kept ({len(sel.kept)})")
    ax.set_xlabel("score (mean NLL per target token)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    fsio.atomic_write_bytes(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    plot = Path(args.plot) if args.plot else Path(args.output) / "scores_histogram.png"
    draw = have_matplotlib()  # decided before OUT is written: a missing extra must not fail after it
    try:
        if args.plot and not draw:
            raise DataError("--plot needs matplotlib: pip install -e .[plot]")
        rule = parse_rule(args.keep, args.drop_top, args.drop_bottom)
        sel = select_shards(args.data, args.scores, rule, args.output, overwrite=args.overwrite)
        if draw:
            plot_histogram(sel, plot, f"{args.data}: {args.scores}, {rule.text}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n, k = len(sel.scores), len(sel.kept)
    lo, hi = sel.thresholds
    kept = sel.scores[sel.kept]
    print(f"rule {rule.text}: scores {lo:.4f} .. {hi:.4f} kept (ranks [{int(rule.lo * n)}, {int(rule.hi * n)}) of {n})")
    print(f"kept {k} of {n} samples ({k / n:.1%}); mean score kept {kept.mean():.4f}, all {np.mean(sel.scores):.4f}")
    histogram = f"histogram {plot}" if draw else "no histogram (matplotlib missing: pip install -e .[plot])"
    print(f"wrote {sel.output}: {sel.manifest.summary()}; {histogram}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
