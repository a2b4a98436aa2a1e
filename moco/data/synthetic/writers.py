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

from moco.data.synthetic.render import (
    _rng,
    render_classification_image,
    render_detection_image,
)
from moco.data.synthetic.spec import (
    _KIND_CITYSCAPES,
    _KIND_LVIS,
    _OUTPUT_DIRS,
    CITYSCAPES_BACKGROUND,
    CITYSCAPES_CITIES,
    CITYSCAPES_SPLITS,
    CITYSCAPES_THINGS,
    CLASS_NAMES,
    CLS_SPLITS,
    GENERATOR_VERSION,
    KEYPOINT_NAMES,
    KEYPOINT_SKELETON,
    LVIS_MAX_RATE,
    LVIS_MIN_RATE,
    LVIS_NOT_EXHAUSTIVE,
    MANIFEST_NAME,
    MARKER_NAME,
    VOC_SPLITS,
    VOC_VOID,
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
    keys = ("cls", "box", "polygons", "area", "truncated", "difficult")
    if "keypoints" in spec.tasks:
        keys += ("keypoints",)
    record["objects"] = [{k: o[k] for k in keys} for o in objects]
    if "voc_semseg" in spec.tasks:
        labels = voc_segmentation_labels(spec, objects, h, w)
        _write_palette_png(os.path.join(voc, "SegmentationClass", file_id + ".png"), labels)
        # the same labels as grey values: Detectron2's mapper reads a label PNG with
        # convert("L"), which turns palette indices into the palette colours' luminance
        _write_png(os.path.join(voc, "SegmentationClassRaw", file_id + ".png"), labels)
    return record


def _write_png(path: str, array: np.ndarray):
    """A grey (uint8 / uint16) or RGB PNG; OpenCV's encoder writes no timestamps."""
    if array.ndim == 3:
        array = array[..., ::-1]  # RGB -> OpenCV's BGR
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode PNG {path}")
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (index i -> the bits of i spread over R, G, B), 256 x 3 flat."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= (c & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _write_palette_png(path: str, labels: np.ndarray):
    from PIL import Image  # PIL: OpenCV cannot write palette PNGs

    image = Image.fromarray(labels, mode="P")
    image.putpalette(voc_palette())
    image.save(path, format="PNG")


def voc_segmentation_labels(spec: SyntheticSpec, objects, h: int, w: int) -> np.ndarray:
    """VOC SegmentationClass labels: 0 background, 1..N the detection classes (in order), and
    ``VOC_VOID`` on a band one pixel either side of every boundary, as VOC marks its outlines."""
    index = {c: i + 1 for i, c in enumerate(spec.detection_classes())}
    labels = np.zeros((h, w), np.uint8)
    for o in objects:  # visible masks do not overlap
        labels[o["mask"]] = index[o["cls"]]
    kernel = np.ones((3, 3), np.uint8)
    labels[cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)] = VOC_VOID
    return labels


def _keypoint_list(points) -> list:
    """(K, 3) continuous coordinates and flags -> COCO's flat [x, y, v] * K, x and y pixel indices
    (Detectron2 adds 0.5 back); an unlabelled point is 0, 0, 0 as COCO writes it."""
    out = []
    for x, y, v in points:
        if v:
            out += [round(max(0.0, float(x) - 0.5), 2), round(max(0.0, float(y) - 0.5), 2), int(v)]
        else:
            out += [0, 0, 0]
    return out


def _keypoint_json(spec: SyntheticSpec, split: str, records) -> dict:
    """The COCO JSON of the detection scenes with COCO's keypoint fields."""
    data = _coco_json(spec, split, records)
    objects = [o for r in records for o in r["objects"]]  # the annotations' order
    for ann, o in zip(data["annotations"], objects):
        ann["keypoints"] = _keypoint_list(o["keypoints"])
        ann["num_keypoints"] = int(sum(1 for p in o["keypoints"] if p[2]))
    for cat in data["categories"]:
        cat["keypoints"] = list(KEYPOINT_NAMES)
        cat["skeleton"] = [list(e) for e in KEYPOINT_SKELETON]
    data["info"]["description"] = f"moco-det synthetic keypoint set, {split}"
    return data


