#!/usr/bin/env python
"""Linear classification on a frozen pretrained ResNet (facebookresearch/moco main_lincls.py flags).

  python tools/lincls.py -a resnet50 --lr 30.0 --batch-size 256 \\
      --pretrained output/pretrain/moco_v2_R50/checkpoint_0199.pth.tar \\
      --dist-url tcp://localhost:10001 --multiprocessing-distributed --world-size 1 --rank 0 \\
      /path/to/imagenet
  # embedded data, CPU
  python tools/lincls.py -a resnet18 --crop-size 64 -b 64 --epochs 10 --schedule 6 8 -j 1 \\
      --pretrained output/pretrain/moco_v2_R18_cpu/checkpoint_0019.pth.tar \\
      datasets/moco_det_synthetic/imagefolder

Top-1/top-5 of every epoch are logged and written to OUTPUT_DIR/lincls_results.json.
"""

import argparse
import math
import os
import sys

from moco.cli import run_cli
from moco.data import resolve_data_path
from moco.launch import launch_from_args, launch_processes
from moco.lincls import LinclsOptions, run_lincls


def build_parser():
    p = argparse.ArgumentParser(prog="lincls.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("data", metavar="DIR", help="folder with train/ and val/ (ImageFolder)")
    p.add_argument("-a", "--arch", default="resnet50", help="torchvision ResNet (default resnet50)")
    p.add_argument("-j", "--workers", default=32, type=int,
                   help="data loading workers per node, split over its processes (default 32)")
    p.add_argument("--epochs", default=100, type=int)
    p.add_argument("--start-epoch", default=0, type=int, help="manual epoch (useful on restarts)")
    p.add_argument("-b", "--batch-size", default=256, type=int,
                   help="batch of one node, all its processes (default 256)")
    p.add_argument("--lr", "--learning-rate", default=30.0, type=float, dest="lr")
    p.add_argument("--schedule", default=[60, 80], nargs="*", type=int,
                   help="epochs where lr drops x0.1 (default 60 80)")
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", default=0.0, type=float, dest="wd")
    p.add_argument("-p", "--print-freq", default=10, type=int)
    p.add_argument("--resume", default="", help="linear-classifier checkpoint to resume from")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate on val/")
    p.add_argument("--world-size", default=-1, type=int, help="number of nodes, as official")
    p.add_argument("--rank", default=-1, type=int, help="node rank, as official")
    p.add_argument("--dist-url", default=None, help="tcp://HOST:PORT of node 0 (default: auto)")
    p.add_argument("--dist-backend", default=None,
                   help="accepted for compatibility: NCCL is used on GPU, gloo on CPU")
    p.add_argument("--seed", default=None, type=int)
    p.add_argument("--gpu", default=None, type=int, help="GPU to use in a one-process run")
    p.add_argument("--multiprocessing-distributed", action="store_true")
    p.add_argument("--pretrained", default="", help="pretrained checkpoint (MoCo, MoCo v3, torchvision)")
    p.add_argument("--crop-size", default=224, type=int,
                   help="training crop / center crop (val resizes to crop*256/224)")
    p.add_argument("--output-dir", default=".", help="checkpoints and lincls_results.json")
    p.add_argument("--num-gpus", type=int, help="processes per machine (CPU processes without CUDA)")
    p.add_argument("--num-machines", type=int)
    p.add_argument("--machine-rank", type=int)
    return p


def run(args):
    spec = launch_from_args(args)
    if args.batch_size % spec.procs_per_machine:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the "
                         f"{spec.procs_per_machine} processes of a node")  # fmt: skip
    for flag, path in (("--pretrained", args.pretrained), ("--resume", args.resume)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if not os.path.isdir(resolve_data_path(args.data)):
        raise FileNotFoundError(f"DATA {args.data}: no such folder (expected train/ and val/)")
    opts = LinclsOptions(
        data=args.data, arch=args.arch,
        workers=int(math.ceil(args.workers / spec.procs_per_machine)),
        epochs=args.epochs, start_epoch=args.start_epoch,
        batch_size=args.batch_size // spec.procs_per_machine, lr=args.lr,
        schedule=tuple(args.schedule), momentum=args.momentum, weight_decay=args.wd,
        print_freq=args.print_freq, resume=args.resume, evaluate=args.evaluate,
        pretrained=args.pretrained, seed=args.seed, crop_size=args.crop_size,
        output_dir=args.output_dir, device=f"cuda:{args.gpu}" if args.gpu is not None else "auto",
    )  # fmt: skip
    launch_processes(run_lincls, spec, (opts,))


def main(argv=None):
    return run_cli("lincls.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
