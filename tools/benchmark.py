#!/usr/bin/env python
"""Pretraining throughput, side by side: moco-det's fast path vs the official MoCo algorithm.

    python tools/benchmark.py --arch resnet50 --image-size 96 --batch-size 32 --workers 2 \\
        --reps 5 --output output/benchmark/r50.json
    # start-up to the first batch, ImageFolder vs the scan modes, on 100,000 generated files
    python tools/benchmark.py --rows startup --data /tmp/startup100k --data-per-class 10000
    # detection start-up to the first batch, plain Detectron2 vs the toolkit, on 100,000 images
    python tools/benchmark.py --rows detstartup --data /tmp/det100k --det-images 100000

Rows, groups and method: see experiments/benchmark/runner.py. Prints a table (median ms per step / update /
batch / start, min-max over repetitions, images/s, speed relative to the official row, for start-up
ImageFolder's) and writes JSON.
"""

import argparse
import os
import sys

from experiments.benchmark.config import GROUPS, BenchConfig
from moco.data.synthetic.spec import SyntheticSpec, default_synthetic_root
from moco.data.synthetic.writers import ensure_generated
from moco.utils.cli import run_cli

_D = BenchConfig()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="benchmark.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", default=_D.arch, help="torchvision ResNet (default: %(default)s)")
    p.add_argument(
        "--image-size", type=int, default=_D.image_size, help="crop size (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="default: %(default)s")
    p.add_argument(
        "--device", default=_D.device, help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    p.add_argument(
        "--workers", type=int, default=_D.workers, help="DataLoader workers (default: %(default)s)"
    )
    p.add_argument(
        "--reps", type=int, default=_D.reps, help="interleaved repetitions (default: %(default)s)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=_D.steps,
        help="timed steps per repetition (default: %(default)s)",
    )
    p.add_argument(
        "--warmup", type=int, default=_D.warmup, help="untimed steps per row (default: %(default)s)"
    )
    p.add_argument("--moco", choices=("v1", "v2"), default=_D.moco, help="default: %(default)s")
    p.add_argument("--K", type=int, default=_D.K, help="queue size (default: %(default)s)")
    p.add_argument("--shuffle-bn", choices=("split", "off"), default=_D.shuffle_bn)
    p.add_argument("--split-bn-groups", type=int, default=_D.split_bn_groups)
    p.add_argument(
        "--amp", default=_D.amp, help="bf16 autocast: auto, true, false (default: %(default)s)"
    )
    p.add_argument(
        "--channels-last", default=_D.channels_last, help="auto, true, false (default: %(default)s)"
    )
    p.add_argument("--compile", action="store_true", help="add a row with torch.compile'd encoders")
    p.add_argument(
        "--data",
        default=None,
        help="synthetic root or image folder with train/ (default: the embedded data, "
        f"{default_synthetic_root()}, generated if missing)",
    )
    p.add_argument(
        "--data-per-class",
        type=int,
        default=None,
        metavar="N",
        help="generate (or reuse) the embedded set at --data with N training images per "
        "class (10 classes; 10000 = the 100,000-file start-up run)",
    )
    p.add_argument(
        "--det-images",
        type=int,
        default=None,
        metavar="N",
        help="generate (or reuse) the embedded set at --data with N detection images of 48 px "
        "(the detstartup rows' COCO layout; 100000 = the COCO-scale run)",
    )
    p.add_argument("--data-batches", type=int, default=_D.data_batches)
    p.add_argument(
        "--rows",
        default=",".join(_D.groups),
        help=f"groups to measure, comma-separated from {','.join(GROUPS)}, or none "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--detection-config",
        default=None,
        help="also time Detectron2 iterations of this config (e.g. "
        "configs/detection/pascal_voc_R_50_C4_24k_moco.yaml)",
    )
    p.add_argument(
        "--det-ims-per-batch",
        type=int,
        default=2,
        help="images per iteration, also of the detstartup rows (default: %(default)s = the "
        "paper's 16 / 8 GPUs)",
    )
    p.add_argument("--det-iters", type=int, default=5, help="default: %(default)s")
    p.add_argument(
        "--det-opts", nargs="*", default=[], help="KEY VALUE overrides for the detection config"
    )
    p.add_argument(
        "--output",
        default="output/benchmark/benchmark.json",
        metavar="FILE",
        help="JSON report (default: %(default)s)",
    )
    return p.parse_args(argv)


def _config(args):
    groups = tuple(g.strip() for g in args.rows.split(",") if g.strip() and g.strip() != "none")
    if not groups and not args.detection_config:
        raise ValueError("--rows none and no --detection-config: nothing to measure")
    data = args.data
    if args.data_per_class is not None:
        if not data or args.data_per_class < 1:
            raise ValueError(
                "--data-per-class needs --data (the folder to generate the set in) and N >= 1"
            )
        # only the image folder's training split matters here: the other parts at their minimum
        ensure_generated(
            data,
            SyntheticSpec(
                cls_train_per_class=args.data_per_class,
                cls_val_per_class=1,
                det_trainval_images=2,
                det_test_images=2,
            ),
            workers=os.cpu_count() or 1,
        )
    if args.det_images is not None:
        if not data or args.data_per_class is not None or args.det_images < 2:
            raise ValueError(
                "--det-images needs --data (the folder to generate the set in), N >= 2, and "
                "no --data-per-class"
            )
        from experiments.benchmark.det_startup import detstartup_spec

        ensure_generated(data, detstartup_spec(args.det_images), workers=os.cpu_count() or 1)
    generate = data is None and any(g in ("data", "e2e", "startup", "detstartup") for g in groups)
    cfg = BenchConfig(
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        reps=args.reps,
        steps=args.steps,
        warmup=args.warmup,
        moco=args.moco,
        K=args.K,
        shuffle_bn=args.shuffle_bn,
        split_bn_groups=args.split_bn_groups,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        data=default_synthetic_root() if generate else data or "",
        data_batches=args.data_batches,
        det_ims_per_batch=args.det_ims_per_batch,
        groups=groups,
    )
    # bad flags fail before anything is written: generating the default set first had replaced
    # the main job's 20,000-image set with the 1,000-image default on a mistyped --arch
    cfg.validate(check_data=False)
    if generate:
        ensure_generated(cfg.data)
    return cfg


def _print_report(report):
    from experiments.benchmark.runner import format_table

    for name in ("fast_path", "environment"):  # a line each, the whole record is in the JSON
        items = ", ".join(f"{k} {v}" for k, v in report[name].items())
        print(f"{name.replace('_', ' ')}: {items}")
    if report["rows"]:
        print(format_table(report))
    det = report.get("detectron2")
    if det and det["status"] == "ok":
        print(
            f"detectron2 {det['config_file']}: {det['median_s'] * 1e3:.0f} ms/iter "
            f"({det['ims_per_batch']} images, {det['images_per_s']:.1f} img/s) on "
            f"{det['gpu'] or det['device']}"
        )
    elif det:
        print(f"detectron2: {det['status']}")


def run(args):
    import torch  # after parsing: --help answers at once

    from experiments.benchmark.runner import run_benchmark, time_detectron2_iteration, write_json

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if len(args.det_opts) % 2:
        raise ValueError(f"--det-opts must be KEY VALUE pairs, got {args.det_opts}")
    cfg = _config(args)
    print(f"benchmark.py: report to {args.output}", flush=True)
    report = run_benchmark(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.detection_config:
        report["detectron2"] = time_detectron2_iteration(
            args.detection_config,
            args.det_ims_per_batch,
            args.det_iters,
            device=args.device,
            opts=args.det_opts,
        )
    _print_report(report)
    write_json(report, args.output)
    print(f"benchmark.py: wrote {args.output}")


def main(argv=None):
    return run_cli("benchmark.py", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
