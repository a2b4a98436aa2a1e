"""Deterministic embedded data: an image folder, a Pascal VOC detection set and its COCO twin.

Layout under one root (docs/DESIGN.md)::

    imagefolder/{train,val}/<class>/<class>_NNNN.jpg     one object per image
    VOC2007/JPEGImages/NNNNNN.jpg                         several objects per image
    VOC2007/Annotations/NNNNNN.xml
    VOC2007/ImageSets/Main/{trainval,test}.txt
    coco/annotations/instances_{trainval,test}.json       same detection data, images in VOC2007/JPEGImages
    spec.json                                             manifest, written last

Content (generator version 2, designed for instance discrimination; docs/RESULTS.md has the
measurements behind it). Each of the ``CLASS_NAMES`` is a shape with its own texture family
(``TEXTURE_OF_CLASS``). What tells one instance from another is object content that clusters by
class: a per-instance deformation of the outline, the texture's period, phase and orientation, the
aspect ratio, and two grey levels from ``GREY_LEVELS``. Backgrounds are low-entropy (two colours of
a pool shared by all images and a smooth ramp) and objects stand nearly upright (tilt within
``MAX_TILT_DEG``), so neither the background nor the pose is an identity key that has nothing to do
with the class; in the classification images the object fills most of the frame. Version 1's
per-image clutter, random colours and free rotation made MoCo's kNN fall below the untrained
encoder's at CPU budgets.

Detection annotation rules (the visible part of an object is what VOC and COCO annotate):
  * objects are drawn in order, later ones on top; an object's visible mask is its in-image mask
    minus the masks of the objects kept above it;
  * an occluded object with less than ``MIN_VISIBLE_FRACTION`` of its in-image area visible, or
    fewer than ``MIN_VISIBLE_PIXELS`` visible pixels, is *not drawn at all* (so nothing unannotated
    remains);
  * a kept object with less than ``DIFFICULT_VISIBLE_FRACTION`` visible is ``difficult`` in VOC
    (ignored by the VOC evaluator, used in training by Detectron2); COCO has no such flag, so it is
    an ordinary annotation there -- both versions hold the same boxes;
  * ``truncated`` = the object's full shape extends beyond the image border;
  * boxes are the extent of the visible mask: VOC xmin..xmax are 1-based inclusive pixel indices,
    COCO bbox = [xmin-1, ymin-1, width, height]; COCO segmentation polygons trace the visible mask
    exactly (holes are joined to their outline by a zero-width cut, since COCO polygons are merged
    by union); area = visible pixel count.
  * the top-most object of detection image i has class ``i % num_classes``, so every class occurs
    in a split that has at least ``num_classes`` images (VOC AP is undefined for an absent class).

Determinism: every image draws from its own ``numpy.random.Generator`` seeded with
(seed, kind, split, class, index), so output does not depend on generation order or worker count;
JPEG quality is fixed and no timestamps are written. Same spec => byte-identical files.
"""

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import cv2
import numpy as np

logger = logging.getLogger(__name__)

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
# Detection objects span this fraction of the shorter image side (log-uniform): at the study's
# 80-px input they are 20-48 px, the scale the pretraining crops show them at.
DET_MIN_SIZE, DET_MAX_SIZE = 0.25, 0.6

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

_KIND_CLS, _KIND_DET = 0, 1


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
        if self.jpeg_quality > 100:
            raise ValueError(f"SyntheticSpec.jpeg_quality must be <= 100, got {self.jpeg_quality}")

    def to_dict(self) -> dict:
        return {k: int(v) for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------------------------
# Drawing primitives


def _rng(seed: int, kind: int, split: int, cls: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, kind, split, cls, index]))


def _circle(n: int = 64, r: float = 1.0, dx: float = 0.0) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([dx + r * np.cos(t), r * np.sin(t)], 1)


