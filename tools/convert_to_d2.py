#!/usr/bin/env python
"""Convert a pretrained ResNet checkpoint to Detectron2 weights.

    python tools/convert_to_d2.py checkpoint_0199.pth.tar moco_r50.pkl
    python tools/train_net.py --config-file configs/detection/pascal_voc_R_50_C4_24k_moco.yaml \\
        MODEL.WEIGHTS moco_r50.pkl

Reads official MoCo v1/v2 and this toolkit's checkpoints, MoCo v3 ResNet checkpoints and
torchvision ResNet state dicts (weights only; see detection/convert.py). An existing OUTPUT is
refused unless --force is given.
"""

import argparse
import os
import pickle
import sys

from moco.utils.cli import run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="convert_to_d2.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="pretraining checkpoint (.pth / .pth.tar)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite OUTPUT if it exists (default: refuse)"
    )
    parser.add_argument(
        "--format",
        default=None,
        metavar="FORMAT",
        help="input layout (default: detected from the keys; a wrong one is "
        "answered with the list)",
    )
    return parser.parse_args(argv)


def run(args):
    if os.path.exists(args.output) and not args.force:
        # converted weights are what a run cites (final_metrics.json names the file)
        raise FileExistsError(
            f"OUTPUT {args.output} exists; give another name, or --force to overwrite it"
        )
    from detection.convert import convert_checkpoint  # after parsing: --help answers at once

    result = convert_checkpoint(args.input, args.output, args.format)
    print(result.summary(args.input, args.output))
    print(f"convert_to_d2.py: wrote {args.output} (fine-tune with MODEL.WEIGHTS {args.output})")


def main(argv=None):
    return run_cli(
        "convert_to_d2.py", lambda: run(parse_args(argv)), errors=(OSError, pickle.UnpicklingError)
    )


if __name__ == "__main__":
    sys.exit(main())
