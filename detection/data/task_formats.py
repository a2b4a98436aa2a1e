"""The paper's other task formats, checked before Detectron2's own loaders read them (issue 26).

Each check is a one-line ValueError naming the file and the field, where Detectron2 would stop
with a bare ``KeyError`` / ``AssertionError`` traceback, train on garbage, or fail only in the
evaluator after training:

* :func:`check_lvis_json` (LVIS v0.5 JSON, :func:`load_lvis_checked` then Detectron2's
  ``load_lvis_json``): every category has a ``frequency`` r / c / f (LVIS's evaluation groups
  APr / APc / APf by it; without it ``LVISEval`` fails with a KeyError after training), every
  image ``not_exhaustive_category_ids`` and ``neg_category_ids`` lists of declared categories and
  the ``coco_url`` Detectron2 takes its folder from, annotations on declared images and
  categories with polygon segmentations, every image file on disk.
* :func:`check_cityscapes` (a ``leftImg8bit`` / ``gtFine`` tree, before Detectron2's
  ``load_cityscapes_instances`` / ``load_cityscapes_semantic``): every image has its
  ``_gtFine_instanceIds.png`` / ``_labelIds.png`` (``_labelTrainIds.png`` and ``_polygons.json``
  for the semantic loader) of the image's size, and every id in them is a Cityscapes label id
  (cityscapesscripts' ``labels``; trainIds 0-18 or 255).
* :func:`load_voc_sem_seg` (VOC segmentation PNGs, ``SegmentationClassRaw``: grey label
  values, listed by ``ImageSets/Segmentation/<split>.txt``): dataset dicts with ``sem_seg_file_name`` for
  Detectron2's ``SemSegEvaluator``; each mask has its image's size and holds only 0..N (the
  background and the N classes) and 255 (void).

Keypoints are checked with the COCO JSON (:func:`detection.data.checks.check_keypoints`).
"""

import json
import os
import sys
import types

import numpy as np
from PIL import Image

from detection.data.checks import (
    _coco_entries,
    _is_int,
    _missing_files,
    _read_json,
    _segmentation_error,
    _short,
    check_boxes,
)

__all__ = [
    "CITYSCAPES_TRAIN_IDS",
    "check_cityscapes",
    "check_lvis_json",
    "check_voc_sem_seg",
    "cityscapes_files",
    "load_cityscapes_instances_checked",
    "load_cityscapes_semantic_checked",
    "load_lvis_checked",
    "load_voc_sem_seg",
    "legacy_numpy_compat",
]

_LVIS_FIELDS = {  # what Detectron2's load_lvis_json and LVISEval read of each entry
    "images": (
        "id",
        "height",
        "width",
        "coco_url",
        "not_exhaustive_category_ids",
        "neg_category_ids",
    ),
    "annotations": ("id", "image_id", "category_id", "bbox", "segmentation"),
    "categories": ("id", "name", "frequency"),
}
LVIS_FREQUENCIES = ("r", "c", "f")
VOID = 255  # VOC's and Cityscapes' "not scored" label
CITYSCAPES_TRAIN_IDS = frozenset(range(19)) | {VOID}


def lvis_image_path(image_root, image):
    """Where Detectron2's ``load_lvis_json`` looks for an image: the last two parts of its
    ``coco_url`` (split folder / file name) below ``image_root``."""
    return os.path.join(image_root, *str(image["coco_url"]).split("/")[-2:])


