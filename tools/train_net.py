#!/usr/bin/env python
"""Fine-tune and evaluate a detector (Detectron2's standard command line).

    python tools/train_net.py --config-file configs/detection/pascal_voc_R_50_C4_24k_moco.yaml \\
        --num-gpus 8 MODEL.WEIGHTS moco_r50.pkl OUTPUT_DIR out/voc_moco_1
    python tools/train_net.py --config-file configs/detection/embedded_voc_R_18_FPN.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS out/model_final.pth

Writes OUTPUT_DIR/final_metrics.json (read by tools/report.py). See detection/trainer.py.
"""

import argparse
import os
import pickle
import sys

from experiments.cluster import add_submit_args, check_submit_args
from moco.utils.cli import Interrupted, resume_command, run_cli


def build_parser():
    """Detectron2's ``default_argument_parser`` (same flags, defaults and dist-url port), built here
    without importing Detectron2 so that --help answers at once; tests/test_train_net.py checks
    that the two agree."""
    p = argparse.ArgumentParser(
        prog="train_net.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume from OUTPUT_DIR's last checkpoint (DefaultTrainer.resume_or_load)",
    )
    p.add_argument("--eval-only", action="store_true", help="perform evaluation only")
    p.add_argument("--num-gpus", type=int, default=1, help="number of gpus *per machine*")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    p.add_argument(
        "--machine-rank", type=int, default=0, help="the rank of this machine (unique per machine)"
    )
    # Detectron2's deterministic port, so that an orphan process shows as a port in use
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    p.add_argument(
        "--dist-url",
        default=f"tcp://127.0.0.1:{port}",
        help="initialization URL for pytorch distributed backend",
    )
    p.add_argument(
        "opts",
        default=None,
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help="config overrides at the end of the command, e.g. SOLVER.MAX_ITER 50",
    )
    return p


def run(args, argv):
    from detection.trainer import run as train  # after parsing: Detectron2 takes seconds to import

    try:
        train(args, prog="train_net.py")
    except Interrupted as e:
        cmd = resume_command("tools/train_net.py", argv, resume=("--resume",))
        raise Interrupted(f"{e}: {cmd}", e.exit_code - 128) from None


def submit(args, argv):
    """--submit: this command as a submitit job (experiments/cluster.py); the config is checked
    here first, with the job's process layout."""
    from detection.config import load_cfg
    from experiments.cluster import gpus_per_node, submit_tool

    check_submit_args(args, argv)
    world = max(1, gpus_per_node(args, argv, args.num_gpus)) * args.slurm_nodes
    out = load_cfg(args.config_file, args.opts, world).OUTPUT_DIR
    print(f"train_net.py: output folder {out}", flush=True)
    submit_tool("train_net", args, argv, out, default_gpus=args.num_gpus)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # Detectron2's flags (build_parser) and the cluster flags, before the KEY VALUE overrides
    args = add_submit_args(build_parser()).parse_args(argv)

    def go():
        check_submit_args(args, argv)
        return (submit if args.submit else run)(args, argv)

    return run_cli("train_net.py", go, errors=(OSError, pickle.UnpicklingError))


if __name__ == "__main__":
    sys.exit(main())
