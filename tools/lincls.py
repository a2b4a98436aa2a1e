#!/usr/bin/env python
"""Linear classification on a frozen pretrained ResNet (facebookresearch/moco main_lincls.py flags).

  python tools/lincls.py -a resnet50 --lr 30.0 --batch-size 256 \\
      --pretrained output/pretrain/moco_v2_R50/checkpoint_0199.pth.tar \\
      --dist-url tcp://localhost:10001 --multiprocessing-distributed --world-size 1 --rank 0 \\
      /path/to/imagenet
  # embedded data, CPU: 1,000 images of 64 px, 10 classes (defaults assume ImageNet, 1.28M images)
  python tools/lincls.py -a resnet18 --crop-size 64 -b 64 --epochs 10 --lr 0.01 --schedule 6 8 \\
      --pretrained output/pretrain/moco_v2_R18_cpu/checkpoint_0019.pth.tar \\
      datasets/moco_det_synthetic/imagefolder

Top-1/top-5 of every epoch are logged and written to OUTPUT_DIR/lincls_results.json, with the
checkpoints checkpoint.pth.tar and model_best.pth.tar (OUTPUT_DIR: --output-dir, default
output/lincls/<the pretrained checkpoint's folder name>).
"""

import argparse
import math
import os
import sys

from moco.utils.cli import run_cli


def build_parser():
    p = argparse.ArgumentParser(
        prog="lincls.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", metavar="DIR", help="folder with train/ and val/ (ImageFolder)")
    p.add_argument(
        "-a",
        "--arch",
        metavar="ARCH",
        default="resnet50",
        help="torchvision ResNet (default resnet50)",
    )
    p.add_argument(
        "-j",
        "--workers",
        default=min(32, os.cpu_count() or 1),
        type=int,
        metavar="N",
        help="data loading workers per node, split over its processes (default: this "
        "machine's CPU count, at most the official 32: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        default=100,
        type=int,
        metavar="N",
        help="default 100 (ImageNet); about 10 at CPU scale",
    )
    p.add_argument("--start-epoch", default=0, type=int, help="manual epoch (useful on restarts)")
    p.add_argument(
        "-b",
        "--batch-size",
        default=256,
        type=int,
        help="batch of one node, all its processes (default 256)",
    )
    p.add_argument(
        "--lr",
        "--learning-rate",
        default=30.0,
        type=float,
        dest="lr",
        metavar="LR",
        help="default 30 (official: ImageNet, batch 256, 200-epoch MoCo); on the "
        "embedded 64-px data after a few epochs of pretraining the loss diverges "
        "above about 0.01",
    )
    p.add_argument(
        "--schedule",
        default=[60, 80],
        nargs="*",
        type=int,
        help="epochs where lr drops x0.1 (default 60 80)",
    )
    p.add_argument("--momentum", default=0.9, type=float)
    p.add_argument("--wd", "--weight-decay", default=0.0, type=float, dest="wd")
    p.add_argument("-p", "--print-freq", default=10, type=int)
    p.add_argument("--resume", default="", help="linear-classifier checkpoint to resume from")
    p.add_argument("-e", "--evaluate", action="store_true", help="only evaluate on val/")
    p.add_argument("--world-size", default=-1, type=int, help="number of nodes, as official")
    p.add_argument("--rank", default=-1, type=int, help="node rank, as official")
    p.add_argument("--dist-url", default=None, help="tcp://HOST:PORT of node 0 (default: auto)")
    p.add_argument(
        "--dist-backend",
        default=None,
        help="accepted for compatibility: NCCL is used on GPU, gloo on CPU",
    )
    p.add_argument(
        "--dist-timeout-minutes",
        type=float,
        metavar="M",
        help="how long a collective waits for the other processes before the run fails "
        "(a hung peer; default 30, pretraining's DIST.TIMEOUT_MINUTES)",
    )
    p.add_argument("--seed", default=None, type=int)
    p.add_argument("--gpu", default=None, type=int, help="GPU to use in a one-process run")
    p.add_argument("--multiprocessing-distributed", action="store_true")
    p.add_argument(
        "--pretrained", default="", help="pretrained checkpoint (MoCo, MoCo v3, torchvision)"
    )
    p.add_argument(
        "--crop-size",
        default=224,
        type=int,
        help="training crop / center crop (val resizes to crop*256/224)",
    )
    p.add_argument(
        "--scan-images",
        default=None,
        metavar="MODE",
        help="decode every image at start: auto (small folders, see DATA.SCAN_IMAGES in "
        "moco/config.py), always or never; the results are cached (default: auto)",
    )
    p.add_argument(
        "--output-dir",
        metavar="DIR",
        help="checkpoints and lincls_results.json (default: output/lincls/<the "
        "--pretrained file's folder name>, output/lincls/random_init without one)",
    )
    p.add_argument(
        "--num-gpus", type=int, help="processes per machine (CPU processes without CUDA)"
    )
    p.add_argument("--num-machines", type=int)
    p.add_argument("--machine-rank", type=int)
    return p


