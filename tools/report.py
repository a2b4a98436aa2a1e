#!/usr/bin/env python
"""Paper-style table of detection transfer runs (mean±std over trials, delta to a baseline).

    python tools/report.py supervised='out/sup_*' moco_v2='out/moco_*' --baseline supervised \\
        --output-dir out/report

Each LABEL=PATTERN names one pretraining; PATTERN (expanded here) matches run folders holding
final_metrics.json. Prints the Markdown table; writes transfer.md (with what was run) / .csv /
.png (AP bars with value labels and std error bars) and curves.png (loss and lr over iterations,
from each run's metrics.json) to --output-dir.
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
        "groups", nargs="+", metavar="LABEL=RUNS", help="a pretraining and its run folders"
    )
    parser.add_argument(
        "--baseline", default=None, help="label whose means the deltas are taken against"
    )
    parser.add_argument(
        "--output-dir", default=None, help="write transfer.md, transfer.csv, transfer.png here"
    )
    parser.add_argument("--title", default=None, help="chart title")
    return parser.parse_args(argv)


def run(args):
    from experiments.report import parse_groups, summarize, to_markdown, write_report

    if args.output_dir:
        print(f"report.py: output folder {args.output_dir}", flush=True)
    groups = parse_groups(args.groups)
    table = summarize(groups, baseline=args.baseline)
    print(to_markdown(table), end="")
    if args.output_dir:
        runs = {
            f"{label}/{os.path.basename(os.path.normpath(run))}": run
            for label, group in groups.items()
            for run in group
        }
        paths = write_report(
            table,
            args.output_dir,
            title=args.title,
            base=os.getcwd(),
            curves=runs,
            curves_title="training",
        )
        print("report.py: wrote " + ", ".join(paths.values()))


def main(argv=None):
    return run_cli("report.py", lambda: run(parse_args(argv)), errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
