"""Detection start-up at COCO scale: seconds from a fresh process's start to its first training
batch, plain Detectron2 (the baseline) against the toolkit's checked start (annotation checks,
``DATALOADER.SCAN_IMAGES`` always cold / warm, never, auto), on Detectron2's builtin
``coco_2017_train`` laid over a generated set (:func:`coco_layout`).

This module runs in the timed child processes, so it imports nothing at the top beyond the
standard library: each row pays for what it imports itself (Detectron2 alone, or the toolkit).
"""

import json
import os
import tempfile

from experiments.benchmark.child import REPO, time_child_start

LAYOUT = "detectron2"  # <data>/detectron2 is the rows' DETECTRON2_DATASETS
CONFIG = os.path.join("configs", "detection", "coco_R_50_FPN_1x.yaml")  # the paper's COCO config
# the rows' OUTPUT_DIR: where a scan cache goes when the image folder is not writable
OUTPUT_DIR = os.path.join(tempfile.gettempdir(), "moco_det_benchmark", "detstartup")


def detstartup_spec(images):
    """The generated set of the 100,000-image run (``--det-images``): ``images`` detection images
    of 48 px, everything else at its minimum."""
    from moco.data.synthetic.spec import SyntheticSpec

    return SyntheticSpec(
        cls_train_per_class=1,
        cls_val_per_class=1,
        det_image_size=48,
        det_trainval_images=images,
        det_test_images=2,
    )


def coco_layout(root):
    """Detectron2's builtin COCO layout over the synthetic ``root``; returns the folder to use as
    DETECTRON2_DATASETS. ``coco/train2017`` links to ``VOC2007/JPEGImages``;
    ``coco/annotations/instances_train2017.json`` is the trainval file with COCO's 80 categories
    (the generator's 10 classes as its first 10 ids), so Detectron2's builtin metadata of
    ``coco_2017_train`` holds for it. Rewritten when the generated file is newer."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from moco.utils.file_io import atomic_write_text

    source = os.path.join(root, "coco", "annotations", "instances_trainval.json")
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"--data {root}: no {source}; give a generated synthetic root (--det-images N makes one)"
        )
    base = os.path.join(root, LAYOUT)
    images = os.path.join(base, "coco", "train2017")
    target = os.path.join(base, "coco", "annotations", "instances_train2017.json")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.islink(images):
        os.symlink(os.path.join("..", "..", "VOC2007", "JPEGImages"), images)
    if os.path.isfile(target) and os.path.getmtime(target) >= os.path.getmtime(source):
        return base
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    things = [c for c in COCO_CATEGORIES if c["isthing"]]
    ids = {c["id"]: things[i]["id"] for i, c in enumerate(data["categories"])}
    for ann in data["annotations"]:
        ann["category_id"] = ids[ann["category_id"]]
    data["categories"] = [{"id": c["id"], "name": c["name"]} for c in things]
    atomic_write_text(target, json.dumps(data, separators=(",", ":")))
    return base


def detstartup_rows(root):
    """(name, scan mode or None for plain Detectron2, cold, detail) of the rows."""
    from moco import config
    from moco.data.checks import scan_wanted
    from moco.data.synthetic.writers import read_manifest

    n = (read_manifest(root) or {}).get("counts", {}).get("det_trainval_images")
    if n is None:
        raise FileNotFoundError(f"--data {root}: not a generated synthetic root (no manifest)")
    auto = "full scan" if scan_wanted("auto", n) else "no scan"
    toolkit = "toolkit (checks, DATALOADER.SCAN_IMAGES"
    return (
        ("detectron2", None, False, f"plain Detectron2 on coco_2017_train, {n} images"),
        ("scan always cold", "always", True, f"{toolkit} always), no scan cache"),
        ("scan always warm", "always", False, f"{toolkit} always), the cache of the row above"),
        ("scan never", "never", False, f"{toolkit} never)"),
        (
            "scan auto",
            "auto",
            False,
            f"{toolkit} auto): {auto} ({n} files, threshold {config.SCAN_AUTO_MAX_FILES})",
        ),
    )


class DetStartupRunner:
    """One fresh process per repetition (:func:`detstartup_child`), timed from its start to its
    first batch; ``cold``: the image folder's scan cache is removed first."""

    def __init__(self, root, scan, workers, batch_size, cold=False):
        from moco.data.checks import scan_cache_path

        self.cold, self.datasets = cold, coco_layout(root)
        self.output = OUTPUT_DIR
        self.spec = json.dumps(
            {
                "scan": scan,
                "config": os.path.join(REPO, CONFIG),
                "opts": [
                    "DATASETS.TEST",
                    "()",
                    "DATALOADER.NUM_WORKERS",
                    str(workers),
                    "SOLVER.IMS_PER_BATCH",
                    str(batch_size),
                    "MODEL.DEVICE",
                    "cpu",
                    "OUTPUT_DIR",
                    self.output,
                ],
            }
        )
        images = os.path.join(self.datasets, "coco", "train2017")
        self.cache = scan and scan_cache_path(images, self.output)

    def warm(self, n):
        for _ in range(n):
            self.run()

    def run(self):
        if self.cold and self.cache and os.path.exists(self.cache):
            os.remove(self.cache)
        code = (
            "import json, sys; from experiments.benchmark.det_startup import detstartup_child; "
            "detstartup_child(json.loads(sys.argv[1]))"
        )
        return time_child_start(
            code, self.spec, "detection start-up", {"DETECTRON2_DATASETS": self.datasets}
        )


def detstartup_child(spec):
    """A row's process: Detectron2's ``DefaultTrainer.build_train_loader`` on its own config
    (``scan`` None: its train_net.py's imports and loader), or the toolkit's start as its
    train_net.py makes it (load_cfg, prepare_datasets, the checked loader); takes the first batch
    and says so on stdout."""
    if spec["scan"] is None:  # what Detectron2's tools/train_net.py runs up to its loader
        from detectron2.config import get_cfg
        from detectron2.engine import DefaultTrainer

        cfg = get_cfg()
        cfg.merge_from_file(spec["config"])
        cfg.merge_from_list(spec["opts"])
        loader = DefaultTrainer.build_train_loader(cfg)
    else:
        from detection.config import load_cfg
        from detection.trainer import DetectionTrainer, prepare_datasets

        cfg = load_cfg(spec["config"], spec["opts"] + ["DATALOADER.SCAN_IMAGES", spec["scan"]])
        prepare_datasets(cfg)
        loader = DetectionTrainer.build_train_loader(cfg)
    batch = next(iter(loader))
    print(f"first batch of {len(batch)} images", flush=True)
