"""Bad detection data: broken VOC XML fails with the file named; unreadable images are skipped.

* :func:`check_voc_annotations` parses every annotation file of a VOC split with ``defusedxml``
  (no entity expansion, no external references) and checks what Detectron2's
  ``load_voc_instances`` and VOC evaluation (``parse_rec``: ``int()``) read: integer
  ``size/width``, ``size/height``, and per object a ``name`` among the dataset's classes and an
  integer ``bndbox``; image-set ids that would leave the dataset folder (``../x``) are refused.
  A bad file is a one-line ValueError naming it, instead of Detectron2's bare ``IndexError`` /
  ``AttributeError`` / ``ValueError`` traceback (the test split's only after training).
  :func:`register_pascal_voc_checked` registers a VOC split whose loader runs this check first.
* :func:`check_coco_json` reads a COCO annotation file before pycocotools does and checks what
  Detectron2's ``load_coco_json`` relies on: valid JSON, the top-level lists ``images``,
  ``annotations`` and ``categories``, the fields of each entry, unique ids, every annotation's
  ``image_id`` and ``category_id`` declared, a 4-number ``bbox``, segmentations (polygons of
  finite numbers near the image, RLE of the image's size), ``iscrowd`` 0 or 1, bounded category
  ids and annotation counts, and every image file on disk. A bad file is a one-line ValueError
  naming it and the offending id or key, instead of a pycocotools ``KeyError`` /
  ``AssertionError`` traceback, an orphan annotation silently lost, or a NaN polygon that runs
  the process out of memory. Keypoints, where annotations have them (:func:`check_keypoints`):
  [x, y, v] for each name of the category, v 0 / 1 / 2, labelled points inside the image. Checks run in bulk (a COCO-scale file has ~10^6 entries), one entry
  at a time only to name a fault. :func:`load_coco_checked` then hands the parsed file to
  Detectron2's ``load_coco_json`` (one parse), with the garbage collector paused.
* :func:`check_boxes` (VOC and COCO loaders alike, :func:`register_coco_checked`): every box finite
  with positive width and height (as torchvision's detectors require); a box slightly outside its
  image is clipped to it and counted, one far outside (beyond one image size) is refused.
* :func:`drop_unreadable_images`: the training images are decoded at start
  (:func:`moco.data.checks.scan_images`, sharded over ranks) as ``DATALOADER.SCAN_IMAGES`` says
  (always, never, auto: up to 50,000 files), with a scan cache per image folder so that a later
  start decodes only new or changed files; unreadable ones are dropped with one warning each, and
  more than ``DATALOADER.MAX_BAD_FRACTION`` of them (or all) is an error.
* :class:`SkipUnreadableMapper` wraps a dataset mapper: an image that fails to decode later returns
  None, which the loader answers with the next image, and is counted.
* :func:`build_checked_train_loader` puts these together for ``DefaultTrainer.build_train_loader``
  (a :class:`detection.data.order.ResumableTrainLoader`); the trainer writes the count as the
  ``data/skipped_images`` scalar (metrics.json, TensorBoard).
"""

import collections
import contextlib
import gc
import json
import logging
import math
import multiprocessing
import numbers
import os
import reprlib
from functools import partial

import defusedxml.ElementTree as DET
import numpy as np
from defusedxml import DefusedXmlException
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.pascal_voc import load_voc_instances
from detectron2.data.detection_utils import build_augmentation
from detectron2.structures import BoxMode

from detection.data.order import build_resumable_train_loader
from moco.data.checks import (
    UNREADABLE,
    ScanCache,
    bad_fraction_error,
    check_scan_mode,
    default_max_bad_fraction,
    scan_cache_path,
    scan_images,
    scan_wanted,
)

__all__ = [
    "SkipUnreadableMapper",
    "build_checked_train_loader",
    "check_boxes",
    "check_coco_json",
    "check_keypoints",
    "check_voc_annotations",
    "drop_unreadable_images",
    "load_voc_checked",
    "max_bad_fraction",
    "register_coco_checked",
    "register_pascal_voc_checked",
    "train_mapper",
]

logger = logging.getLogger(__name__)

_BOX = ("xmin", "ymin", "xmax", "ymax")


def _text(node, path, file, what):
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise ValueError(f"VOC annotation {file}: missing <{path}> in {what}")
    return found.text.strip()


def _integer(node, path, file, what):
    # VOC coordinates and sizes are integer pixels; VOC evaluation reads them with int()
    text = _text(node, path, file, what)
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"VOC annotation {file}: <{path}> in {what} is {text!r}, not an integer"
        ) from None


