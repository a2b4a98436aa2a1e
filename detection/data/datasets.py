"""The embedded synthetic detection set in Detectron2's catalogs, through Detectron2's own helpers.

``register_synthetic(root)`` registers, for a root written by ``moco.data.synthetic``:

* ``synthetic_voc_trainval`` / ``synthetic_voc_test``: ``register_pascal_voc`` on ``root/VOC2007``
  (its loader runs after :func:`detection.data.checks.check_voc_annotations`)
  (year 2007 -> 11-point VOC07 AP in ``PascalVOCDetectionEvaluator``), ``evaluator_type``
  "pascal_voc" as Detectron2's builtin VOC sets;
* ``synthetic_coco_trainval`` / ``synthetic_coco_test``: ``register_coco_instances`` on
  ``root/coco/annotations/instances_{split}.json`` with images in ``root/VOC2007/JPEGImages``
  (``evaluator_type`` "coco", boxes and polygon masks; its loader checks the boxes,
  :func:`detection.data.checks.check_boxes`).

Detectron2's builtin names (``voc_2007_trainval``, ``coco_2017_train``, ...) keep their paths and
metadata; :func:`use_checked_loaders` gives them (and any name registered with Detectron2's
``register_coco_instances`` / ``register_pascal_voc``) the same checked loaders.

A root generated with ``SyntheticSpec.tasks`` also gets, per split (trainval, test), the sets
of :data:`TASK_DATASETS`: ``synthetic_kp_*`` (COCO keypoints, the checked COCO loader; metadata
``keypoint_names``, ``keypoint_flip_map``, ``keypoint_connection_rules`` and
``keypoint_oks_sigmas`` for ``TEST.KEYPOINT_OKS_SIGMAS``), ``synthetic_lvis_*`` (Detectron2's
``load_lvis_json``, evaluator_type "lvis"), ``synthetic_cityscapes_instance_*`` /
``synthetic_cityscapes_sem_seg_*`` (Detectron2's Cityscapes loaders on the PNGs, metadata as its
builtin Cityscapes sets) and ``synthetic_voc_sem_seg_*`` (``sem_seg_file_name`` dicts,
evaluator_type "sem_seg"), each loader checked first (:mod:`detection.data.task_formats`).

:func:`register_datasets` registers a user's sets from the config key ``DATASETS.REGISTER``
(``[name, "coco", annotations.json, image_folder]`` or ``[name, "voc", VOC_folder, split]``) with
those same Detectron2 helpers, so that no code is needed to name one's own data.
"""

import glob
import json
import logging
import os
from functools import partial

import defusedxml.ElementTree as DET
from defusedxml import DefusedXmlException
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

from detection.data import task_formats
from detection.data.checks import (
    load_coco_checked,
    load_voc_checked,
    register_coco_checked,
    register_pascal_voc_checked,
)
from moco.data.synthetic.spec import (
    CITYSCAPES_SPLITS,
    CITYSCAPES_THINGS,
    CLASS_NAMES,
    KEYPOINT_FLIP_MAP,
    KEYPOINT_NAMES,
    KEYPOINT_OKS_SIGMAS,
    KEYPOINT_SKELETON,
    VOC_SPLITS,
    VOC_VOID,
    VOC_YEAR,
    SyntheticSpec,
    default_synthetic_root,
)
from moco.data.synthetic.writers import read_manifest

__all__ = [
    "CLASS_NAMES",
    "SYNTHETIC_DATASETS",
    "TASK_DATASETS",
    "default_synthetic_root",
    "REGISTER_HINT",
    "evaluator_type",
    "register_datasets",
    "register_synthetic",
    "use_checked_loaders",
]

logger = logging.getLogger(__name__)

# name -> (style, split)
SYNTHETIC_DATASETS: dict[str, tuple] = {
    f"synthetic_{style}_{split}": (style, split)
    for style in ("voc", "coco")
    for split in VOC_SPLITS
}
# Detectron2's evaluator_type values the trainer scores (detection.trainer.DetectionTrainer)
EVALUATOR_TYPES = (
    "pascal_voc",
    "coco",
    "lvis",
    "cityscapes_instance",
    "sem_seg",
    "cityscapes_sem_seg",
)


def _paths(root: str, style: str, split: str) -> dict:
    voc = os.path.join(root, "VOC2007")
    if style == "voc":
        return {"dirname": voc, "check": os.path.join(voc, "ImageSets", "Main", split + ".txt")}
    json_file = os.path.join(root, "coco", "annotations", f"instances_{split}.json")
    return {
        "json_file": json_file,
        "image_root": os.path.join(voc, "JPEGImages"),
        "check": json_file,
    }


