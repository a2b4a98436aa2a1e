"""The throughput benchmark's settings (experiments.benchmark): kept free of torch, so the command
line can show its defaults without loading it."""

import dataclasses
import os

GROUPS = ("model", "momentum", "data", "e2e", "startup", "detstartup")
BASELINE = "official"
# groups whose baseline row is not the official algorithm
BASELINES = {"startup": "imagefolder", "detstartup": "detectron2"}


@dataclasses.dataclass
class BenchConfig:
    arch: str = "resnet50"
    image_size: int = 96
    batch_size: int = 32
    device: str = "auto"
    workers: int = 2
    reps: int = 5
    steps: int = 3  # timed steps per repetition (model / e2e rows)
    warmup: int = 1  # untimed steps per row before the first repetition
    moco: str = "v2"  # v2: MLP head, aug+, T 0.2; v1: linear head, v1 augmentation, T 0.07
    K: int = 65536
    m: float = 0.999
    shuffle_bn: str = "split"  # split (official CIFAR demo emulation) or off
    split_bn_groups: int = 8
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False  # adds a "moco-det + compile" row
    data: str = ""  # image folder (train/<class>/) or a synthetic root (imagefolder/train/...)
    data_batches: int = 3  # timed batches per repetition, rounded up to whole rounds of workers
    momentum_updates: int = 5  # timed updates per repetition (momentum rows)
    det_ims_per_batch: int = 2  # detstartup rows' SOLVER.IMS_PER_BATCH (the paper's 16 / 8 GPUs)
    groups: tuple = ("model", "momentum", "data")
    seed: int = 0

    def validate(self, check_data=True):
        from moco import fast as fastlib
        from moco.modeling.resnet import resnet_encoder

        for name in (
            "image_size",
            "batch_size",
            "reps",
            "steps",
            "data_batches",
            "momentum_updates",
            "split_bn_groups",
            "K",
            "det_ims_per_batch",
        ):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.workers < 0:
            raise ValueError("--warmup and --workers must be >= 0")
        resnet_encoder(self.arch)
        if self.moco not in ("v1", "v2"):
            raise ValueError(f"--moco must be v1 or v2, got {self.moco!r}")
        if self.shuffle_bn not in ("split", "off"):
            raise ValueError(
                f"--shuffle-bn must be split or off (one process), got {self.shuffle_bn!r}"
            )
        if self.shuffle_bn == "split" and self.batch_size % self.split_bn_groups:
            raise ValueError(
                f"--batch-size {self.batch_size} is not divisible by "
                f"--split-bn-groups {self.split_bn_groups}"
            )
        if self.K % self.batch_size:
            raise ValueError(
                f"--K {self.K} is not a multiple of --batch-size {self.batch_size} "
                "(the queue takes whole batches)"
            )
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise ValueError(
                f"--rows: unknown group(s) {unknown}; choose from {', '.join(GROUPS)} or none"
            )
        fastlib.resolve_amp(self.amp, "cpu")  # value check only
        fastlib.resolve_channels_last(self.channels_last, "cpu")
        if check_data and any(g in self.groups for g in ("data", "e2e", "startup")):
            resolve_image_folder(self.data)
        if check_data and "detstartup" in self.groups:
            coco = os.path.join(self.data, "coco", "annotations", "instances_trainval.json")
            if not os.path.isfile(coco):
                raise FileNotFoundError(
                    f"--data {self.data}: no {coco} for the detstartup rows; generate the set "
                    "with --det-images N (100000: the COCO-scale run)"
                )

    @property
    def mlp(self):
        return self.moco == "v2"

    @property
    def temperature(self):
        return 0.2 if self.moco == "v2" else 0.07


def resolve_image_folder(root):
    """``root/imagefolder/train`` (a synthetic root) or ``root/train`` (an ImageFolder root)."""
    if not root:
        raise ValueError("--data is not set: give a synthetic root or a folder with train/<class>/")
    for sub in (os.path.join(root, "imagefolder", "train"), os.path.join(root, "train")):
        if os.path.isdir(sub):
            return sub
    raise FileNotFoundError(
        f"--data {root}: neither {root}/imagefolder/train nor {root}/train exists; generate the "
        "embedded data with tools/make_data.py or give a folder with train/<class>/ images"
    )
