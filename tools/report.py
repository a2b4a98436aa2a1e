#!/usr/bin/env python
"""Paper-style table of detection transfer runs (mean±std over trials, delta to a baseline).

    python tools/report.py supervised='out/sup_*' moco_v2='out/moco_*' --baseline supervised \
        --output-dir out/report

Each LABEL=PATTERN names one pretraining; PATTERN (expanded here) matches run folders holding
final_metrics.json. Prints the Markdown table; writes transfer.md / .csv / .png to --output-dir.
"""

import argparse
import sys

from detection.report import parse_groups, summarize, to_markdown, write_report
from moco.cli import run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("groups", nargs="+", metavar="LABEL=RUNS", help="a pretraining and its run folders")
    parser.add_argument("--baseline", default=None, help="label whose means the deltas are taken against")
    parser.add_argument("--output-dir", default=None, help="write transfer.md, transfer.csv, transfer.png here")
    parser.add_argument("--title", default=None, help="chart title")
    return parser.parse_args(argv)


def run(args):
    table = summarize(parse_groups(args.groups), baseline=args.baseline)
    print(to_markdown(table), end="")
    if args.output_dir:
        paths = write_report(table, args.output_dir, title=args.title)
        print("wrote " + ", ".join(paths.values()))


def main(argv=None):
    return run_cli("report.py", lambda: run(parse_args(argv)), errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