def _regular(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _shape_parts(name: str, rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    """Unit-size outline of a class as [(polygon (K, 2), is_cut)]; cuts are removed from fills."""
    if name == "disk":
        return [(_circle(), False)]
    if name == "square":
        return [(np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]]), False)]
    if name == "triangle":
        return [(_regular(3), False)]
    if name == "star":
        tips, inner = _regular(5), _regular(5, rng.uniform(0.38, 0.5), -np.pi / 2 + np.pi / 5)
        return [(np.stack([tips, inner], 1).reshape(-1, 2), False)]
    if name == "ring":
        return [(_circle(), False), (_circle(r=rng.uniform(0.45, 0.6)), True)]
    if name == "cross":
        w = rng.uniform(0.25, 0.35)
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
        return [(np.array(pts, dtype=np.float64), False)]
    if name == "hexagon":
        return [(_regular(6, phase=0.0), False)]
    if name == "crescent":
        return [
            (_circle(), False),
            (_circle(r=rng.uniform(0.8, 0.9), dx=rng.uniform(0.4, 0.55)), True),
        ]
    if name == "arrow":
        w, head = rng.uniform(0.18, 0.28), rng.uniform(0.1, 0.3)
        pts = [(-1, -w), (head, -w), (head, -0.7), (1, 0), (head, 0.7), (head, w), (-1, w)]
        return [(np.array(pts, dtype=np.float64), False)]
    if name == "heart":
        t = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], 1) / 16.5, False)]
    raise ValueError(f"unknown shape {name!r}; expected one of {CLASS_NAMES}")


def _place(parts, cx, cy, radius, aspect, angle):
    """Scale (aspect-stretched), rotate and translate unit outlines to pixel coordinates."""
    sx, sy = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    return [((pts * (sx, sy)) @ rot + (cx, cy), cut) for pts, cut in parts]