def check_lvis_json(json_file, image_root):
    """Raise a one-line ValueError naming ``json_file`` and the entry if it is not an LVIS file
    that Detectron2's ``load_lvis_json`` and ``LVISEvaluator`` read correctly; returns it."""
    what = f"LVIS annotations {json_file}"
    data = _read_json(json_file, what)
    categories, category_ids = _coco_entries(data, "categories", what, _LVIS_FIELDS["categories"])
    for category in categories:
        if category["frequency"] not in LVIS_FREQUENCIES:
            raise ValueError(
                f"{what}: category id {category['id']} ({_short(category['name'])}) has frequency "
                f"{_short(category['frequency'])}, not one of r, c, f (rare, common, frequent)"
            )
    images, image_ids = _coco_entries(data, "images", what, _LVIS_FIELDS["images"])
    sizes = {}
    for image in images:
        where = f"{what}: image id {image['id']}"
        for key in ("height", "width"):
            if not _is_int(image[key]) or image[key] <= 0:
                raise ValueError(f"{where} has {key} {_short(image[key])}, not a positive integer")
        sizes[image["id"]] = (image["width"], image["height"])
        for key in ("not_exhaustive_category_ids", "neg_category_ids"):
            ids = image[key]
            if not isinstance(ids, list) or not all(_is_int(i) and i in category_ids for i in ids):
                raise ValueError(
                    f"{where} has {key} {_short(ids)}, not a list of declared category ids"
                )
    annotations, _ = _coco_entries(data, "annotations", what, _LVIS_FIELDS["annotations"])
    for ann in annotations:
        where = f"{what}: annotation id {ann['id']}"
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{where} has image_id {_short(ann['image_id'])}, not in 'images'")
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"{where} has category_id {_short(ann['category_id'])}, not in 'categories'"
            )
        segm = ann["segmentation"]
        # LVIS masks are polygons; Detectron2's loader asserts on an empty or short one
        error = (
            "no polygon"
            if not isinstance(segm, list) or not segm
            else _segmentation_error(segm, *sizes[ann["image_id"]])
        )
        if error:
            raise ValueError(f"{where} has {error} in its segmentation")
    folders = {}
    for image in images:
        path = lvis_image_path(image_root, image)
        folders.setdefault(os.path.dirname(path), []).append((image, os.path.basename(path)))
    for folder, entries in folders.items():
        for i in _missing_files(folder, [name for _, name in entries]):
            image, name = entries[i]
            raise ValueError(
                f"{what}: image id {image['id']} is {os.path.join(folder, name)} (from its "
                "coco_url), which does not exist"
            )
    return data


def _in1d(a, b, assume_unique=False, invert=False):
    return np.isin(np.ravel(a), b, assume_unique=assume_unique, invert=invert)


# evaluation modules written for numpy 1 -> the names they use that numpy 2 removed
_LEGACY_NUMPY_USERS = {
    # lvis 0.5.3 (the registry's latest): np.float in LVISEval.accumulate (lvis-api issue 37,
    # fixed in its main branch, not released)
    "lvis.eval": {"float": float},
    # cityscapesscripts 2.3.0: np.in1d (removed in numpy 2.4)
    "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling": {"in1d": _in1d},
    "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling": {"in1d": _in1d},
}


def legacy_numpy_compat():
    """Give the LVIS and Cityscapes evaluation modules (Detectron2's LVISEvaluator and Cityscapes
    evaluators call them) a numpy with the old names they use (``_LEGACY_NUMPY_USERS``); numpy
    itself, and every other module, is left as it is. Returns the modules patched."""
    import importlib

    patched = []
    for module_name, names in _LEGACY_NUMPY_USERS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        missing = {k: v for k, v in names.items() if not hasattr(module.np, k)}
        if missing:
            shim = types.ModuleType("numpy")
            shim.__dict__.update(module.np.__dict__)
            shim.__dict__.update(missing)
            module.np = shim
            patched.append(module_name)
    for module_name in _LEGACY_NUMPY_USERS:
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "writeDict2JSON", None) not in (
            None,
            _write_dict_to_json,
        ):
            module.writeDict2JSON = _write_dict_to_json
            patched.append(f"{module_name}.writeDict2JSON")
    return patched


def _write_dict_to_json(data, file_name):
    """cityscapesscripts' ``writeDict2JSON`` (objects as their ``__dict__``) with numpy scalars
    as numbers: numpy 2's ``count_nonzero`` gives them, which have no ``__dict__``."""

    def default(o):
        return o.item() if isinstance(o, np.generic) else o.__dict__

    with open(file_name, "w") as f:
        f.write(json.dumps(data, default=default, sort_keys=True, indent=4))


def load_lvis_checked(json_file, image_root):
    """:func:`check_lvis_json`, then Detectron2's ``load_lvis_json`` (category ids 1..N -> 0..N-1,
    as Detectron2 maps LVIS's), boxes checked."""
    from detectron2.data.datasets.lvis import load_lvis_json

    check_lvis_json(json_file, image_root)
    # Detectron2 joins image_root and the folder as strings: the separator must be there
    dicts = load_lvis_json(json_file, os.path.join(image_root, ""))
    check_boxes(dicts, lambda d: f"LVIS annotations {json_file} (image {d['file_name']})")
    return dicts


def _png_size_and_ids(path, what):
    try:
        with Image.open(path) as image:
            return image.size, np.unique(np.asarray(image)), image.mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what}: {path} is not a readable PNG ({e})") from None