def _lvis_annotate(spec: SyntheticSpec, split: str, records):
    """LVIS's federated annotation of the detection scenes, per image: each category is checked
    with its own probability (a long tail from ``LVIS_MAX_RATE`` for the first detection class to
    ``LVIS_MIN_RATE`` for the last); a checked category that is present keeps its instances (all,
    or with probability ``LVIS_NOT_EXHAUSTIVE`` only the first, and is listed in
    ``not_exhaustive_category_ids``), a checked absent one is in ``neg_category_ids``, an
    unchecked one is neither (LVIS's evaluation ignores detections of it there).
    Returns [(record, kept objects, not_exhaustive classes, negative classes)]."""
    classes = spec.detection_classes()
    n = len(classes)
    rates = [
        LVIS_MAX_RATE * (LVIS_MIN_RATE / LVIS_MAX_RATE) ** (j / max(n - 1, 1)) for j in range(n)
    ]
    out = []
    for index, r in enumerate(records):
        rng = _rng(spec.seed, _KIND_LVIS, VOC_SPLITS.index(split), 0, index)
        draws = rng.random((n, 2))  # every category's two draws, present or not: fixed streams
        kept, partial, negative = [], [], []
        for j, c in enumerate(classes):
            mine = [o for o in r["objects"] if o["cls"] == c]
            if draws[j, 0] >= rates[j]:
                continue
            if not mine:
                negative.append(c)
            elif len(mine) > 1 and draws[j, 1] < LVIS_NOT_EXHAUSTIVE:
                kept.append(mine[0])
                partial.append(c)
            else:
                kept += mine
        kept.sort(key=r["objects"].index)  # the scene's order, as COCO's file
        out.append((r, kept, partial, negative))
    return out