def register_synthetic(root: str | None = None) -> dict[str, str]:
    """Register the four synthetic datasets for ``root`` (default: ``default_synthetic_root()``).

    Idempotent: names already registered for the same root are left as they are; names registered
    for another root are re-pointed to this one. Raises FileNotFoundError if ``root`` was not
    generated (run ``tools/make_data.py --root ROOT`` or ``moco.data.synthetic.ensure_generated``).
    Returns {dataset name: its annotation file or image-set file}.
    """
    root = os.path.abspath(root or default_synthetic_root())
    # the detection scenes' classes: all 10, or the novel ones of SyntheticSpec.novel_classes
    classes = tuple((read_manifest(root) or {}).get("detection_classes") or CLASS_NAMES)
    registered = {}
    for name, (style, split) in SYNTHETIC_DATASETS.items():
        paths = _paths(root, style, split)
        if not os.path.isfile(paths["check"]):
            raise FileNotFoundError(
                f"synthetic dataset {name}: {paths['check']} not found; generate the data first with "
                f"`python tools/make_data.py --root {root}`"
            )
        registered[name] = paths["check"]
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("synthetic_root") == root and tuple(meta.thing_classes) == classes:
                continue
            if meta.get("synthetic_root") is None:
                raise ValueError(
                    f"dataset name {name} is already registered, not by register_synthetic; "
                    f"refusing to replace it"
                )
            logger.info("re-registering %s from %s to %s", name, meta.synthetic_root, root)
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if style == "voc":
            # Detectron2's register_pascal_voc, with the XML checked first (defusedxml, fields)
            register_pascal_voc_checked(name, paths["dirname"], split, VOC_YEAR, classes)
            MetadataCatalog.get(name).set(evaluator_type="pascal_voc", synthetic_root=root)
        else:
            metadata = {
                "thing_classes": list(classes),
                # the ids moco.data.synthetic writes (1-based); load_coco_json derives the same mapping
                "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(classes))},
                "synthetic_root": root,
            }
            register_coco_checked(name, metadata, paths["json_file"], paths["image_root"])
    registered.update(_register_tasks(root))
    return registered


# name -> (task format, split): SyntheticSpec.tasks' sets, registered when the root holds them
TASK_DATASETS: dict[str, tuple] = {
    f"synthetic_{prefix}_{split}": (task, split)
    for prefix, task in (
        ("kp", "keypoints"),
        ("lvis", "lvis"),
        ("cityscapes_instance", "cityscapes"),
        ("cityscapes_sem_seg", "cityscapes"),
        ("voc_sem_seg", "voc_semseg"),
    )
    for split in VOC_SPLITS
}


def _task_paths(root, name, task, split):
    """(the file or folder that must exist, the loader, its metadata) of one task set."""
    spec = (read_manifest(root) or {}).get("spec", {})
    classes = [CLASS_NAMES[c] for c in SyntheticSpec(**spec).detection_classes()]
    voc = os.path.join(root, "VOC2007")
    if task == "keypoints":
        json_file = os.path.join(root, "coco", "annotations", f"keypoints_{split}.json")
        meta = {
            "thing_classes": classes,
            "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(classes))},
            "keypoint_names": list(KEYPOINT_NAMES),
            "keypoint_flip_map": [list(pair) for pair in KEYPOINT_FLIP_MAP],
            # Detectron2's visualizer draws these lines (1-based skeleton -> names)
            "keypoint_connection_rules": [
                (KEYPOINT_NAMES[a - 1], KEYPOINT_NAMES[b - 1], (102, 204, 255))
                for a, b in KEYPOINT_SKELETON
            ],
            # TEST.KEYPOINT_OKS_SIGMAS for COCOEvaluator (COCO's 17 do not fit K = 5)
            "keypoint_oks_sigmas": list(KEYPOINT_OKS_SIGMAS),
            "json_file": json_file,
            "image_root": os.path.join(voc, "JPEGImages"),
            "evaluator_type": "coco",
        }
        image_root = meta["image_root"]
        return json_file, partial(load_coco_checked, json_file, image_root, name), meta
    if task == "lvis":
        json_file = os.path.join(root, "lvis", f"lvis_v0.5_{split}.json")
        meta = {
            "thing_classes": classes,
            "json_file": json_file,
            "image_root": voc,
            "evaluator_type": "lvis",
        }
        return json_file, partial(task_formats.load_lvis_checked, json_file, voc), meta
    if task == "cityscapes":
        from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

        folder = CITYSCAPES_SPLITS[split]
        image_dir = os.path.join(root, "cityscapes", "leftImg8bit", folder)
        gt_dir = os.path.join(root, "cityscapes", "gtFine", folder)
        meta = dict(_get_builtin_metadata("cityscapes"), image_dir=image_dir, gt_dir=gt_dir)
        # which shape each Cityscapes class is drawn as
        meta["shape_classes"] = dict(zip((t[0] for t in CITYSCAPES_THINGS), classes))
        if "instance" in name:
            loader = task_formats.load_cityscapes_instances_checked
            meta["evaluator_type"] = "cityscapes_instance"
        else:
            loader = task_formats.load_cityscapes_semantic_checked
            meta.update(evaluator_type="cityscapes_sem_seg", ignore_label=255)
        return gt_dir, partial(loader, image_dir, gt_dir), meta
    listing = os.path.join(voc, "ImageSets", "Segmentation", split + ".txt")
    meta = {
        "stuff_classes": ["background", *classes],
        "ignore_label": VOC_VOID,
        "dirname": voc,
        "split": split,
        "evaluator_type": "sem_seg",
    }
    return listing, partial(task_formats.load_voc_sem_seg, voc, split, len(classes)), meta