def default_output_dir(pretrained):
    """output/lincls/<folder of the pretrained checkpoint>: one folder per pretraining run."""
    name = os.path.basename(os.path.dirname(os.path.abspath(pretrained))) if pretrained else ""
    return os.path.join("output", "lincls", name or "random_init")


def run(args):
    from moco.data.checks import check_scan_mode
    from moco.data.datasets import resolve_data_path
    from moco.evaluation.lincls import (
        BEST_FILE,
        CHECKPOINT_FILE,
        RESULTS_FILE,
        LinclsOptions,
        check_new_run,
        run_lincls,
    )
    from moco.utils import file_io
    from moco.utils.launch import launch_from_args, launch_processes, process_group_timeout

    spec = launch_from_args(args)
    process_group_timeout(args.dist_timeout_minutes, "--dist-timeout-minutes")
    if args.batch_size % spec.procs_per_machine:
        raise ValueError(
            f"--batch-size {args.batch_size} is not divisible by the "
            f"{spec.procs_per_machine} processes of a node"
        )
    for flag, path in (("--pretrained", args.pretrained), ("--resume", args.resume)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.scan_images is not None:
        check_scan_mode(args.scan_images, "--scan-images")
    if not os.path.isdir(resolve_data_path(args.data)):
        raise FileNotFoundError(f"DATA {args.data}: no such folder (expected train/ and val/)")
    out = args.output_dir or default_output_dir(args.pretrained)
    if not args.resume and not args.evaluate:
        check_new_run(out)
    opts = LinclsOptions(
        data=args.data,
        arch=args.arch,
        workers=int(math.ceil(args.workers / spec.procs_per_machine)),
        epochs=args.epochs,
        start_epoch=args.start_epoch,
        batch_size=args.batch_size // spec.procs_per_machine,
        lr=args.lr,
        schedule=tuple(args.schedule),
        momentum=args.momentum,
        weight_decay=args.wd,
        print_freq=args.print_freq,
        resume=args.resume,
        evaluate=args.evaluate,
        pretrained=args.pretrained,
        seed=args.seed,
        crop_size=args.crop_size,
        output_dir=out,
        device=f"cuda:{args.gpu}" if args.gpu is not None else "auto",
        scan_images=args.scan_images,
    )
    print(f"lincls.py: output folder {out}", flush=True)
    # one run per folder; a failed start (a bad --pretrained, data) leaves none behind
    started = (*file_io.STARTED_FILES, CHECKPOINT_FILE, RESULTS_FILE)
    with file_io.locked_new_run(out, "--output-dir", started=started):
        launch_processes(run_lincls, spec, (opts,), timeout_minutes=args.dist_timeout_minutes)
    files = (RESULTS_FILE,) if args.evaluate else (RESULTS_FILE, CHECKPOINT_FILE, BEST_FILE)
    print("lincls.py: wrote " + ", ".join(os.path.join(out, f) for f in files))


def main(argv=None):
    return run_cli("lincls.py", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