def _lvis_frequency(image_counts: list[int]) -> list[str]:
    """r / c / f per category by its rank in training-image count (thirds: LVIS's 10- and
    100-image bounds mean nothing at a few hundred images; ranks keep all three groups)."""
    order = sorted(range(len(image_counts)), key=lambda j: (image_counts[j], -j))
    freq = [""] * len(image_counts)
    for rank, j in enumerate(order):
        freq[j] = "rcf"[min(2, rank * 3 // len(image_counts))]
    return freq


def _lvis_json(spec: SyntheticSpec, split: str, annotated, train_annotated) -> dict:
    classes = spec.detection_classes()
    ids = {c: i + 1 for i, c in enumerate(classes)}  # LVIS: contiguous 1..N (Detectron2's rule)
    image_counts = [sum(any(o["cls"] == c for o in a[1]) for a in train_annotated) for c in classes]
    instance_counts = [sum(o["cls"] == c for a in train_annotated for o in a[1]) for c in classes]
    images, annotations = [], []
    for r, kept, partial, negative in annotated:
        images.append(
            {
                "id": r["id"],
                "file_name": r["file_id"] + ".jpg",
                # Detectron2's LVIS loader takes the last two parts: image_root + folder / name
                "coco_url": f"synthetic://VOC2007/JPEGImages/{r['file_id']}.jpg",
                "height": r["height"],
                "width": r["width"],
                "not_exhaustive_category_ids": [ids[c] for c in partial],
                "neg_category_ids": [ids[c] for c in negative],
            }
        )
        for o in kept:
            x0, y0, x1, y1 = o["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": r["id"],
                    "category_id": ids[o["cls"]],
                    "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    "area": o["area"],
                    "segmentation": o["polygons"],
                }
            )
    frequency = _lvis_frequency(image_counts)
    categories = [
        {
            "id": ids[c],
            "name": CLASS_NAMES[c],
            "synonyms": [CLASS_NAMES[c]],
            "def": f"a {CLASS_NAMES[c]} shape",
            "synset": f"{CLASS_NAMES[c]}.n.01",
            "frequency": frequency[j],
            "image_count": image_counts[j],
            "instance_count": instance_counts[j],
        }
        for j, c in enumerate(classes)
    ]
    return {
        "info": {
            "description": f"moco-det synthetic LVIS v0.5-style set, {split}",
            "version": str(GENERATOR_VERSION),
            "seed": spec.seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def cityscapes_base(split: str, index: int) -> tuple[str, str, str]:
    """(Cityscapes split folder, city, file stem ``<city>_<seq>_000019``) of scene ``index``."""
    folder = CITYSCAPES_SPLITS[split]
    cities = CITYSCAPES_CITIES[folder]
    city = cities[index % len(cities)]
    return folder, city, f"{city}_{index:06d}_000019"


def _write_cityscapes(args):
    """One Cityscapes-style scene: leftImg8bit PNG, gtFine instanceIds (uint16: label id * 1000 +
    instance number; background: its label id), labelIds, labelTrainIds and polygons.json."""
    root, spec, split, index = args
    things = spec.detection_classes()[: len(CITYSCAPES_THINGS)]
    label_of = dict(zip(things, CITYSCAPES_THINGS))
    img, objects = render_detection_image(spec, split, index, _KIND_CITYSCAPES, things)
    h, w = img.shape[:2]
    folder, city, stem = cityscapes_base(split, index)
    name, bg_id, bg_train = CITYSCAPES_BACKGROUND
    instance = np.full((h, w), bg_id, np.uint16)
    label = np.full((h, w), bg_id, np.uint8)
    train = np.full((h, w), bg_train, np.uint8)
    polygons = [{"label": name, "polygon": [[0, 0], [w, 0], [w, h], [0, h]]}]
    numbers = {}
    for o in objects:  # bottom to top, as Cityscapes' polygons are drawn
        thing, thing_id, thing_train = label_of[o["cls"]]
        number = numbers[thing] = numbers.get(thing, -1) + 1
        instance[o["mask"]] = thing_id * 1000 + number
        label[o["mask"]] = thing_id
        train[o["mask"]] = thing_train
        for p in o["polygons"]:
            points = np.round(np.asarray(p).reshape(-1, 2), 2).tolist()
            polygons.append({"label": thing, "polygon": points})
    image_dir = os.path.join(root, "cityscapes", "leftImg8bit", folder, city)
    gt_dir = os.path.join(root, "cityscapes", "gtFine", folder, city)
    _write_png(os.path.join(image_dir, f"{stem}_leftImg8bit.png"), img)
    gt = os.path.join(gt_dir, f"{stem}_gtFine_")
    _write_png(gt + "instanceIds.png", instance)
    _write_png(gt + "labelIds.png", label)
    _write_png(gt + "labelTrainIds.png", train)
    with open(gt + "polygons.json", "w", encoding="utf-8") as f:
        json.dump({"imgHeight": h, "imgWidth": w, "objects": polygons}, f, separators=(",", ":"))
    return len(objects)


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
    if "voc_semseg" in spec.tasks:
        for sub in (
            "SegmentationClass",
            "SegmentationClassRaw",
            os.path.join("ImageSets", "Segmentation"),
        ):
            os.makedirs(os.path.join(voc, sub))
    if "lvis" in spec.tasks:
        os.makedirs(os.path.join(root, "lvis"))
    if "cityscapes" in spec.tasks:
        for folder, cities in CITYSCAPES_CITIES.items():
            for kind, city in ((k, c) for k in ("leftImg8bit", "gtFine") for c in cities):
                os.makedirs(os.path.join(root, "cityscapes", kind, folder, city))

    per_class = {"train": spec.cls_train_per_class, "val": spec.cls_val_per_class}
    cls_jobs = [
        (root, spec, split, c, i)
        for split in CLS_SPLITS
        for c in spec.pretraining_classes()
        for i in range(per_class[split])
    ]
    sizes = {"trainval": spec.det_trainval_images, "test": spec.det_test_images}
    det_jobs = [(root, spec, split, i) for split in VOC_SPLITS for i in range(sizes[split])]
    city_jobs = det_jobs if "cityscapes" in spec.tasks else []
    with _mapper(workers, len(cls_jobs) + len(det_jobs) + len(city_jobs)) as run:
        run(_write_classification, cls_jobs)
        records = run(_write_detection, det_jobs)
        city_objects = run(_write_cityscapes, city_jobs)

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
    split_records = {
        split: records[sum(sizes[s] for s in VOC_SPLITS[:i]) :][: sizes[split]]
        for i, split in enumerate(VOC_SPLITS)
    }
    counts.update(_write_tasks(root, spec, split_records, city_objects))
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


def _write_json(path: str, data: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))


def _write_tasks(root: str, spec: SyntheticSpec, records: dict, city_objects: list) -> dict:
    """The opt-in task formats' files from the detection records; returns their manifest counts."""
    counts = {}
    if "keypoints" in spec.tasks:
        for split, recs in records.items():
            data = _keypoint_json(spec, split, recs)
            _write_json(os.path.join(root, "coco", "annotations", f"keypoints_{split}.json"), data)
            counts[f"keypoints_{split}_labeled"] = sum(
                a["num_keypoints"] for a in data["annotations"]
            )
    if "lvis" in spec.tasks:
        annotated = {split: _lvis_annotate(spec, split, recs) for split, recs in records.items()}
        for split in VOC_SPLITS:
            data = _lvis_json(spec, split, annotated[split], annotated["trainval"])
            _write_json(os.path.join(root, "lvis", f"lvis_v0.5_{split}.json"), data)
            counts[f"lvis_{split}_annotations"] = len(data["annotations"])
    if "cityscapes" in spec.tasks:
        offset = 0
        for split, recs in records.items():
            counts[f"cityscapes_{split}_images"] = len(recs)
            counts[f"cityscapes_{split}_instances"] = sum(city_objects[offset : offset + len(recs)])
            offset += len(recs)
    if "voc_semseg" in spec.tasks:
        for split, recs in records.items():
            listing = os.path.join(root, "VOC2007", "ImageSets", "Segmentation", split + ".txt")
            with open(listing, "w") as f:
                f.write("".join(r["file_id"] + "\n" for r in recs))
            counts[f"voc_semseg_{split}_images"] = len(recs)
    return counts


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