def _image_size(path, what):
    try:
        with Image.open(path) as image:  # the header only
            return image.size
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: image {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"{what}: image {path} is not readable ({e})") from None


def _size_error(mask, mask_size, image, image_size):
    return (
        f"{mask} is {mask_size[0]}x{mask_size[1]} (width x height), but its image {image} is "
        f"{image_size[0]}x{image_size[1]}; a mask labels its image's pixels one for one"
    )


def cityscapes_files(image_dir, gt_dir):
    """[(image, instanceIds, labelIds, labelTrainIds, polygons.json)] of a Cityscapes split, in
    the order Detectron2's loaders list them (cities, then files, sorted)."""
    files = []
    for city in sorted(os.listdir(image_dir)):
        for name in sorted(os.listdir(os.path.join(image_dir, city))):
            if not name.endswith("_leftImg8bit.png"):
                raise ValueError(
                    f"Cityscapes images {os.path.join(image_dir, city)}: {name} is not "
                    "<city>_<seq>_<frame>_leftImg8bit.png"
                )
            stem = os.path.join(gt_dir, city, name[: -len("leftImg8bit.png")] + "gtFine_")
            files.append(
                (
                    os.path.join(image_dir, city, name),
                    stem + "instanceIds.png",
                    stem + "labelIds.png",
                    stem + "labelTrainIds.png",
                    stem + "polygons.json",
                )
            )
    if not files:
        raise ValueError(f"Cityscapes images {image_dir}: no <city>/*_leftImg8bit.png")
    return files


def _cityscapes_labels():
    try:
        from cityscapesscripts.helpers.labels import id2label
    except ImportError:
        raise ImportError(
            "Cityscapes data needs cityscapesscripts: pip install --no-deps "
            "cityscapesscripts==2.3.0 pyquaternion (its other requirements are for its GUI and "
            "downloader)"
        ) from None
    return id2label


