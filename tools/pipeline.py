#!/usr/bin/env python
"""The main job: MoCo and supervised pretraining, conversion, detection fine-tuning, AP report.

    python tools/pipeline.py                                   # CPU demo on the embedded data
    python tools/pipeline.py --preset configs/pipeline/ci.yaml # the smaller CI version
    python tools/pipeline.py --preset configs/pipeline/paper_voc.yaml  # ImageNet + VOC, GPUs
    python tools/pipeline.py INITS "[['mine', 'my_method.pth']]"  # your checkpoint as a row

    python tools/pipeline.py --submit slurm --slurm-partition PART --preset paper_voc.yaml  # jobs

Finished stages are reused on rerun; an interrupted one resumes. See experiments/pipeline.py.
"""

import os
import sys

from experiments.cluster import add_submit_args, check_submit_args, stage_submitter
from experiments.pipeline import build_argument_parser, load_pipeline_cfg, run_pipeline
from moco.utils.cli import run_cli


def run(args, argv):
    check_submit_args(args, argv)
    cfg = load_pipeline_cfg(args.preset, args.opts)
    submit = None
    if args.submit:  # each stage a submitit job (experiments/cluster.py)
        gpus = max(cfg.PRETRAIN.NUM_PROCESSES, cfg.DETECTION.NUM_PROCESSES)
        submit = stage_submitter(args, argv, os.path.abspath(cfg.RUN_DIR), gpus)
    run_pipeline(cfg, submit=submit)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # the cluster flags before the KEY VALUE overrides
    parser = add_submit_args(build_argument_parser())
    return run_cli("pipeline.py", lambda: run(parser.parse_args(argv), argv))


if __name__ == "__main__":
    sys.exit(main())
