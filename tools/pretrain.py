#!/usr/bin/env python
"""MoCo v1/v2 pretraining. Accepts facebookresearch/moco main_moco.py's flags, so the paper's
commands run unchanged, plus Detectron2-style --config-file, --num-gpus and trailing KEY VALUE
overrides. Order of precedence: defaults < --config-file < flags given < KEY VALUE.

  # MoCo v2, 8 GPUs, as in the official README
  python tools/pretrain.py -a resnet50 --lr 0.03 --batch-size 256 --mlp --moco-t 0.2 \\
      --aug-plus --cos --dist-url tcp://localhost:10001 --multiprocessing-distributed \\
      --world-size 1 --rank 0 /path/to/imagenet
  # small CPU run on the embedded data, 2 processes
  python tools/pretrain.py --config-file configs/pretrain/moco_v2_R18_cpu.yaml --num-gpus 2
"""

import argparse
import os
import re
import sys

from experiments.cluster import add_submit_args, check_submit_args
from moco.config import apply_official_args, get_cfg, load_cfg
from moco.utils.cli import Interrupted, resume_command, run_cli
from moco.utils.config_loading import merge_opts


def build_parser():
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # official main_moco.py flags; None = not given (the config decides)
    p.add_argument("-a", "--arch", metavar="ARCH", help="torchvision ResNet (default resnet50)")
    p.add_argument(
        "-j",
        "--workers",
        type=int,
        metavar="N",
        help="data loading workers per node (split over its processes)",
    )
    p.add_argument("--epochs", type=int, metavar="N", help="total epochs (default 200)")
    p.add_argument("--start-epoch", type=int, metavar="N", help="first epoch when not resuming")
    p.add_argument(
        "-b",
        "--batch-size",
        type=int,
        metavar="N",
        help="batch of one node, all its processes (default 256); global = b x nodes",
    )
    p.add_argument(
        "--lr",
        "--learning-rate",
        type=float,
        dest="lr",
        metavar="LR",
        help="initial learning rate (default 0.03)",
    )
    p.add_argument(
        "--schedule",
        type=int,
        nargs="*",
        metavar="EPOCH",
        help="epochs where lr drops x0.1 (default 120 160; ignored with --cos)",
    )
    p.add_argument("--momentum", type=float, metavar="M", help="SGD momentum (default 0.9)")
    p.add_argument(
        "--wd",
        "--weight-decay",
        type=float,
        dest="wd",
        metavar="W",
        help="weight decay (default 1e-4)",
    )
    p.add_argument("-p", "--print-freq", type=int, metavar="N", help="log every N iterations")
    p.add_argument(
        "--resume",
        default="",
        metavar="PATH",
        help="checkpoint file, a folder with last_checkpoint, or 'auto' (OUTPUT_DIR)",
    )
    p.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="number of nodes (with --multiprocessing-distributed), as official",
    )
    p.add_argument("--rank", type=int, metavar="R", help="node rank, as official")
    p.add_argument("--dist-url", metavar="URL", help="tcp://HOST:PORT of node 0 (default: auto)")
    p.add_argument(
        "--dist-backend",
        metavar="NAME",
        help="accepted for compatibility: NCCL is used on GPU, gloo on CPU",
    )
    p.add_argument("--seed", type=int, help="seed for initialising training")
    p.add_argument("--gpu", type=int, metavar="ID", help="GPU to use in a one-process run")
    p.add_argument(
        "--multiprocessing-distributed",
        action="store_true",
        help="one process per GPU of each node (all GPUs)",
    )
    p.add_argument("--moco-dim", type=int, metavar="D", help="feature dimension (default 128)")
    p.add_argument("--moco-k", type=int, metavar="K", help="queue size (default 65536)")
    p.add_argument("--moco-m", type=float, metavar="M", help="key encoder momentum (default 0.999)")
    p.add_argument("--moco-t", type=float, metavar="T", help="softmax temperature (default 0.07)")
    p.add_argument("--mlp", action="store_true", default=None, help="MLP head (MoCo v2)")
    p.add_argument(
        "--aug-plus", action="store_true", default=None, help="MoCo v2 data augmentation"
    )
    p.add_argument("--cos", action="store_true", default=None, help="cosine lr schedule")
    # Detectron2-style and toolkit flags
    p.add_argument("--config-file", metavar="FILE", help="YAML config (configs/pretrain/*.yaml)")
    p.add_argument(
        "--num-gpus",
        type=int,
        metavar="N",
        help="processes per machine (GPUs; CPU processes without CUDA)",
    )
    p.add_argument("--num-machines", type=int, metavar="N", help="number of machines")
    p.add_argument("--machine-rank", type=int, metavar="R", help="rank of this machine")
    p.add_argument("--output-dir", metavar="DIR", help="OUTPUT_DIR (checkpoints, metrics.json)")
    p.add_argument("--knn-data", metavar="DIR", help="labeled folder with train/ and val/ for kNN")
    p.add_argument(
        "rest",
        nargs="*",
        metavar="[DATA] [KEY VALUE ...]",
        help="DATA: folder with train/; KEY VALUE: config overrides (e.g. MODEL.K 4096)",
    )
    add_submit_args(p)
    return p