def check_cityscapes(image_dir, gt_dir, semantic=False):
    """Raise a one-line ValueError naming the PNG (and its image, or the ids) if a Cityscapes
    split is not what Detectron2's loaders and evaluators read correctly: each image's
    instanceIds and labelIds PNGs (``semantic``: labelTrainIds and polygons.json) of its size,
    holding Cityscapes label ids only. Returns the files (:func:`cityscapes_files`)."""
    id2label = _cityscapes_labels()
    known = np.array(sorted(i for i in id2label if i >= 0))
    with_instances = np.array(sorted(i for i, label in id2label.items() if label.hasInstances))
    files = cityscapes_files(image_dir, gt_dir)
    for image, instance, label, train, polygons in files:
        what = f"Cityscapes annotation of {image}"
        size = _image_size(image, what)
        masks = [("instance", instance), ("label", label)]
        masks += [("train", train)] if semantic else []
        for kind, mask in masks:
            mask_size, ids, _ = _png_size_and_ids(mask, what)
            if mask_size != size:
                raise ValueError(
                    f"Cityscapes annotation {_size_error(mask, mask_size, image, size)}"
                )
            if kind == "instance":  # label id * 1000 + instance number; crowd, stuff: the label id
                labels = np.where(ids >= 1000, ids // 1000, ids)
                thing = (ids >= 1000) & ~np.isin(labels, with_instances)
                bad = ids[~np.isin(labels, known) | thing]
                kind = "instance ids (label id * 1000 + n, or a label id)"
            elif kind == "label":
                bad, kind = ids[~np.isin(ids, known)], "label ids"
            else:
                bad = ids[~np.isin(ids, sorted(CITYSCAPES_TRAIN_IDS))]
                kind = "train ids (0-18, 255 void)"
            if len(bad):
                raise ValueError(
                    f"Cityscapes annotation {mask}: unknown {kind} {_short(bad.tolist())}; "
                    "Cityscapes' labels are cityscapesscripts.helpers.labels"
                )
        if semantic:
            meta = _read_json(polygons, f"Cityscapes annotation {polygons}")
            if (meta.get("imgWidth"), meta.get("imgHeight")) != size:
                raise ValueError(
                    f"Cityscapes annotation {polygons}: imgWidth x imgHeight "
                    f"{meta.get('imgWidth')}x{meta.get('imgHeight')}, but its image {image} is "
                    f"{size[0]}x{size[1]}"
                )
    return files


def load_cityscapes_instances_checked(image_dir, gt_dir):
    """:func:`check_cityscapes`, then what Detectron2's ``load_cityscapes_instances`` does from
    the PNGs (``from_json=False``: instanceIds, no shapely), boxes checked. Its per-image step
    (``_cityscapes_files_to_dict``) runs in this process: ``load_cityscapes_instances`` always
    starts a pool of at least 4 processes, which hung once in a test on a loaded 2-core machine;
    the embedded sets this loads are a few hundred images."""
    from cityscapesscripts.helpers.labels import labels
    from detectron2.data.datasets.cityscapes import _cityscapes_files_to_dict

    files = check_cityscapes(image_dir, gt_dir)
    dicts = [
        _cityscapes_files_to_dict(f[:3] + f[4:], from_json=False, to_polygons=True) for f in files
    ]
    # Detectron2's mapping of Cityscapes ids to contiguous ones (load_cityscapes_instances)
    things = [label for label in labels if label.hasInstances and not label.ignoreInEval]
    contiguous = {label.id: i for i, label in enumerate(things)}
    for d in dicts:
        for ann in d["annotations"]:
            ann["category_id"] = contiguous[ann["category_id"]]
    check_boxes(dicts, lambda d: f"Cityscapes annotation of {d['file_name']}")
    return dicts


def load_cityscapes_semantic_checked(image_dir, gt_dir):
    """:func:`check_cityscapes` (labelTrainIds and polygons.json too), then Detectron2's
    ``load_cityscapes_semantic``."""
    from detectron2.data.datasets.cityscapes import load_cityscapes_semantic

    check_cityscapes(image_dir, gt_dir, semantic=True)
    return load_cityscapes_semantic(image_dir, gt_dir)


def check_voc_sem_seg(dirname, split, num_classes, masks="SegmentationClassRaw"):
    """Raise a one-line ValueError naming the PNG if a VOC segmentation split is not what
    Detectron2's ``SemSegEvaluator`` scores correctly: every listed id's
    ``<masks>/<id>.png`` of its JPEG's size, holding only 0..``num_classes`` and 255.
    Returns the dataset dicts (``file_name``, ``sem_seg_file_name``, ``height``, ``width``)."""
    listing = os.path.join(dirname, "ImageSets", "Segmentation", split + ".txt")
    try:
        with open(listing, encoding="utf-8") as f:
            ids = f.read().split()
    except FileNotFoundError:
        raise FileNotFoundError(f"VOC segmentation image set {listing} does not exist") from None
    if not ids:
        raise ValueError(f"VOC segmentation image set {listing} lists no image")
    dicts = []
    for file_id in ids:
        if os.path.isabs(file_id) or ".." in file_id.split("/"):
            raise ValueError(f"VOC segmentation image set {listing}: {file_id!r} leaves {dirname}")
        image = os.path.join(dirname, "JPEGImages", file_id + ".jpg")
        mask = os.path.join(dirname, masks, file_id + ".png")
        what = f"VOC segmentation {mask}"
        size = _image_size(image, what)
        mask_size, values, mode = _png_size_and_ids(mask, "VOC segmentation")
        if mode != "L":
            raise ValueError(
                f"{what}: a {mode} PNG, not class indices in one channel (Detectron2's mapper "
                "reads labels as grey values: a palette PNG such as VOC's SegmentationClass "
                "gives its colours' luminance); use SegmentationClassRaw"
            )
        if mask_size != size:
            raise ValueError(f"VOC segmentation {_size_error(mask, mask_size, image, size)}")
        bad = values[(values > num_classes) & (values != VOID)]
        if len(bad):
            raise ValueError(
                f"{what}: unknown label ids {_short(bad.tolist())}; the classes are 0 "
                f"(background) to {num_classes}, and {VOID} is void"
            )
        dicts.append(
            {"file_name": image, "sem_seg_file_name": mask, "height": size[1], "width": size[0]}
        )
    return dicts


def load_voc_sem_seg(dirname, split, num_classes, masks="SegmentationClassRaw"):
    """The dataset dicts of a VOC segmentation split, checked (:func:`check_voc_sem_seg`).
    ``masks``: the folder of grey label PNGs (DeepLab's ``SegmentationClassRaw``): Detectron2's
    mapper reads a label PNG with ``convert("L")``, which turns VOC's palette PNGs
    (``SegmentationClass``) into their colours' luminance."""
    return check_voc_sem_seg(dirname, split, num_classes, masks)
