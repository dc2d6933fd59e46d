"""Plot what the reweighting did to a run's data (a thin front end over irdro.observe).

    python tools/plot_weights.py RUN_DIR [--output DIR] [--step N] [--show-text K]

Needs a run trained with `log.samples_every=N` (per-sample dumps in RUN_DIR/samples/) and
matplotlib (`pip install -e .[plot]`).

Exit codes: 0 ok, 2 bad run directory, no dumps (a mixture run without dumps still gets its
per-source table and sources.png, exit 0), or a missing input (one-line message on stderr, no
traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys

from irdro.observe import (
    ObserveError,
    check_run_dir,
    decode_samples,
    describe_reweighting,
    format_picks,
    load_dumps,
    load_metrics,
    make_figures,
    make_source_figure,
    pick_samples,
    source_names,
    summarise,
    summarise_sources,
)
from irdro.rundir import RunDir

_DESCRIPTION = """\
Write PNGs that show what hard-sample reweighting does to a run's data, from the per-sample dumps
(RUN_DIR/samples/step_<N>.jsonl, written every log.samples_every steps) and RUN_DIR/metrics.jsonl:

  weight_vs_loss.png   every dumped sample: loss vs weight, coloured by step (weight 0 = discarded)
  loss_by_weight.png   histogram of each sample's loss minus its window's mean, split into the
                       discarded (weight 0), the top-weighted quarter of each window and the rest
  ess_max_weight.png   effective sample size and max weight over steps; loss and weighted loss
  sources.png          mixtures only (data.train a list of sources): each source's weight share
                       (solid), sample share (dashed) and group_dro alpha (dotted) over steps
  overview.png         the four panels of the first three files in one figure

The printed summary of a mixture run ends with a table per source: mean sample share, mean weight
share, their ratio (> 1: the weights favour the source), last epoch and last alpha. A mixture run
without dumps still gets that table and sources.png.

--show-text K prints the K samples with the highest loss over their window's mean, the K with
the highest weight, and K that got weight 0 despite an above-mean loss ("discarded as noise"),
decoded through the run's recipe.yaml (data.train) and tokenizer (RUN_DIR/hf)."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(
        description=_DESCRIPTION,
        epilog=(
            "examples:\n"
            "  deepspeed --num_gpus 2 --module irdro.train recipes/tiny/cpu_smoke.yaml \\\n"
            "      output_dir=runs/demo log.samples_every=1\n"
            "  python tools/plot_weights.py runs/demo\n"
            "  python tools/plot_weights.py runs/demo --step 30 --show-text 3"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run's output_dir")
    parser.add_argument("--output", metavar="DIR", help="where to write the PNGs (default: RUN_DIR/plots)")
    parser.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="only the dump of step N (file names get a _step_<N> suffix; default: all dumps)",
    )
    parser.add_argument(
        "--show-text",
        type=int,
        default=0,
        metavar="K",
        help="print the text of K hardest, K highest-weight and K discarded samples (default: 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.show_text < 0:
            raise ObserveError(f"--show-text must be >= 0, got {args.show_text}")
        run_dir = check_run_dir(args.run_dir)
        metrics = load_metrics(run_dir)
        output = args.output or run_dir / "plots"
        title = describe_reweighting(run_dir)
        try:
            dumps = load_dumps(run_dir, args.step, progress=not args.no_progress)
        except ObserveError as e:
            if args.step is not None or args.show_text or not source_names(metrics):
                raise
            # A mixture's per-source shares come from metrics.jsonl alone.
            logging.warning("%s; writing only the per-source plot", e)
            print(summarise_sources(metrics))
            print(f"wrote {make_source_figure(metrics, output, title=title)}")
            return 0
        if not metrics:
            logging.warning("%s has no metrics; skipping the ESS panel", RunDir(run_dir).metrics)
        print(summarise(dumps, metrics))
        paths = make_figures(dumps, metrics, output, args.step, title)
        for path in paths:
            print(f"wrote {path}")
        if args.show_text:
            groups = pick_samples(dumps, args.show_text)
            ids = sorted({p.sample_id for picks in groups.values() for p in picks})
            print()
            print(format_picks(groups, decode_samples(run_dir, ids)))
    except ObserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