def _register_tasks(root):
    """Register the task sets ``root`` holds (its manifest's ``spec.tasks``); drop the names an
    earlier root's registration left for formats this one lacks."""
    manifest = read_manifest(root) or {}
    tasks = manifest.get("spec", {}).get("tasks", [])
    signature = json.dumps(manifest.get("spec"), sort_keys=True)
    registered = {}
    for name, (task, split) in TASK_DATASETS.items():
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if meta.get("synthetic_root") is None:
                raise ValueError(
                    f"dataset name {name} is already registered, not by register_synthetic; "
                    f"refusing to replace it"
                )
            if task in tasks and meta.synthetic_root == root and meta.synthetic_spec == signature:
                registered[name] = meta.synthetic_check
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if task not in tasks:
            continue
        if task in ("lvis", "cityscapes"):  # their evaluators run in this process, later
            task_formats.legacy_numpy_compat()
        check, loader, meta = _task_paths(root, name, task, split)
        if not os.path.exists(check):
            raise FileNotFoundError(
                f"synthetic dataset {name}: {check} not found; generate the data first with "
                f"`python tools/make_data.py --root {root} --tasks {' '.join(tasks)}`"
            )
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(
            synthetic_root=root, synthetic_spec=signature, synthetic_check=check, **meta
        )
        registered[name] = check
    return registered


# how to name one's own data: the unknown-name errors end with it
REGISTER_HINT = (
    "register your own with DATASETS.REGISTER \"[['NAME', 'coco', 'annotations.json', "
    "'image_folder']]\" (or ['NAME', 'voc', 'VOC_folder', 'split']; README: Your own data, your own method)"
)
_VOC_YEAR_USER = 2012  # a user's VOC-layout set is scored with the area AP, not VOC07's 11 points


def voc_classes(dirname, source):
    """The sorted object names of every ``dirname/Annotations/*.xml`` (all splits, so that train
    and test get the same class ids); one ValueError naming ``source`` when there are none."""
    names = set()
    for file in sorted(glob.glob(os.path.join(glob.escape(dirname), "Annotations", "*.xml"))):
        try:
            root = DET.parse(file).getroot()
        except (DefusedXmlException, DET.ParseError) as e:
            raise ValueError(f"VOC annotation {file}: not readable XML ({e})") from None
        names.update((o.findtext("name") or "").strip() for o in root.findall("object"))
    names.discard("")
    if not names:
        raise ValueError(
            f"{source}: no object names in {os.path.join(dirname, 'Annotations')}/*.xml; "
            "give the classes as a fifth item, e.g. 'cat,dog'"
        )
    return sorted(names)


def _same_registration(name, meta):
    """True when ``name`` is registered with exactly ``meta`` (a rerun in one process)."""
    if name not in DatasetCatalog.list():
        return False
    have = MetadataCatalog.get(name)
    return all(have.get(k) == v for k, v in meta.items())


