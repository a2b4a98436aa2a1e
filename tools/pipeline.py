#!/usr/bin/env python
"""The main job: MoCo and supervised pretraining, conversion, detection fine-tuning, AP report.

    python tools/pipeline.py                                   # CPU demo on the embedded data
    python tools/pipeline.py --preset configs/pipeline/ci.yaml # the smaller CI version
    python tools/pipeline.py --preset configs/pipeline/paper_voc.yaml  # ImageNet + VOC, GPUs
    python tools/pipeline.py INITS "[['mine', 'my_method.pth']]"  # your checkpoint as a row

Finished stages are reused on rerun; an interrupted one resumes. See experiments/pipeline.py.
"""

import sys

from experiments.pipeline import build_argument_parser, load_pipeline_cfg, run_pipeline
from moco.utils.cli import run_cli


def run(args):
    run_pipeline(load_pipeline_cfg(args.preset, args.opts))


def main(argv=None):
    return run_cli("pipeline.py", lambda: run(build_argument_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
