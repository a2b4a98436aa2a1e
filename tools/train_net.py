#!/usr/bin/env python
"""Fine-tune and evaluate a detector (Detectron2's standard command line).

    python tools/train_net.py --config-file configs/detection/pascal_voc_R_50_C4_24k_moco.yaml \
        --num-gpus 8 MODEL.WEIGHTS moco_r50.pkl OUTPUT_DIR out/voc_moco_1
    python tools/train_net.py --config-file configs/detection/embedded_voc_R_18_FPN.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS out/model_final.pth

Writes OUTPUT_DIR/final_metrics.json (read by tools/report.py). See detection/trainer.py.
"""

import pickle
import sys

from detection.trainer import run  # first: the detection package quiets an upstream warning
from detectron2.engine import default_argument_parser  # noqa: I001
from moco.cli import run_cli


def main(argv=None):
    args = default_argument_parser(epilog=__doc__).parse_args(argv)
    return run_cli("train_net.py", lambda: run(args), errors=(OSError, pickle.UnpicklingError))


if __name__ == "__main__":
    sys.exit(main())
