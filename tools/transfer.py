#!/usr/bin/env python
"""Variants of the detection fine-tune over shared pretraining: MoCo, supervised and random
fine-tuned in paired trials under each variant, each method minus supervised and minus random
with 95% CIs per variant (issue 24). The demo's finished stages in output/pipeline are reused.

    python tools/transfer.py --preset transfer_norm      # normalization in backbone, FPN, head
    python tools/transfer.py --preset transfer_schedule  # 1x, 2x, 4x the fine-tune's iterations
    python tools/transfer.py --preset transfer_novel     # detection classes no pretraining saw

Finished stages are reused on rerun; an interrupted one resumes. See experiments/transfer.py.
"""

import argparse
import sys

from moco.utils.cli import run_cli


def build_parser():
    p = argparse.ArgumentParser(
        prog="transfer.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        required=True,
        help="a YAML file, or the name of one under configs/pipeline/ (transfer_norm, "
        "transfer_schedule, transfer_novel)",
    )
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="overrides, e.g. DETECTION.TRIALS 7 JOBS 2",
    )
    return p


def run(args):
    from experiments.transfer import load_transfer_cfg, run_transfer

    run_transfer(load_transfer_cfg(args.preset, args.opts))


def main(argv=None):
    return run_cli("transfer.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
