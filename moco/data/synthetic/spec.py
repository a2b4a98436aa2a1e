"""What the embedded set is: its classes, texture families, drawing constants, file layout names
and :class:`SyntheticSpec` (sizes, counts and seed).
"""

import dataclasses
import os

import numpy as np

# Bump when drawing or file formats change: an existing set with an older version is regenerated.
GENERATOR_VERSION = 2


CLASS_NAMES: tuple[str, ...] = (
    "disk",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "hexagon",
    "crescent",
    "arrow",
    "heart",
)


TEXTURE_OF_CLASS: dict[str, str] = {
    "disk": "stripes",
    "square": "checker",
    "triangle": "dots",
    "star": "waves",
    "ring": "grid",
    "cross": "zigzag",
    "hexagon": "speckle",
    "crescent": "concentric",
    "arrow": "sunburst",
    "heart": "bricks",
}


TEXTURE_FAMILIES: tuple[str, ...] = tuple(TEXTURE_OF_CLASS[c] for c in CLASS_NAMES)


# Backgrounds: two of these colours and a ramp, shared by every image (no identity key).
BACKGROUND_POOL = np.array(
    [
        [128, 128, 128],
        [100, 110, 120],
        [150, 140, 125],
        [90, 100, 90],
        [170, 170, 160],
        [120, 100, 100],
        [80, 90, 110],
        [140, 150, 150],
    ],
    np.float32,
)


# Objects are painted in two of these grey levels: measured, random per-instance colours are an
# identity key that survives MoCo v2's colour jitter (hue 0.1) and hides the class.
GREY_LEVELS = np.array([40, 90, 170, 220], np.float32)


MAX_TILT_DEG = 20.0  # objects stand nearly upright, as in photographs


DEFORMATION = 0.12  # amplitude of each of the 2nd-4th radial harmonics of an outline


NOISE_STD = 3.0


MIN_VISIBLE_FRACTION = 0.25


MIN_VISIBLE_PIXELS = 20


DIFFICULT_VISIBLE_FRACTION = 0.5


VOC_YEAR = 2007


VOC_SPLITS = ("trainval", "test")


CLS_SPLITS = ("train", "val")


MANIFEST_NAME = "spec.json"


# Written before anything else: marks a root (even a half-written one) as ours, so stale output
# may be deleted on regeneration without ever touching a directory this module did not create.
MARKER_NAME = ".moco_det_synthetic"


_OUTPUT_DIRS = ("imagefolder", "VOC2007", "coco")


def default_synthetic_root() -> str:
    """``$DETECTRON2_DATASETS/moco_det_synthetic`` (DETECTRON2_DATASETS defaults to ``datasets``)."""
    return os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "moco_det_synthetic")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the generated files (the manifest stores it)."""

    seed: int = 0
    cls_image_size: int = 48  # square classification / pretraining images
    # 1,000 images keep the small CPU configs' epochs short; the main job (configs/pipeline/
    # embedded_cpu.yaml) asks for 2,000 per class: a 20,000-image unlabelled pretraining pool
    cls_train_per_class: int = 100
    cls_val_per_class: int = 50
    det_image_size: int = 96  # longer side of a detection image; the shorter is 75-100% of it
    det_trainval_images: int = 200  # label-scarce fine-tuning set
    det_test_images: int = 300
    det_min_objects: int = 1
    det_max_objects: int = 4
    jpeg_quality: int = 90
    # The novel-label regime (issue 24; docs/RESULTS.md, its design): N > 0 puts the last N
    # classes of CLASS_NAMES only in the detection scenes and the first 10 - N only in the image
    # folder, so no pretraining image or label is of a detection class. 0: every class in both
    # (and the manifest, files and stage keys of the sets made before this option).
    novel_classes: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"SyntheticSpec.{f.name} must be an integer, got {v!r}")
        minimum = {
            "seed": 0,
            "cls_image_size": 16,
            "cls_train_per_class": 1,
            "cls_val_per_class": 1,
            "det_image_size": 32,
            "det_min_objects": 1,
            "jpeg_quality": 1,
            # Detectron2's VOC loader cannot read a one-line image set (np.loadtxt gives a 0-d array).
            "det_trainval_images": 2,
            "det_test_images": 2,
        }
        for name, lo in minimum.items():
            if getattr(self, name) < lo:
                raise ValueError(f"SyntheticSpec.{name} must be >= {lo}, got {getattr(self, name)}")
        if self.det_max_objects < self.det_min_objects:
            raise ValueError(
                f"SyntheticSpec.det_max_objects ({self.det_max_objects}) must be >= SyntheticSpec."
                f"det_min_objects ({self.det_min_objects})"
            )
        if not 0 <= self.novel_classes <= len(CLASS_NAMES) - 2:
            raise ValueError(
                f"SyntheticSpec.novel_classes must be 0 (off) or 1-{len(CLASS_NAMES) - 2} (at "
                f"least 2 pretraining classes), got {self.novel_classes}"
            )
        if self.jpeg_quality > 100:
            raise ValueError(f"SyntheticSpec.jpeg_quality must be <= 100, got {self.jpeg_quality}")

    def to_dict(self) -> dict:
        """The spec as the manifest and the stage keys hold it; an option at its default is left
        out, so a set made before the option existed keeps its manifest and keys."""
        d = {k: int(v) for k, v in dataclasses.asdict(self).items()}
        if not d["novel_classes"]:
            del d["novel_classes"]
        return d

    def pretraining_classes(self) -> tuple[int, ...]:
        """Indices (into CLASS_NAMES) of the image folder's classes."""
        return tuple(range(len(CLASS_NAMES) - self.novel_classes))

    def detection_classes(self) -> tuple[int, ...]:
        """Indices (into CLASS_NAMES) of the classes drawn in the detection scenes."""
        n = len(CLASS_NAMES)
        return tuple(range(n - (self.novel_classes or n), n))


# Detection objects span this fraction of the shorter image side (log-uniform): at the study's
# 80-px input they are 20-48 px, the scale the pretraining crops show them at.
DET_MIN_SIZE, DET_MAX_SIZE = 0.25, 0.6


# the first seed word of an image's generator: classification or detection
_KIND_CLS, _KIND_DET = 0, 1
