"""Writing the embedded set: JPEGs, VOC XML, COCO JSON, the manifest, and :func:`ensure_generated`
(generate once per spec, under a lock).
"""

import json
import logging
import multiprocessing
import os
import shutil
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

import cv2
import numpy as np

from moco.data.synthetic.render import render_classification_image, render_detection_image
from moco.data.synthetic.spec import (
    _OUTPUT_DIRS,
    CLASS_NAMES,
    CLS_SPLITS,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    MARKER_NAME,
    VOC_SPLITS,
    VOC_YEAR,
    SyntheticSpec,
    default_synthetic_root,
)

logger = logging.getLogger(__name__)


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
    # category ids 1..N over the detection classes (all 10 by default)
    ids = {c: i + 1 for i, c in enumerate(spec.detection_classes())}
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
                    "category_id": ids[o["cls"]],
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
            {"id": ids[c], "name": CLASS_NAMES[c], "supercategory": "shape"}
            for c in spec.detection_classes()
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
        for c in spec.pretraining_classes():
            os.makedirs(os.path.join(root, "imagefolder", split, CLASS_NAMES[c]))
    voc = os.path.join(root, "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub))
    os.makedirs(os.path.join(root, "coco", "annotations"))

    per_class = {"train": spec.cls_train_per_class, "val": spec.cls_val_per_class}
    cls_jobs = [
        (root, spec, split, c, i)
        for split in CLS_SPLITS
        for c in spec.pretraining_classes()
        for i in range(per_class[split])
    ]
    sizes = {"trainval": spec.det_trainval_images, "test": spec.det_test_images}
    det_jobs = [(root, spec, split, i) for split in VOC_SPLITS for i in range(sizes[split])]
    with _mapper(workers, len(cls_jobs) + len(det_jobs)) as run:
        run(_write_classification, cls_jobs)
        records = run(_write_detection, det_jobs)

    cls_classes = len(spec.pretraining_classes())
    counts = {f"imagefolder_{s}_images": per_class[s] * cls_classes for s in CLS_SPLITS}
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
    if spec.novel_classes:  # by default the manifest stays as it was before the option
        manifest["imagefolder_classes"] = [CLASS_NAMES[c] for c in spec.pretraining_classes()]
        manifest["detection_classes"] = [CLASS_NAMES[c] for c in spec.detection_classes()]
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
