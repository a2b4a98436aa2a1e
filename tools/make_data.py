#!/usr/bin/env python
"""Generate (or reuse) the embedded synthetic data: image folder, VOC2007 layout and COCO JSON.

    python tools/make_data.py --root datasets/moco_det_synthetic --seed 0
    python tools/make_data.py --tasks keypoints lvis cityscapes voc_semseg   # the other tasks' formats

An existing root generated from the same settings is reused unless --force is given.
"""

import argparse
import logging
import os
import sys
import time

from moco.data.synthetic.spec import (
    CLASS_NAMES,
    TASK_FORMATS,
    SyntheticSpec,
    default_synthetic_root,
)
from moco.data.synthetic.writers import ensure_generated
from moco.utils.cli import run_cli
from moco.utils.file_io import check_output_dir

_DEFAULT = SyntheticSpec()
# flag -> SyntheticSpec field
_SPEC_FLAGS = {
    "--seed": "seed",
    "--cls-size": "cls_image_size",
    "--cls-train-per-class": "cls_train_per_class",
    "--cls-val-per-class": "cls_val_per_class",
    "--det-size": "det_image_size",
    "--det-trainval": "det_trainval_images",
    "--det-test": "det_test_images",
    "--min-objects": "det_min_objects",
    "--max-objects": "det_max_objects",
    "--jpeg-quality": "jpeg_quality",
    "--novel-classes": "novel_classes",  # the last N classes only in the detection scenes
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="make_data.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--root", default=None, help=f"output directory (default: {default_synthetic_root()})"
    )
    for flag, field in _SPEC_FLAGS.items():
        p.add_argument(
            flag,
            dest=field,
            type=int,
            default=getattr(_DEFAULT, field),
            help=f"SyntheticSpec.{field} (default: %(default)s)",
        )
    p.add_argument(
        "--tasks",
        nargs="*",
        default=[],
        metavar="FORMAT",
        help=f"also write these task formats ({', '.join(TASK_FORMATS)}; default: none, the "
        "VOC/COCO detection set only)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="rendering processes; the output does not depend on it (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="regenerate even if the root is up to date")
    return p.parse_args(argv)


def _flag_names(msg):
    for flag, field in {**_SPEC_FLAGS, "--tasks": "tasks"}.items():
        msg = msg.replace(f"SyntheticSpec.{field}", flag)
    return msg


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root or default_synthetic_root()
    check_output_dir(root, "--root")  # a file there would end in a bare "[Errno 17] File exists"
    spec = SyntheticSpec(
        **{field: getattr(args, field) for field in _SPEC_FLAGS.values()}, tasks=args.tasks
    )
    start = time.perf_counter()
    manifest = ensure_generated(root, spec, workers=max(1, args.workers), force=args.force)
    c = manifest["counts"]
    classes = f"{len(CLASS_NAMES)} classes"
    if "detection_classes" in manifest:
        classes = (
            f"imagefolder classes {', '.join(manifest['imagefolder_classes'])}; detection "
            f"classes {', '.join(manifest['detection_classes'])}"
        )
    print(
        f"{root}: {classes}; imagefolder train {c['imagefolder_train_images']} / "
        f"val {c['imagefolder_val_images']} images; VOC/COCO trainval {c['det_trainval_images']} images "
        f"{c['det_trainval_objects']} objects, test {c['det_test_images']} images "
        f"{c['det_test_objects']} objects"
        + (f"; task formats {', '.join(spec.tasks)}" if spec.tasks else "")
        + f" ({time.perf_counter() - start:.1f} s)"
    )


def main(argv=None) -> int:
    # FileExistsError / permission problems are OSErrors
    return run_cli(
        "make_data.py", lambda: run(parse_args(argv)), errors=(OSError,), rewrite=_flag_names
    )


if __name__ == "__main__":
    sys.exit(main())