def check_voc_file(file, class_names):
    """Raise a one-line ValueError naming ``file`` if it is not a VOC annotation Detectron2 can load."""
    try:
        root = DET.parse(file).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"VOC annotation {file} does not exist (listed in the image set)"
        ) from None
    except DefusedXmlException as e:
        raise ValueError(
            f"VOC annotation {file}: refused unsafe XML ({type(e).__name__})"
        ) from None
    except DET.ParseError as e:
        raise ValueError(f"VOC annotation {file}: not well-formed XML ({e})") from None
    for key in ("size/width", "size/height"):
        if _integer(root, key, file, "<annotation>") <= 0:
            raise ValueError(f"VOC annotation {file}: <{key}> must be positive")
    for i, obj in enumerate(root.findall("object")):
        what = f"object {i}"
        name = _text(obj, "name", file, what)
        if name not in class_names:
            raise ValueError(
                f"VOC annotation {file}: {what} has class {name!r}, not one of the "
                f"dataset's {len(class_names)} classes"
            )
        for key in _BOX:
            _integer(obj, f"bndbox/{key}", file, what)


def check_voc_annotations(dirname, split, class_names):
    """Check every annotation file named by ``dirname/ImageSets/Main/{split}.txt``."""
    listing = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    with open(listing, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise ValueError(f"VOC image set {listing} lists no image")
    for file_id in ids:
        # an id is a file name in Annotations/ and JPEGImages/, never a path (../../outside/evil)
        if os.path.basename(file_id) != file_id or file_id.startswith("."):
            raise ValueError(
                f"VOC image set {listing}: id {file_id!r} is a path, not a file name; "
                "it would read files outside the dataset folder"
            )
        check_voc_file(os.path.join(dirname, "Annotations", file_id + ".xml"), class_names)


def check_boxes(dicts, source):
    """Check and clip the boxes of Detectron2 dataset dicts in place; returns how many were clipped.

    Refused (one-line ValueError naming ``source(d)``, the file the box came from): a non-finite
    coordinate, a non-positive width or height, a box beyond one image size outside its image (a
    typo or a sentinel such as 1e6) or wholly outside it. A box partly outside is clipped to the
    image (it would otherwise be trained on and scored as drawn).

    All boxes are checked at once (numpy, one ``BoxMode.convert`` per mode: one call per box was
    7.6 s of a 100,000-image start); when one is refused, a box-by-box pass names the first.
    """
    entries = [(d, ann) for d in dicts for ann in d.get("annotations", ())]
    if not entries:
        return 0
    try:
        values = np.array([ann["bbox"] for _, ann in entries], dtype=np.float64)
    except (TypeError, ValueError):  # ragged or not numbers
        values = None
    if values is None or values.shape != (len(entries), 4) or not np.isfinite(values).all():
        return _check_boxes_one_by_one(dicts, source)
    modes = [ann["bbox_mode"] for _, ann in entries]
    xyxy = values.copy()
    for mode in set(modes):
        rows = np.array([m == mode for m in modes])
        xyxy[rows] = BoxMode.convert(values[rows], mode, BoxMode.XYXY_ABS)
    w = np.array([d["width"] for d, _ in entries], dtype=np.float64)
    h = np.array([d["height"] for d, _ in entries], dtype=np.float64)
    x0, y0, x1, y1 = xyxy.T
    inside = np.stack(
        [np.clip(x0, 0.0, w), np.clip(y0, 0.0, h), np.clip(x1, 0.0, w), np.clip(y1, 0.0, h)], 1
    )
    changed = (inside != xyxy).any(axis=1)
    refused = (
        (x1 <= x0)
        | (y1 <= y0)
        | (x0 < -w)
        | (x1 > 2 * w)
        | (y0 < -h)
        | (y1 > 2 * h)
        | (changed & ((inside[:, 2] <= inside[:, 0]) | (inside[:, 3] <= inside[:, 1])))
    )
    if refused.any():
        return _check_boxes_one_by_one(dicts, source)
    clipped = np.flatnonzero(changed)
    for k in clipped:
        ann = entries[k][1]
        ann["bbox"], ann["bbox_mode"] = inside[k].tolist(), BoxMode.XYXY_ABS
    if len(clipped):
        example = source(entries[clipped[0]][0])
        logger.warning("clipped %d boxes to their image (e.g. in %s)", len(clipped), example)
    return len(clipped)


def _check_boxes_one_by_one(dicts, source):
    """:func:`check_boxes` a box at a time: the first refused box in order raises, named."""
    clipped, example = 0, None
    for d in dicts:
        w, h = d["width"], d["height"]
        for i, ann in enumerate(d.get("annotations", ())):
            box = ann["bbox"]
            try:
                values = [float(v) for v in box]
            except (TypeError, ValueError):
                values = [math.nan]
            if len(values) != 4 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{source(d)}: object {i} has box {box}, not 4 finite numbers")
            x0, y0, x1, y1 = BoxMode.convert(values, ann["bbox_mode"], BoxMode.XYXY_ABS)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(
                    f"{source(d)}: object {i} has box {box} with non-positive width or height"
                )
            if min(x0, x1) < -w or max(x0, x1) > 2 * w or min(y0, y1) < -h or max(y0, y1) > 2 * h:
                raise ValueError(
                    f"{source(d)}: object {i} has box {box}, far outside the {w}x{h} image"
                )
            inside = [
                min(max(x0, 0.0), w),
                min(max(y0, 0.0), h),
                min(max(x1, 0.0), w),
                min(max(y1, 0.0), h),
            ]
            if inside == [x0, y0, x1, y1]:
                continue
            if inside[2] <= inside[0] or inside[3] <= inside[1]:
                raise ValueError(
                    f"{source(d)}: object {i} has box {box}, outside the {w}x{h} image"
                )
            ann["bbox"], ann["bbox_mode"] = inside, BoxMode.XYXY_ABS
            clipped += 1
            example = example or source(d)
    if clipped:
        logger.warning("clipped %d boxes to their image (e.g. in %s)", clipped, example)
    return clipped


def load_voc_checked(dirname, split, class_names):
    """:func:`check_voc_annotations`, then Detectron2's own ``load_voc_instances``, boxes checked."""
    check_voc_annotations(dirname, split, class_names)
    dicts = load_voc_instances(dirname, split, class_names)
    check_boxes(dicts, lambda d: os.path.join(dirname, "Annotations", d["image_id"] + ".xml"))
    return dicts


_COCO_FIELDS = {  # what load_coco_json reads of each entry
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _coco_entries(data, key, what, fields=None):
    fields = fields or _COCO_FIELDS[key]
    entries = data.get(key)
    if key not in data:
        raise ValueError(
            f"{what}: missing top-level key '{key}' (COCO needs images, annotations and categories)"
        )
    if not isinstance(entries, list):
        raise ValueError(f"{what}: '{key}' must be a list, found {type(entries).__name__}")
    # in bulk first (a COCO-scale file has ~10^6 entries); an entry at a time names the first fault
    if all(type(e) is dict for e in entries) and all(
        all(field in e for e in entries) for field in fields
    ):
        ids = [e["id"] for e in entries]
        unique = set(ids) if all(type(i) is int for i in ids) else ()
        if len(unique) == len(ids):
            return entries, unique
    ids = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{what}: {key}[{i}] is a {type(entry).__name__}, not an object")
        for field in fields:
            if field not in entry:
                raise ValueError(f"{what}: {key}[{i}] has no '{field}'")
        if not _is_int(entry["id"]):
            raise ValueError(f"{what}: {key}[{i}] has id {entry['id']!r}, not an integer")
        if entry["id"] in ids:
            raise ValueError(f"{what}: {key}[{i}] repeats id {entry['id']}")
        ids.add(entry["id"])
    return entries, ids


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _missing_files(image_root, names):
    """The indices of ``names`` (below ``image_root``) that are not files, listing each folder once
    (no stat per image: the scan, or the load, reads them anyway)."""
    listed = {}
    for i, name in enumerate(names):
        folder, base = os.path.split(name)
        files = listed.get(folder)
        if files is None:
            try:
                with os.scandir(os.path.join(image_root, folder)) as entries:
                    files = listed[folder] = {e.name for e in entries if e.is_file()}
            except OSError:
                files = listed[folder] = set()
        if base not in files:
            yield i


# A COCO file's size bounds, far above real sets (COCO 2017 train: 860k annotations, at most 93 an
# image; LVIS v1 train: 1.27M) and below what exhausts a run (10^6 annotations, 50k an image, took
# 6 GB in 70 s). The two counts are config keys (DATALOADER.MAX_ANNOTATIONS*, detection.config).
MAX_ANNOTATIONS = 2_000_000
MAX_ANNOTATIONS_PER_IMAGE = 1000
MAX_POLYGONS = 1000  # polygons of one annotation
MAX_POLYGON_COORDINATES = 100_000  # numbers in one annotation's polygons (50,000 points)
MAX_CATEGORY_ID = 2**31 - 1
# how far (pixels, or this fraction of the side if larger) a polygon may reach outside its image:
# annotation tools round and overshoot a little; 1e300 or a sentinel is a broken file
_POLYGON_SLACK, _POLYGON_SLACK_FRACTION = 2.0, 0.01

_limits = {"annotations": MAX_ANNOTATIONS, "per_image": MAX_ANNOTATIONS_PER_IMAGE}


def set_annotation_limits(max_annotations, max_per_image):
    """The bounds :func:`check_coco_json` applies when a registered loader calls it (a catalog
    loader takes no arguments): DATALOADER.MAX_ANNOTATIONS and MAX_ANNOTATIONS_PER_IMAGE."""
    for key, value in (
        ("DATALOADER.MAX_ANNOTATIONS", max_annotations),
        ("DATALOADER.MAX_ANNOTATIONS_PER_IMAGE", max_per_image),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    _limits.update(annotations=max_annotations, per_image=max_per_image)


def _short(value):
    """A bounded repr (``reprlib``): a hostile value is named, never printed (or built) whole."""
    return reprlib.repr(value)


def _rle_string_counts(text):
    """The run lengths of a compressed RLE string, as pycocotools' ``rleFrString`` (maskApi.c)
    reads them, or ValueError: pycocotools decodes without checking that they fit the mask."""
    counts, p, n = [], 0, len(text)
    while p < n:
        x = k = 0
        more = True
        while more:
            c = ord(text[p]) - 48 if p < n else -1
            if not 0 <= c < 64 or k > 6:  # its alphabet; at most 35 bits a number
                raise ValueError("not a compressed RLE string")
            x |= (c & 0x1F) << (5 * k)
            more = c & 0x20
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


def _segmentation_error(segm, width, height):
    """Why ``segm`` is not a segmentation Detectron2 can use in a ``width`` x ``height`` image, or
    None. Polygons: lists of an even number (>= 6) of finite coordinates near the image; RLE:
    ``size`` the image's, ``counts`` runs (a list, or pycocotools' string) that fill it exactly."""
    if type(segm) is list:
        return _polygons_error(segm, width, height) if segm else None
    if segm is None:
        return None  # no mask: Detectron2 skips it
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if size != [height, width] or not all(map(_is_int, size)):
            return f"RLE size {_short(size)}, not the image's [height, width] [{height}, {width}]"
        if isinstance(counts, str):
            try:
                counts = _rle_string_counts(counts)
            except ValueError as e:
                return f"RLE counts {_short(counts)}: {e}"
        elif not isinstance(counts, list) or not all(map(_is_int, counts)):
            return "RLE counts that are neither a string nor a list of integers"
        if any(c < 0 for c in counts) or sum(counts) != width * height:
            return f"RLE counts that do not cover the {width}x{height} image exactly"
        return None
    return f"segmentation {_short(segm)}, neither polygons (a list of lists) nor RLE"


def _polygons_error(segm, width, height):
    """:func:`_segmentation_error` of a list of polygons (the common case, kept lean: it runs on
    every coordinate of the file, 18 million in the 100,000-image benchmark set)."""
    if len(segm) > MAX_POLYGONS:
        return f"{len(segm)} polygons, more than {MAX_POLYGONS}"
    quick = min(width, height) + _POLYGON_SLACK
    coordinates = 0
    for i, poly in enumerate(segm):
        n = len(poly) if type(poly) is list else 0
        if n < 6 or n % 2:
            return f"polygon {i}, not a list of an even number >= 6 of coordinates (3+ points)"
        coordinates += n
        if coordinates > MAX_POLYGON_COORDINATES:
            return f"polygons of more than {MAX_POLYGON_COORDINATES} coordinates"
        try:
            total = sum(poly)  # one pass: TypeError for a non-number, NaN and inf carry through
        except TypeError:
            return f"polygon {i} with a coordinate that is not a number"
        if not math.isfinite(total) and not all(map(math.isfinite, poly)):
            return f"polygon {i} with a coordinate that is not a finite number"
        if min(poly) < -_POLYGON_SLACK:
            slack_x = max(_POLYGON_SLACK, _POLYGON_SLACK_FRACTION * width)
            slack_y = max(_POLYGON_SLACK, _POLYGON_SLACK_FRACTION * height)
            if min(poly[0::2]) < -slack_x or min(poly[1::2]) < -slack_y:
                return f"polygon {i} reaching outside the {width}x{height} image"
        if max(poly) > quick:  # past the smaller side: x and y apart
            slack_x = max(_POLYGON_SLACK, _POLYGON_SLACK_FRACTION * width)
            slack_y = max(_POLYGON_SLACK, _POLYGON_SLACK_FRACTION * height)
            if max(poly[0::2]) > width + slack_x or max(poly[1::2]) > height + slack_y:
                return f"polygon {i} reaching outside the {width}x{height} image"
    return None


_NUMBER_TYPES = (int, float)  # what JSON numbers parse to (bool is neither)


def check_keypoints(what, annotations, categories, sizes):
    """COCO keypoints as Detectron2 reads them: each annotation's ``keypoints`` is [x, y, v] for
    every keypoint its category names (``categories[].keypoints``; without names, as many as the
    first annotation's), v in COCO's 0 / 1 / 2, and a labelled point (v > 0) inside its image
    (within the polygons' slack). Detectron2 would train on a wrong count reshaped into other
    keypoints' slots, or fail in the keypoint head with a shape error; a point outside the image
    is a broken file. One ValueError naming ``what``, the annotation and the field."""
    names = {}
    for category in categories:
        if "keypoints" in category:
            if not isinstance(category["keypoints"], list):
                raise ValueError(
                    f"{what}: category id {category['id']} has keypoints "
                    f"{_short(category['keypoints'])}, not a list of keypoint names"
                )
            names[category["id"]] = len(category["keypoints"])
    first = None
    for ann in annotations:
        points = ann.get("keypoints")
        if points is None:
            continue
        where = f"{what}: annotation id {ann['id']} (image id {ann['image_id']})"
        if not isinstance(points, list) or not all(map(_is_number, points)) or len(points) % 3:
            raise ValueError(
                f"{where} has keypoints {_short(points)}, not a flat list of x, y, v numbers"
            )
        count = len(points) // 3
        expected = names.get(ann["category_id"], first)
        if expected is not None and count != expected:
            source = (
                f"category id {ann['category_id']} names {expected}"
                if ann["category_id"] in names
                else f"the first annotation with keypoints has {expected}"
            )
            raise ValueError(
                f"{where} has {count} keypoints, but {source}; give [x, y, v] for each of them "
                "(v = 0 for a point that is not labelled)"
            )
        first = count if first is None else first
        width, height = sizes[ann["image_id"]]
        slack_x = max(_POLYGON_SLACK, _POLYGON_SLACK_FRACTION * width)
        slack_y = max(_POLYGON_SLACK, _POLYGON_SLACK_FRACTION * height)
        for i in range(count):
            x, y, v = points[3 * i : 3 * i + 3]
            if v not in (0, 1, 2):
                raise ValueError(
                    f"{where}: keypoint {i} has visibility {_short(v)}, not COCO's 0 (not "
                    "labelled), 1 (labelled, hidden) or 2 (visible)"
                )
            if v and not (-slack_x <= x <= width + slack_x and -slack_y <= y <= height + slack_y):
                raise ValueError(
                    f"{where}: keypoint {i} at ({x}, {y}) is outside the {width}x{height} image; "
                    "fix it or mark it not labelled (0, 0, 0)"
                )


def _annotations_pass(annotations, image_ids, category_ids, sizes, max_per_image):
    """Whether every annotation passes :func:`_raise_first_annotation_error`'s checks, in bulk
    (an annotation at a time took seconds on 250,000 annotations)."""
    on_image = [a["image_id"] for a in annotations]
    categories = [a["category_id"] for a in annotations]
    ints = all(type(i) is int for i in on_image) and all(type(c) is int for c in categories)
    if not ints or not image_ids.issuperset(on_image) or not category_ids.issuperset(categories):
        return False
    if on_image and max(collections.Counter(on_image).values()) > max_per_image:
        return False
    boxes = [a["bbox"] for a in annotations]
    if not all(type(b) is list and len(b) == 4 for b in boxes) or not all(
        type(v) in _NUMBER_TYPES for b in boxes for v in b
    ):
        return False
    crowd = [a.get("iscrowd", 0) for a in annotations]
    if not all(type(c) is int for c in crowd) or not set(crowd) <= {0, 1}:
        return False
    if any(a.get("ignore", 0) != 0 for a in annotations):
        return False
    return not any(
        _segmentation_error(a.get("segmentation"), *sizes[i]) for a, i in zip(annotations, on_image)
    )


def _raise_first_annotation_error(what, annotations, image_ids, category_ids, sizes, max_per_image):
    """The one-line ValueError of the first annotation that fails a check, in file order."""
    per_image = collections.Counter()
    for ann in annotations:
        where = f"{what}: annotation id {ann['id']}"
        if not _is_int(ann["image_id"]) or ann["image_id"] not in image_ids:
            raise ValueError(
                f"{where} has image_id {_short(ann['image_id'])}, which no entry of 'images' "
                "has; fix its image_id or remove it"
            )
        where += f" (image id {ann['image_id']})"
        per_image[ann["image_id"]] += 1
        if per_image[ann["image_id"]] > max_per_image:
            raise ValueError(
                f"{where}: the image has more than DATALOADER.MAX_ANNOTATIONS_PER_IMAGE "
                f"{max_per_image} annotations; remove duplicates or raise the bound"
            )
        if not _is_int(ann["category_id"]) or ann["category_id"] not in category_ids:
            raise ValueError(
                f"{where} has category_id {_short(ann['category_id'])}, not declared in 'categories'; "
                "declare it or fix the annotation"
            )
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(map(_is_number, box)):
            raise ValueError(
                f"{where} has bbox {_short(box)}, not [x, y, width, height]; fix or remove it"
            )
        if ann.get("iscrowd", 0) not in (0, 1) or not _is_int(ann.get("iscrowd", 0)):
            raise ValueError(
                f"{where} has iscrowd {_short(ann['iscrowd'])}, not 0 or 1; fix or remove it"
            )
        if ann.get("ignore", 0) != 0:  # Detectron2 asserts on it
            raise ValueError(
                f"{where} has ignore {_short(ann['ignore'])}, which Detectron2 does not "
                "support; remove the annotation or the key"
            )
        error = _segmentation_error(ann.get("segmentation"), *sizes[ann["image_id"]])
        if error:
            raise ValueError(f"{where} has {error}; fix or remove the annotation")
    raise AssertionError("_annotations_pass and _raise_first_annotation_error disagree")


def _read_json(path, what, expected="a JSON object"):
    """The JSON object in ``path``; a missing file, bad JSON, non-UTF-8 text or another type is
    one line starting with ``what``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} does not exist") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise ValueError(f"{what}: not valid JSON ({e.msg}: {where})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: not valid JSON (not UTF-8 text: {e.reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected {expected}, found a {type(data).__name__}")
    return data


def check_coco_json(json_file, image_root, max_annotations=None, max_per_image=None):
    """Raise a one-line ValueError naming ``json_file`` (and the id or key) if it is not a COCO
    annotation file Detectron2's ``load_coco_json`` reads correctly, or names an image that is not
    under ``image_root``; returns the parsed file. Boxes' values are :func:`check_boxes`' part,
    after the load. Segmentations (:func:`_segmentation_error`), ``iscrowd`` (0 or 1), category ids
    (0 to 2^31 - 1) and the number of annotations (``max_annotations`` in all, ``max_per_image``
    an image; default: :func:`set_annotation_limits`') are checked here: NaN polygons took
    Detectron2 to 22 GB, 1e300 to a segfault, a wrong-size RLE or ``iscrowd: "yes"`` to an
    AssertionError traceback."""
    max_annotations = max_annotations or _limits["annotations"]
    max_per_image = max_per_image or _limits["per_image"]
    what = f"COCO annotations {json_file}"
    data = _read_json(json_file, what, "a JSON object with images, annotations and categories")
    images, image_ids = _coco_entries(data, "images", what)
    annotations = data.get("annotations")
    if isinstance(annotations, list) and len(annotations) > max_annotations:
        raise ValueError(
            f"{what}: {len(annotations)} annotations, more than DATALOADER.MAX_ANNOTATIONS "
            f"{max_annotations}; raise it if the set is really that large"
        )
    annotations, _ = _coco_entries(data, "annotations", what)
    categories, category_ids = _coco_entries(data, "categories", what)
    for category in categories:
        if not 0 <= category["id"] <= MAX_CATEGORY_ID:
            raise ValueError(
                f"{what}: category id {category['id']} is outside [0, {MAX_CATEGORY_ID}]; "
                "number the categories with small integers (COCO's are 1-90)"
            )
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    if not all(type(w) is int and type(h) is int and w > 0 and h > 0 for w, h in sizes.values()):
        for image in images:
            for key in ("height", "width"):
                if not _is_int(image[key]) or image[key] <= 0:
                    raise ValueError(
                        f"{what}: image id {image['id']} has {key} {image[key]!r}, not a "
                        "positive integer"
                    )
    limits = (image_ids, category_ids, sizes, max_per_image)
    if not _annotations_pass(annotations, *limits):
        _raise_first_annotation_error(what, annotations, *limits)
    if any("keypoints" in a for a in annotations):
        check_keypoints(what, annotations, categories, sizes)
    names = [im["file_name"] for im in images]
    # a file name below image_root, never a way out of it (as VOC ids, check_voc_annotations);
    # in bulk first, then one by one where a name might be one (an image at a time took seconds)
    if not all(type(n) is str and n and n[0] != "/" and ".." not in n for n in names):
        for image in images:
            name = image["file_name"]
            if (
                not isinstance(name, str)
                or not name
                or os.path.isabs(name)
                or ".." in name.split("/")
            ):
                raise ValueError(
                    f"{what}: image id {image['id']} has file_name {_short(name)}, not a file "
                    "name below the image folder"
                )
    for i in _missing_files(image_root, names):
        path = os.path.join(image_root, names[i])
        raise ValueError(f"{what}: image id {images[i]['id']} is {path}, which does not exist")
    return data


@contextlib.contextmanager
def _coco_api_of(data):
    """Detectron2's ``load_coco_json`` builds pycocotools' ``COCO(json_file)``, a second parse of a
    file :func:`check_coco_json` has just parsed (COCO 2017 train: 448 MB, ~10 s each): inside this
    block that call gets the index of ``data`` instead (pycocotools' own ``createIndex``)."""
    import pycocotools.coco as coco_module

    original = coco_module.COCO

    def parsed(annotation_file=None):
        api = original()
        api.dataset = data
        api.createIndex()
        return api

    coco_module.COCO = parsed
    try:
        yield
    finally:
        coco_module.COCO = original


@contextlib.contextmanager
def _gc_paused(freeze=False):
    """Python's cyclic garbage collector off inside: parsing and indexing a COCO-scale file makes
    millions of containers that all stay alive, and every collection the allocations trigger
    rescans them (on the 100,000-image benchmark set, half of json.load's CPU time and 45% of
    Detectron2's load_coco_json's). They form no garbage cycles to collect. ``freeze``: what is
    alive at the end is moved out of the collector's sight (``gc.freeze``: the training set, kept
    to the end of the run, is then never rescanned, nor its pages touched in forked workers); the
    garbage of before is collected first, so that none of it is frozen for good."""
    enabled = gc.isenabled()
    if freeze:
        gc.collect()
    gc.disable()
    try:
        yield
        if freeze:
            gc.freeze()
    finally:
        if enabled:
            gc.enable()


def load_coco_checked(json_file, image_root, name):
    """:func:`check_coco_json`, then Detectron2's ``load_coco_json`` on what it parsed (the file is
    read once), boxes checked (:func:`check_boxes`); the garbage collector paused throughout."""
    with _gc_paused():
        data = check_coco_json(json_file, image_root)
        with _coco_api_of(data):
            dicts = load_coco_json(json_file, image_root, name)
        check_boxes(dicts, lambda d: f"COCO annotations {json_file} (image {d['file_name']})")
    return dicts


def register_coco_checked(name, metadata, json_file, image_root):
    """Detectron2's ``register_coco_instances`` (same metadata) with the checked loader."""
    DatasetCatalog.register(name, partial(load_coco_checked, json_file, image_root, name))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


def register_pascal_voc_checked(name, dirname, split, year, class_names):
    """Detectron2's ``register_pascal_voc`` (same metadata) with the checked loader."""
    DatasetCatalog.register(name, partial(load_voc_checked, dirname, split, list(class_names)))
    MetadataCatalog.get(name).set(
        thing_classes=list(class_names), dirname=dirname, year=year, split=split
    )


def max_bad_fraction(cfg):
    """DATALOADER.MAX_BAD_FRACTION (added by detection.config.add_moco_det_config), else moco's default."""
    return cfg.DATALOADER.get("MAX_BAD_FRACTION", default_max_bad_fraction())


def scan_mode(cfg):
    """DATALOADER.SCAN_IMAGES (detection.config), checked; moco's DATA.SCAN_IMAGES default without."""
    from moco.config import get_cfg as moco_defaults

    mode = cfg.DATALOADER.get("SCAN_IMAGES", moco_defaults().DATA.SCAN_IMAGES)
    return check_scan_mode(mode, "DATALOADER.SCAN_IMAGES")


def drop_unreadable_images(
    dataset_dicts, what, max_fraction, scan="always", cache_dir=None, cache_in_folders=True
):
    """(readable dicts, number dropped); one warning per dropped file; call in every process.

    ``scan``: DATALOADER.SCAN_IMAGES (always, never, auto: up to ``moco.config.SCAN_AUTO_MAX_FILES``
    files). The scan keeps one cache per image folder (:class:`moco.data.checks.ScanCache`, in the
    folder, else (or with ``cache_in_folders`` False) in ``cache_dir``), so a later start decodes
    only new or changed files. Without the scan, :class:`SkipUnreadableMapper` skips and counts a
    file that fails at load time."""
    files = sorted({d["file_name"] for d in dataset_dicts})
    if not scan_wanted(scan, len(files)):
        logger.info(
            "%s: %d image files, not decoded at start (DATALOADER.SCAN_IMAGES %s); one that "
            "cannot be loaded is skipped and counted",
            what,
            len(files),
            scan,
        )
        return dataset_dicts, 0
    by_folder = {}
    for path in files:
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    bad = {}
    for folder, paths in by_folder.items():  # the same order in every rank: scan_images gathers
        cache_path = scan_cache_path(folder, cache_dir, in_folder=cache_in_folders)
        cache = ScanCache(cache_path, folder, None, len(paths), what) if cache_path else None
        bad.update(scan_images(paths, cache=cache))
    if not bad:
        return dataset_dicts, 0
    error = bad_fraction_error(what, bad, len(files), max_fraction)
    if error:
        raise ValueError(error.replace("DATA.MAX_BAD_FRACTION", "DATALOADER.MAX_BAD_FRACTION"))
    for path in sorted(bad):
        logger.warning("%s: skipping unreadable image %s (%s)", what, path, bad[path])
    return [d for d in dataset_dicts if d["file_name"] not in bad], len(bad)


class SkipUnreadableMapper:
    """``mapper(d)``, or None (Detectron2's MapDataset then takes another image) when the image of
    ``d`` cannot be decoded; ``skipped`` counts those, across the data-loading workers."""

    def __init__(self, mapper):
        self.mapper = mapper
        self._skipped = multiprocessing.get_context().Value("q", 0)

    @property
    def skipped(self):
        return self._skipped.value

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except UNREADABLE as e:
            with self._skipped.get_lock():
                self._skipped.value += 1
            logger.warning(
                "skipping unreadable image %s (%s: %s)",
                dataset_dict.get("file_name"),
                type(e).__name__,
                e,
            )
            return None


def train_mapper(cfg):
    """Detectron2's training ``DatasetMapper``; for a ``SemanticSegmentor`` with
    ``INPUT.CROP.ENABLED``, its crop after the resize rather than before it: the MoCo paper's
    segmentation trains with "random scaling ..., cropping, and horizontal flipping" (appendix
    A.5), so ``CROP.SIZE`` is the size trained at. (Detectron2 crops first for the detectors.)"""
    if cfg.MODEL.META_ARCHITECTURE != "SemanticSegmentor" or not cfg.INPUT.CROP.ENABLED:
        return DatasetMapper(cfg, True)
    augmentations = build_augmentation(cfg, True)  # resize, flip
    augmentations.insert(1, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    return DatasetMapper(cfg, True, augmentations=augmentations)


def build_checked_train_loader(cfg):
    """The resumable train loader over the readable images; returns (loader, skipped_images()).

    ``skipped_images()`` = images dropped at start + images skipped at load time so far.
    """
    keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
    with _gc_paused(freeze=True):  # millions of objects that live as long as the run
        dicts = get_detection_dataset_dicts(  # the arguments of D2's _train_loader_from_config
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=keypoints,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        what = f"DATASETS.TRAIN {', '.join(cfg.DATASETS.TRAIN)}"
        # Cityscapes loaders (Detectron2's and detection.data.task_formats') take every file in a
        # city folder for an image: a scan cache there would break the next load
        cityscapes = any(
            str(MetadataCatalog.get(n).get("evaluator_type", "")).startswith("cityscapes")
            for n in cfg.DATASETS.TRAIN
        )
        dicts, dropped = drop_unreadable_images(
            dicts,
            what,
            max_bad_fraction(cfg),
            scan_mode(cfg),
            cfg.OUTPUT_DIR,
            cache_in_folders=not cityscapes,
        )
        mapper = SkipUnreadableMapper(train_mapper(cfg))
        loader = build_resumable_train_loader(cfg, dicts, mapper)
    return loader, lambda: dropped + mapper.skipped