def _rasterize(parts, h: int, w: int, ox: int = 0, oy: int = 0) -> np.ndarray:
    """Boolean mask of placed outlines on an h x w canvas whose origin is image pixel (ox, oy)."""
    mask = np.zeros((h, w), np.uint8)
    for pts, cut in parts:  # fills and cuts in order; sub-pixel vertices via shift=4
        q = np.round((pts - (ox, oy) - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(mask, [q], 0 if cut else 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _object_masks(parts, h: int, w: int) -> tuple[np.ndarray, bool]:
    """In-image mask and whether the full shape is cut by the image border."""
    pts = np.concatenate([p for p, _ in parts])
    x0, y0 = min(0, int(np.floor(pts[:, 0].min())) - 1), min(0, int(np.floor(pts[:, 1].min())) - 1)
    x1, y1 = max(w, int(np.ceil(pts[:, 0].max())) + 2), max(h, int(np.ceil(pts[:, 1].max())) + 2)
    full = _rasterize(parts, y1 - y0, x1 - x0, x0, y0)
    inside = full[-y0 : -y0 + h, -x0 : -x0 + w]
    return inside.copy(), bool(inside.sum() < full.sum())


def _coords(window, cx: float, cy: float, angle: float):
    x0, y0, x1, y1 = window
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    xx -= cx
    yy -= cy
    c, s = math.cos(angle), math.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _texture(family: str, rng: np.random.Generator, window, cx, cy, angle, size) -> np.ndarray:
    """A {0,1} pattern of the family over ``window`` (x0, y0, x1, y1 exclusive) in the object's
    frame; the period scales with the object's size."""
    p = max(3.0, size * rng.uniform(0.14, 0.26))
    u, v = _coords(window, cx, cy, angle + rng.uniform(-0.3, 0.3))
    h, w = u.shape
    u = u + rng.uniform(0, p)
    v = v + rng.uniform(0, p)
    if family == "stripes":
        t = np.sin(2 * np.pi * u / p) > 0
    elif family == "checker":
        t = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    elif family == "dots":
        du, dv = np.mod(u, p) - p / 2, np.mod(v, p) - p / 2
        t = du * du + dv * dv < (rng.uniform(0.28, 0.38) * p) ** 2
    elif family == "waves":
        amp, length = p * rng.uniform(0.4, 0.8), p * rng.uniform(2.0, 3.0)
        t = np.sin(2 * np.pi * (u + amp * np.sin(2 * np.pi * v / length)) / p) > 0
    elif family == "grid":
        lw = max(0.6, p * rng.uniform(0.14, 0.22))
        t = (np.abs(np.mod(u, p) - p / 2) < lw) | (np.abs(np.mod(v, p) - p / 2) < lw)
    elif family == "zigzag":
        amp, length = p * rng.uniform(0.6, 1.0), p * rng.uniform(1.2, 2.0)
        s = u + amp * np.abs(np.mod(v / length, 1.0) * 2 - 1)
        t = np.mod(s / p, 1.0) < 0.5
    elif family == "speckle":
        gh, gw = max(2, int(h / (0.7 * p))), max(2, int(w / (0.7 * p)))
        noise = rng.random((gh, gw)).astype(np.float32)
        t = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC) > 0.5
    elif family == "concentric":
        t = np.mod(np.sqrt(u * u + v * v) / p, 1.0) < 0.5
    elif family == "sunburst":
        t = np.sin(rng.integers(5, 10) * np.arctan2(v, u) + rng.uniform(0, np.pi)) > 0
    elif family == "bricks":
        row = np.floor(v / p)
        lw = max(0.7, p * 0.18)
        t = (np.mod(v, p) > lw) & (np.mod(u + row * p, 2 * p) > lw)
    else:
        raise ValueError(f"unknown texture family {family!r}; expected one of {TEXTURE_FAMILIES}")
    return t.astype(np.float32)


def _window(mask: np.ndarray):
    """Bounding window (x0, y0, x1, y1 exclusive) of a non-empty mask: texture only what is painted."""
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(mask, dtype=np.uint8))
    return x, y, x + max(w, 1), y + max(h, 1)


def _paint(img, mask, window, pattern, colours, alpha: float = 1.0):
    """Blend a two-colour pattern (covering ``window``) into ``img`` where ``mask`` is set."""
    x0, y0, x1, y1 = window
    sub, m = img[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    t = pattern[m][:, None]
    sub[m] = alpha * (t * colours[0] + (1.0 - t) * colours[1]) + (1.0 - alpha) * sub[m]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two colours of ``BACKGROUND_POOL`` blended along a random linear ramp."""
    a, b = BACKGROUND_POOL[rng.choice(len(BACKGROUND_POOL), 2, replace=False)]
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xx / w - 0.5) * math.cos(theta) + (yy / h - 0.5) * math.sin(theta) + 0.5).clip(0, 1)
    return a * (1 - ramp[..., None]) + b * ramp[..., None]


def _sensor_noise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Mild Gaussian noise; -> uint8."""
    img = img + rng.normal(0.0, NOISE_STD, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _deform(parts, rng: np.random.Generator):
    """Per-instance low-frequency radial deformation of a unit outline (the class stays legible)."""
    coef = [(k, rng.uniform(0, DEFORMATION), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    out = []
    for pts, cut in parts:
        theta = np.arctan2(pts[:, 1], pts[:, 0])
        scale = 1 + sum(a * np.sin(k * theta + p) for k, a, p in coef)
        out.append((pts * scale[:, None], cut))
    return out


def _sample_object(rng, cls: int, h: int, w: int, size: float, cx: float, cy: float, aspect: float):
    name = CLASS_NAMES[cls]
    angle = math.radians(rng.uniform(-MAX_TILT_DEG, MAX_TILT_DEG))
    parts = _place(_deform(_shape_parts(name, rng), rng), cx, cy, size / 2, aspect, angle)
    return {"cls": cls, "parts": parts, "cx": cx, "cy": cy, "angle": angle, "size": size}


def _draw_object(rng, img: np.ndarray, obj: dict, mask: np.ndarray):
    fam = TEXTURE_OF_CLASS[CLASS_NAMES[obj["cls"]]]
    win = _window(mask)
    pattern = _texture(fam, rng, win, obj["cx"], obj["cy"], obj["angle"], obj["size"])
    grey = GREY_LEVELS[rng.choice(len(GREY_LEVELS), 2, replace=False)]
    _paint(img, mask, win, pattern, (np.full(3, grey[0]), np.full(3, grey[1])))


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons whose rasterisation (pycocotools) equals ``mask``, holes included.

    Traced on a 4x nearest-upsampled mask so the outline runs just outside the boundary pixel
    centres; each hole is joined to its outline by a zero-width cut (COCO merges polygons by
    union, so a separate hole polygon would fill it).
    """
    k = 4
    up = cv2.resize(mask.astype(np.uint8), None, fx=k, fy=k, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue  # a hole; spliced into its parent below
        outline = cv2.approxPolyDP(contour, 1.5, True)[:, 0, :]
        child = hierarchy[i][2]
        while child != -1:
            hole = cv2.approxPolyDP(contours[child], 1.5, True)[:, 0, :]
            if len(hole) >= 3:
                d = ((outline[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
                a, b = np.unravel_index(int(np.argmin(d)), d.shape)
                outline = np.concatenate([outline[: a + 1], hole[b:], hole[: b + 1], outline[a:]])
            child = hierarchy[child][0]
        if len(outline) >= 3:  # fewer points enclose nothing (and 2 would read as a COCO box)
            polygons.append([float(x) for x in ((outline + 0.5) / k).ravel()])
    return polygons


def _polygon_area(polygons: list[list[float]]) -> float:
    return float(sum(cv2.contourArea(np.array(p, np.float32).reshape(-1, 2)) for p in polygons))


# --------------------------------------------------------------------------------------------
# Images


def render_classification_image(
    spec: SyntheticSpec, split: str, cls: int, index: int
) -> np.ndarray:
    """One RGB uint8 image of class ``cls``: a single object filling most of the frame."""
    rng = _rng(spec.seed, _KIND_CLS, CLS_SPLITS.index(split), cls, index)
    s = spec.cls_image_size
    img = _background(rng, s, s)
    size = s * rng.uniform(0.6, 0.95)
    cx, cy = s * (0.5 + rng.uniform(-0.1, 0.1)), s * (0.5 + rng.uniform(-0.1, 0.1))
    obj = _sample_object(rng, cls, s, s, size, cx, cy, math.exp(rng.uniform(-0.25, 0.25)))
    _draw_object(rng, img, obj, _rasterize(obj["parts"], s, s))
    return _sensor_noise(rng, img)


def _overlap(a, b) -> float:
    """Intersection over the smaller of two (x0, y0, x1, y1) boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-6)


def _mask_box(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())  # inclusive, 0-based


def render_detection_image(spec: SyntheticSpec, split: str, index: int):
    """One detection image and its annotations.

    Returns (RGB uint8 image, objects); each object is a dict with class index ``cls``, ``box``
    (0-based inclusive pixel indices x0, y0, x1, y1 of the visible mask), ``polygons``, ``area``,
    ``truncated``, ``difficult`` and ``visible`` (visible fraction of its in-image area).
    """
    rng = _rng(spec.seed, _KIND_DET, VOC_SPLITS.index(split), 0, index)
    num_classes = len(CLASS_NAMES)
    long_side = spec.det_image_size
    short_side = int(round(long_side * rng.uniform(0.75, 1.0)))
    h, w = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    img = _background(rng, h, w)

    n = int(rng.integers(spec.det_min_objects, spec.det_max_objects + 1))
    classes = rng.integers(0, num_classes, n)
    classes[-1] = index % num_classes  # the top object is always kept: every class occurs
    placed = []
    for k in range(n):
        for attempt in range(10):
            size = min(h, w) * math.exp(rng.uniform(math.log(DET_MIN_SIZE), math.log(DET_MAX_SIZE)))
            aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
            cx, cy = w * rng.uniform(0.06, 0.94), h * rng.uniform(0.06, 0.94)
            obj = _sample_object(rng, int(classes[k]), h, w, size, cx, cy, aspect)
            mask, truncated = _object_masks(obj["parts"], h, w)
            if not mask.any():
                continue
            box = _mask_box(mask)
            # Keep occlusion partial: reject placements that mostly cover an earlier object's box.
            if k == n - 1 or all(_overlap(box, o["full_box"]) < 0.6 for o in placed):
                obj.update(mask=mask, truncated=truncated, full_box=box)
                placed.append(obj)
                break

    # Visibility from the top down; hidden objects are never drawn (see module docstring).
    covered = np.zeros((h, w), bool)
    kept = []
    for obj in reversed(placed):
        visible = obj["mask"] & ~covered
        npix = int(visible.sum())
        frac = npix / max(int(obj["mask"].sum()), 1)
        # the top object is unoccluded by construction; keep it even if tiny (class coverage)
        if obj is not placed[-1] and (npix < MIN_VISIBLE_PIXELS or frac < MIN_VISIBLE_FRACTION):
            continue
        polygons = mask_to_polygons(visible)
        if not polygons:
            continue
        obj.update(visible_mask=visible, visible=frac, polygons=polygons, area=float(npix))
        kept.append(obj)
        covered |= obj["mask"]
    kept.reverse()
    for obj in kept:
        _draw_object(rng, img, obj, obj["mask"])
    img = _sensor_noise(rng, img)
    objects = [
        {
            "cls": o["cls"],
            "box": _mask_box(o["visible_mask"]),
            "polygons": o["polygons"],
            "area": o["area"],
            "truncated": o["truncated"],
            "difficult": o["visible"] < DIFFICULT_VISIBLE_FRACTION,
            "visible": o["visible"],
        }
        for o in kept
    ]
    return img, objects


# --------------------------------------------------------------------------------------------
# Files


def _write_jpeg(path: str, rgb: np.ndarray, quality: int):
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise OSError(f"could not encode JPEG {path}")
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _voc_xml(file_id: str, h: int, w: int, objects) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{VOC_YEAR}"
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "moco-det synthetic"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(w)
    ET.SubElement(size, "height").text = str(h)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        el = ET.SubElement(root, "object")
        ET.SubElement(el, "name").text = CLASS_NAMES[o["cls"]]
        ET.SubElement(el, "pose").text = "Unspecified"
        ET.SubElement(el, "truncated").text = str(int(o["truncated"]))
        ET.SubElement(el, "difficult").text = str(int(o["difficult"]))
        bb = ET.SubElement(el, "bndbox")
        x0, y0, x1, y1 = o["box"]
        for tag, val in zip(("xmin", "ymin", "xmax", "ymax"), (x0 + 1, y0 + 1, x1 + 1, y1 + 1)):
            ET.SubElement(bb, tag).text = str(val)  # VOC: 1-based inclusive pixel indices
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _det_file_id(spec: SyntheticSpec, split: str, index: int) -> int:
    """1-based global image number: trainval first, then test (one JPEGImages folder, as VOC)."""
    return index + 1 + (spec.det_trainval_images if split == "test" else 0)


def _write_classification(args):
    root, spec, split, cls, index = args
    img = render_classification_image(spec, split, cls, index)
    name = CLASS_NAMES[cls]
    _write_jpeg(
        os.path.join(root, "imagefolder", split, name, f"{name}_{index:04d}.jpg"),
        img,
        spec.jpeg_quality,
    )


def _write_detection(args):
    root, spec, split, index = args
    img, objects = render_detection_image(spec, split, index)
    num = _det_file_id(spec, split, index)
    file_id = f"{num:06d}"
    voc = os.path.join(root, "VOC2007")
    _write_jpeg(os.path.join(voc, "JPEGImages", file_id + ".jpg"), img, spec.jpeg_quality)
    h, w = img.shape[:2]
    with open(os.path.join(voc, "Annotations", file_id + ".xml"), "w", encoding="utf-8") as f:
        f.write(_voc_xml(file_id, h, w, objects))
    record = {"id": num, "file_id": file_id, "height": h, "width": w}
    record["objects"] = [
        {k: o[k] for k in ("cls", "box", "polygons", "area", "truncated", "difficult")}
        for o in objects
    ]
    return record


def _coco_json(spec: SyntheticSpec, split: str, records) -> dict:
    images, annotations = [], []
    for r in records:
        images.append(
            {
                "id": r["id"],
                "file_name": r["file_id"] + ".jpg",
                "height": r["height"],
                "width": r["width"],
            }
        )
        for o in r["objects"]:
            x0, y0, x1, y1 = o["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": r["id"],
                    "category_id": o["cls"] + 1,
                    "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    "area": o["area"],
                    "iscrowd": 0,
                    "segmentation": o["polygons"],
                }
            )
    return {
        "info": {
            "description": f"moco-det synthetic detection set, {split}",
            "version": str(GENERATOR_VERSION),
            "seed": spec.seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)
        ],
    }


@contextmanager
def _mapper(workers: int, num_jobs: int):
    """A map function: serial for small sets, else over a process pool (results keep job order)."""
    if workers <= 1 or num_jobs < 64:
        yield lambda fn, jobs: [fn(j) for j in jobs]
        return
    # spawn, not fork: forking a process whose OpenCV/BLAS thread pools are running can deadlock
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield lambda fn, jobs: list(pool.map(fn, jobs, chunksize=16))


def generate(root: str, spec: SyntheticSpec = SyntheticSpec(), workers: int = 1) -> dict:
    """Write the whole set under ``root`` (stale output of an earlier set there is removed).

    ``workers`` > 1 renders in that many processes; the files do not depend on it.
    Returns the manifest, also written to ``root/spec.json`` as the last step.
    """
    start = time.perf_counter()
    _clear(root)
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, MARKER_NAME), "w").close()
    for split in CLS_SPLITS:
        for name in CLASS_NAMES:
            os.makedirs(os.path.join(root, "imagefolder", split, name))
    voc = os.path.join(root, "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub))
    os.makedirs(os.path.join(root, "coco", "annotations"))

    per_class = {"train": spec.cls_train_per_class, "val": spec.cls_val_per_class}
    cls_jobs = [
        (root, spec, split, c, i)
        for split in CLS_SPLITS
        for c in range(len(CLASS_NAMES))
        for i in range(per_class[split])
    ]
    sizes = {"trainval": spec.det_trainval_images, "test": spec.det_test_images}
    det_jobs = [(root, spec, split, i) for split in VOC_SPLITS for i in range(sizes[split])]
    with _mapper(workers, len(cls_jobs) + len(det_jobs)) as run:
        run(_write_classification, cls_jobs)
        records = run(_write_detection, det_jobs)

    counts = {f"imagefolder_{s}_images": per_class[s] * len(CLASS_NAMES) for s in CLS_SPLITS}
    offset = 0
    for split in VOC_SPLITS:
        recs = records[offset : offset + sizes[split]]
        offset += sizes[split]
        with open(os.path.join(voc, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("".join(r["file_id"] + "\n" for r in recs))
        path = os.path.join(root, "coco", "annotations", f"instances_{split}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_coco_json(spec, split, recs), f, separators=(",", ":"))
        objs = [o for r in recs for o in r["objects"]]
        counts[f"det_{split}_images"] = len(recs)
        counts[f"det_{split}_objects"] = len(objs)
        counts[f"det_{split}_difficult"] = sum(o["difficult"] for o in objs)
        counts[f"det_{split}_truncated"] = sum(o["truncated"] for o in objs)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "spec": spec.to_dict(),
        "class_names": list(CLASS_NAMES),
        "counts": counts,
    }
    with open(os.path.join(root, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    logger.info(
        "generated synthetic data in %s in %.1f s: %s", root, time.perf_counter() - start, counts
    )
    return manifest


def _clear(root: str):
    """Delete earlier output under root, but only if this module wrote it (marker present)."""
    present = [d for d in _OUTPUT_DIRS if os.path.exists(os.path.join(root, d))]
    if not present and not os.path.exists(os.path.join(root, MANIFEST_NAME)):
        return
    if not os.path.exists(os.path.join(root, MARKER_NAME)):
        raise FileExistsError(
            f"{root} already holds {', '.join(present) or MANIFEST_NAME} not written by the synthetic "
            f"generator; pass an empty or new --root, or remove them"
        )
    for name in (
        MANIFEST_NAME,
    ) + _OUTPUT_DIRS:  # manifest first: a half-cleared root is not reused
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def read_manifest(root: str) -> dict | None:
    """The manifest of a generated root, or None if there is none (or it is unreadable)."""
    try:
        with open(os.path.join(root, MANIFEST_NAME), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_generated(root: str, spec: SyntheticSpec) -> bool:
    """Whether ``root`` holds a complete set generated from ``spec`` by this generator version."""
    m = read_manifest(root)
    return (
        m is not None
        and m.get("generator_version") == GENERATOR_VERSION
        and m.get("spec") == spec.to_dict()
        and m.get("class_names") == list(CLASS_NAMES)
        and all(
            os.path.exists(os.path.join(root, "coco", "annotations", f"instances_{s}.json"))
            for s in VOC_SPLITS
        )
    )


@contextmanager
def _lock(root: str):
    """Serialise generation between processes (e.g. the ranks of a launch) on POSIX."""
    os.makedirs(root, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): callers must not race
        yield
        return
    with open(os.path.join(root, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_generated(
    root: str | None = None,
    spec: SyntheticSpec = SyntheticSpec(),
    workers: int = 1,
    force: bool = False,
) -> dict:
    """Reuse ``root`` if it holds the set of ``spec``, else (re)generate it. Returns the manifest."""
    root = root or default_synthetic_root()
    with _lock(root):
        if not force and is_generated(root, spec):
            logger.info("reusing synthetic data in %s", root)
            return read_manifest(root)
        return generate(root, spec, workers=workers)
