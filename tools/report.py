#!/usr/bin/env python
"""Paper-style table of transfer runs (mean±std over trials, delta to a baseline): VOC and COCO
detection, COCO keypoints (AP^kp), LVIS (AP^mk, APr / APc / APf), Cityscapes (AP^mk) or semantic
segmentation (mIoU), one task per table.

    python tools/report.py supervised='out/sup_*' moco_v2='out/moco_*' --baseline supervised \\
        --output-dir out/report
    python tools/report.py --curves output/pretrain/run_a output/pretrain/run_b --output-dir out/c

Each LABEL=PATTERN names one pretraining; PATTERN (expanded here) matches run folders holding
final_metrics.json. Prints the Markdown table and, for every two labels, the paired difference of
their trials matched by detection seed (final_metrics.json "seed"): mean, 95% CI and one-sided p
(scipy), as the pipeline's report gives them; trials whose seed the other label lacks are named
and left out. Writes to --output-dir transfer.md (with those lines and what was run), transfer.csv
(per label), transfer_trials.csv (one row per run: label, seed, APs, iterations, weights sha256),
transfer.png and .pdf (AP bars: mean, sample-std whiskers, each trial's dot),
and curves.png and .pdf: the training curves (a loss panel per objective, kNN top-1, lr over
iterations) of the --curves runs overlaid, else of the groups' runs. (The pipeline's report
folder holds the same figure of its pretraining runs as pretraining_curves.png.)
"""

import argparse
import os
import sys

from moco.utils.cli import run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "groups", nargs="*", metavar="LABEL=RUNS", help="a pretraining and its run folders"
    )
    parser.add_argument(
        "--curves",
        nargs="+",
        metavar="RUN",
        help="run folders (pretraining, lincls or detection) whose curves curves.png overlays",
    )
    parser.add_argument(
        "--baseline", default=None, help="label whose means the deltas are taken against"
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="write transfer.md, .csv, _trials.csv, .png, .pdf and curves.png, .pdf here",
    )
    parser.add_argument("--title", default=None, help="chart title")
    return parser.parse_args(argv)


def run(args):
    from experiments.report import (  # after parsing: --help answers at once
        comparisons,
        parse_groups,
        plot_curves,
        summarize,
        to_markdown,
        write_report,
    )

    if not args.groups and not args.curves:
        raise ValueError("give LABEL=RUNS groups, or --curves RUN ... with --output-dir")
    if args.curves and not args.output_dir:
        raise ValueError("--curves draws curves.png: give --output-dir")
    for run in args.curves or ():
        if not os.path.isdir(run):
            raise NotADirectoryError(f"--curves {run}: no such run folder")
    if args.output_dir:
        print(f"report.py: output folder {args.output_dir}", flush=True)
    paths, runs, table, lines = {}, {}, None, []
    if args.groups:
        groups = parse_groups(args.groups)
        table = summarize(groups, baseline=args.baseline)
        print(to_markdown(table), end="")
        labels = list(groups)  # every two labels, in the order given
        _, lines = comparisons(
            table, [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
        )
        if lines:
            print("\n".join(lines))
        runs = {
            f"{label}/{os.path.basename(os.path.normpath(run))}": run
            for label, group in groups.items()
            for run in group
        }
    if args.curves:  # the label of each: its folder, as given
        runs = {os.path.normpath(run): run for run in args.curves}
    if args.output_dir and table is not None:
        paths = write_report(
            table,
            args.output_dir,
            title=args.title,
            notes=lines,
            base=os.getcwd(),
            curves=runs,
            curves_title="training",
        )
    elif args.output_dir:
        curves = plot_curves(runs, os.path.join(args.output_dir, "curves.png"), "training")
        if curves:
            paths = {"curves": curves, "curves_pdf": os.path.splitext(curves)[0] + ".pdf"}
    if args.output_dir:
        print("report.py: wrote " + ", ".join(paths.values()))


def main(argv=None):
    return run_cli("report.py", lambda: run(parse_args(argv)), errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
