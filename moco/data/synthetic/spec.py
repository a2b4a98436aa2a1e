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


_OUTPUT_DIRS = ("imagefolder", "VOC2007", "coco", "lvis", "cityscapes")


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
    # The paper's other task formats (issue 26), opt-in: any of TASK_FORMATS. Empty (the default):
    # the files, manifest and stage keys of the sets made before this option.
    tasks: tuple[str, ...] = ()

    def __post_init__(self):
        _check_tasks(self)
        for f in dataclasses.fields(self):
            if f.name == "tasks":
                continue
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
        d = {k: int(v) for k, v in dataclasses.asdict(self).items() if k != "tasks"}
        if not d["novel_classes"]:
            del d["novel_classes"]
        if self.tasks:
            d["tasks"] = list(self.tasks)
        return d

    def pretraining_classes(self) -> tuple[int, ...]:
        """Indices (into CLASS_NAMES) of the image folder's classes."""
        return tuple(range(len(CLASS_NAMES) - self.novel_classes))

    def detection_classes(self) -> tuple[int, ...]:
        """Indices (into CLASS_NAMES) of the classes drawn in the detection scenes."""
        n = len(CLASS_NAMES)
        return tuple(range(n - (self.novel_classes or n), n))


# The opt-in task formats (SyntheticSpec.tasks), in the order the manifest lists them:
#   keypoints   coco/annotations/keypoints_{trainval,test}.json: COCO keypoint JSON of the VOC scenes
#   lvis        lvis/lvis_v0.5_{trainval,test}.json: LVIS v0.5-style federated annotations of them
#   cityscapes  cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/: scenes of 8 classes as
#               Cityscapes' 8 instance classes, instanceIds / labelIds / labelTrainIds PNGs
#   voc_semseg  VOC2007/SegmentationClass/*.png (palette; 255 = void band) + ImageSets/Segmentation,
#               and SegmentationClassRaw/*.png: the same labels as grey values (what is read)
TASK_FORMATS: tuple[str, ...] = ("keypoints", "lvis", "cityscapes", "voc_semseg")


def _check_tasks(spec):
    tasks = spec.tasks
    if isinstance(tasks, str):
        tasks = [t for t in tasks.replace(",", " ").split() if t]
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"SyntheticSpec.tasks must be a list of names, got {tasks!r}")
    unknown = [t for t in tasks if t not in TASK_FORMATS]
    if unknown:
        raise ValueError(
            f"SyntheticSpec.tasks: unknown {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(TASK_FORMATS)}"
        )
    # one canonical order, so that the same set of formats is the same manifest and stage key
    object.__setattr__(spec, "tasks", tuple(t for t in TASK_FORMATS if t in tasks))


# Keypoints (tasks "keypoints"): one shared set of points in each shape's own unit frame, carried
# by the same deformation and placement as its outline, so they move with the object as a
# person's joints do. Detectron2's keypoint head is class-agnostic: one K for every category.
KEYPOINT_NAMES: tuple[str, ...] = ("center", "top", "right", "bottom", "left")
KEYPOINT_UNIT = ((0.0, 0.0), (0.0, -0.8), (0.8, 0.0), (0.0, 0.8), (-0.8, 0.0))
KEYPOINT_FLIP_MAP: tuple[tuple[str, str], ...] = (("right", "left"),)
KEYPOINT_SKELETON: tuple[tuple[int, int], ...] = ((1, 2), (1, 3), (1, 4), (1, 5))  # 1-based
# COCO's per-keypoint OKS sigmas range from 0.025 (eyes) to 0.107 (hips); these points are
# outline points defined as well as a wrist's (0.062): one value for all
KEYPOINT_OKS_SIGMAS: tuple[float, ...] = (0.062,) * len(KEYPOINT_NAMES)


# LVIS (tasks "lvis"): the chance that a category is checked on an image, from the first detection
# class's to the last's (a long tail), and that a checked category with several instances keeps
# only one and is listed as not exhaustive.
LVIS_MAX_RATE, LVIS_MIN_RATE, LVIS_NOT_EXHAUSTIVE = 0.9, 0.05, 0.2


VOC_VOID = 255  # VOC SegmentationClass: the boundary band and what is not to be scored


# Cityscapes (tasks "cityscapes"): its label ids, without a dependency on cityscapesscripts.
# Background is "road"; the scenes draw 8 shape classes, the 8 Cityscapes instance classes in order.
CITYSCAPES_BACKGROUND = ("road", 7, 0)  # name, id, trainId
CITYSCAPES_THINGS: tuple[tuple[str, int, int], ...] = (
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
)
CITYSCAPES_SPLITS = {"trainval": "train", "test": "val"}  # our split -> Cityscapes' folder name
CITYSCAPES_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt",)}


# Detection objects span this fraction of the shorter image side (log-uniform): at the study's
# 80-px input they are 20-48 px, the scale the pretraining crops show them at.
DET_MIN_SIZE, DET_MAX_SIZE = 0.25, 0.6


# the first seed word of an image's generator: classification, detection, the LVIS annotation
# draws, the Cityscapes scenes (new kinds leave the others' streams as they were)
_KIND_CLS, _KIND_DET, _KIND_LVIS, _KIND_CITYSCAPES = 0, 1, 2, 3