def register_datasets(entries, source="DATASETS.REGISTER"):
    """Register each of ``entries`` (``DATASETS.REGISTER``) with Detectron2's own helpers:

    * ``[name, "coco", json_file, image_root]``: ``register_coco_instances`` (classes: the JSON's
      categories, in id order, mapped to contiguous ids when Detectron2 loads it);
    * ``[name, "voc", dirname, split]`` (``dirname/{Annotations,JPEGImages,ImageSets/Main}``) and
      optionally a fifth item, the classes (``"cat,dog"`` or a list): ``register_pascal_voc``;
      without it the classes are every object name in ``dirname/Annotations``, sorted.

    Paths are made absolute. A name already registered with the same files is left as it is,
    one registered by an earlier ``source`` entry is re-pointed; any other registration under
    the name (Detectron2's builtin sets, a user's code) is refused. Bad entries are one ValueError naming the
    entry. :func:`use_checked_loaders` then gives them the toolkit's checked loaders. Returns the
    names registered."""
    names = []
    for i, entry in enumerate(entries or ()):
        where = f"{source}[{i}] {list(entry) if isinstance(entry, (list, tuple)) else entry!r}"
        if not isinstance(entry, (list, tuple)) or len(entry) not in (4, 5):
            raise ValueError(
                f"{where}: expected [name, 'coco', annotations.json, image_folder] or "
                "[name, 'voc', VOC_folder, split(, classes)]"
            )
        name, kind, path, fourth = (str(x) for x in entry[:4])
        if kind not in ("coco", "voc") or (kind == "coco" and len(entry) == 5):
            raise ValueError(
                f"{where}: the kind is 'coco' (4 items) or 'voc' (4 or 5 items), not {kind!r}"
            )
        if not name:
            raise ValueError(f"{where}: empty dataset name")
        path = os.path.abspath(path)
        if kind == "coco":
            image_root = os.path.abspath(fourth)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{where}: annotation file {path} not found")
            if not os.path.isdir(image_root):
                raise FileNotFoundError(f"{where}: image folder {image_root} not found")
            meta = {"json_file": path, "image_root": image_root, "evaluator_type": "coco"}
        else:
            listing = os.path.join(path, "ImageSets", "Main", fourth + ".txt")
            if not os.path.isfile(listing):
                raise FileNotFoundError(
                    f"{where}: {listing} not found (a VOC-layout folder holds Annotations/, "
                    "JPEGImages/ and ImageSets/Main/<split>.txt)"
                )
            classes = entry[4] if len(entry) == 5 else voc_classes(path, where)
            if isinstance(classes, str):
                classes = [c.strip() for c in classes.split(",") if c.strip()]
            meta = {"dirname": path, "split": fourth, "thing_classes": [str(c) for c in classes]}
        if _same_registration(name, meta):
            names.append(name)
            continue
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("registered_by") != source:
                raise ValueError(
                    f"{where}: {name!r} is already a registered dataset (of other files); "
                    "give your set another name"
                )
            # an earlier config's own set in this process (a pipeline, a notebook): re-pointed,
            # as register_synthetic does; Detectron2's and other code's names are never replaced
            logger.info("re-registering %s for %s", name, path)
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if kind == "coco":
            register_coco_instances(name, {}, path, meta["image_root"])
        else:
            register_pascal_voc(name, path, fourth, _VOC_YEAR_USER, meta["thing_classes"])
            MetadataCatalog.get(name).set(evaluator_type="pascal_voc")
        MetadataCatalog.get(name).set(registered_by=source)
        logger.info("registered %s (%s): %s", name, kind, path)
        names.append(name)
    return names


# the loaders Detectron2's own helpers register (its builtin COCO-instance and VOC names use them)
_D2_LOADERS = {
    ("detectron2.data.datasets.coco", "register_coco_instances"): "coco",
    ("detectron2.data.datasets.pascal_voc", "register_pascal_voc"): "voc",
}


def use_checked_loaders(names) -> list[str]:
    """Re-register those of ``names`` whose loader is Detectron2's ``register_coco_instances`` /
    ``register_pascal_voc`` one (the builtin ``coco_2017_*``, ``coco_2014_*``, ``voc_*``, or a
    user's) with the checked loaders (:func:`detection.data.checks.load_coco_checked`,
    :func:`~detection.data.checks.load_voc_checked`), from the same paths and classes in their
    metadata, which stays as it is. Other loaders are left alone. Returns the names replaced."""
    replaced = []
    for name in dict.fromkeys(names):
        if name not in DatasetCatalog.list():
            continue
        loader = DatasetCatalog[name]
        qualname = getattr(loader, "__qualname__", "")
        kind = _D2_LOADERS.get((getattr(loader, "__module__", None), qualname.split(".")[0]))
        if kind is None or not qualname.endswith("<lambda>"):
            continue
        meta = MetadataCatalog.get(name)
        if kind == "coco":
            checked = partial(load_coco_checked, meta.json_file, meta.image_root, name)
        else:
            checked = partial(load_voc_checked, meta.dirname, meta.split, list(meta.thing_classes))
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, checked)
        replaced.append(name)
    if replaced:
        logger.info("annotation checks on for %s", ", ".join(replaced))
    return replaced


def evaluator_type(dataset_name: str) -> str:
    """Which evaluator scores ``dataset_name`` (its MetadataCatalog ``evaluator_type``, one of
    :data:`EVALUATOR_TYPES`).

    Works for the synthetic sets and for Detectron2's builtin sets (VOC, COCO and its keypoints,
    LVIS, Cityscapes) alike.
    """
    if dataset_name not in DatasetCatalog.list():
        raise ValueError(f"dataset {dataset_name!r} is not registered; {REGISTER_HINT}")
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if kind not in EVALUATOR_TYPES:
        raise ValueError(
            f"dataset {dataset_name!r} has evaluator_type {kind!r}; only {', '.join(EVALUATOR_TYPES)} "
            "datasets are supported"
        )
    return kind