_CFG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)+$")  # e.g. SOLVER.BASE_LR
_TOP_LEVEL_KEYS = {k for k, v in get_cfg().items() if not isinstance(v, dict)}  # e.g. OUTPUT_DIR


def parse_args(argv=None):
    """Flags may come anywhere; of the positionals, KEY VALUE pairs are config overrides and the
    one other token is DATA."""
    args = build_parser().parse_intermixed_args(argv)
    args.data, args.opts, rest = None, [], list(args.rest)
    while rest:
        token = rest.pop(0)
        if _CFG_KEY.match(token) or token in _TOP_LEVEL_KEYS:
            if not rest:
                raise ValueError(f"config override {token} has no value (KEY VALUE pairs)")
            args.opts += [token, rest.pop(0)]
        elif args.data is None:
            args.data = token
        else:
            raise ValueError(
                f"unexpected argument {token!r}: give one DATA folder and KEY VALUE "
                "config overrides"
            )
    return args


def resolve_cfg(args, procs_per_machine, num_machines):
    """The run's frozen config: defaults < --config-file < flags given < KEY VALUE."""
    cfg = load_cfg(args.config_file)
    apply_official_args(cfg, args, procs_per_machine, num_machines)
    if args.opts:
        merge_opts(cfg, args.opts)
    cfg.freeze()
    return cfg


def submit(args, argv):
    """--submit: this command as a submitit job (experiments/cluster.py); the config is checked
    here first, with the job's process layout."""
    from experiments.cluster import gpus_per_node, submit_tool

    check_submit_args(args, argv)
    cfg = resolve_cfg(args, max(1, gpus_per_node(args, argv)), args.slurm_nodes)
    print(f"pretrain.py: output folder {cfg.OUTPUT_DIR}", flush=True)
    submit_tool("pretrain", args, argv, cfg.OUTPUT_DIR)


def run(args, argv):
    # heavy imports after parsing: --help and argument errors answer at once
    from moco.checkpoint import read_last_checkpoint
    from moco.engine.launch import launch_training
    from moco.engine.trainer import PretrainTrainer
    from moco.utils.launch import launch_from_args
    from moco.utils.run_files import METRICS_FILE, PRETRAIN_SUMMARY

    spec = launch_from_args(args)
    cfg = resolve_cfg(args, spec.procs_per_machine, spec.num_machines)
    out = cfg.OUTPUT_DIR
    print(f"pretrain.py: output folder {out}", flush=True)
    try:
        launch_training(PretrainTrainer, cfg, spec, resume=args.resume)
    except Interrupted as e:
        raise Interrupted(
            f"{e}: {resume_command('tools/pretrain.py', argv)}", e.exit_code - 128
        ) from None
    print(
        f"pretrain.py: wrote {read_last_checkpoint(out)}, "
        f"{os.path.join(out, PRETRAIN_SUMMARY)}, {os.path.join(out, METRICS_FILE)}; "
        f"curves: tensorboard --logdir {out}"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)

    def go():
        args = parse_args(argv)
        check_submit_args(args, argv)
        return (submit if args.submit else run)(args, argv)

    return run_cli("pretrain.py", go)


if __name__ == "__main__":
    sys.exit(main())
