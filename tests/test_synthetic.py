"""moco.data.synthetic and tools/make_data.py: layout, annotation consistency, determinism, reuse."""

import dataclasses
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO
from defusedxml import ElementTree as ET
from pycocotools.coco import COCO

from moco.data import synthetic
from moco.data.synthetic.render import mask_to_polygons, render_detection_image
from moco.data.synthetic.spec import CLASS_NAMES, TEXTURE_OF_CLASS, SyntheticSpec
from moco.data.synthetic.writers import ensure_generated, generate

TINY = SyntheticSpec(
    cls_image_size=32,
    cls_train_per_class=1,
    cls_val_per_class=1,
    det_image_size=64,
    det_trainval_images=3,
    det_test_images=2,
)


def _voc_objects(root, file_id):
    tree = ET.parse(os.path.join(root, "VOC2007", "Annotations", file_id + ".xml"))
    objs = []
    for o in tree.findall("object"):
        bb = o.find("bndbox")
        objs.append(
            {
                "name": o.find("name").text,
                "pose": o.find("pose").text,
                "truncated": int(o.find("truncated").text),
                "difficult": int(o.find("difficult").text),
                "box": tuple(int(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")),
            }
        )
    size = tree.find("size")
    return tree, objs, (int(size.find("height").text), int(size.find("width").text))


def _image_set(root, split):
    with open(os.path.join(root, "VOC2007", "ImageSets", "Main", split + ".txt")) as f:
        return f.read().split()


def _all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            if name == ".lock":
                continue
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_classes_differ_in_shape_and_texture():
    assert len(CLASS_NAMES) >= 8
    assert len(set(TEXTURE_OF_CLASS[c] for c in CLASS_NAMES)) == len(CLASS_NAMES)


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="det_test_images must be >= 2"):
        SyntheticSpec(det_test_images=1)
    with pytest.raises(ValueError, match="det_max_objects .* must be >= .*det_min_objects"):
        SyntheticSpec(det_min_objects=4, det_max_objects=3)
    with pytest.raises(ValueError, match="seed must be an integer"):
        SyntheticSpec(seed=1.5)
    with pytest.raises(ValueError, match="jpeg_quality must be <= 100"):
        SyntheticSpec(jpeg_quality=101)


def test_imagefolder_layout(synthetic_root, synthetic_spec):
    spec = synthetic_spec
    for split, n in (("train", spec.cls_train_per_class), ("val", spec.cls_val_per_class)):
        d = os.path.join(synthetic_root, "imagefolder", split)
        # class folders only: a run that scanned the folder keeps its scan cache file there
        assert sorted(e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))) == sorted(
            CLASS_NAMES
        )
        for name in CLASS_NAMES:
            files = sorted(os.listdir(os.path.join(d, name)))
            assert len(files) == n and all(f.endswith(".jpg") for f in files)
            img = cv2.imread(os.path.join(d, name, files[0]))
            assert img.shape == (synthetic_spec.cls_image_size, synthetic_spec.cls_image_size, 3)
    with open(os.path.join(synthetic_root, "spec.json")) as f:
        manifest = json.load(f)
    assert manifest["spec"] == synthetic_spec.to_dict()
    assert (
        manifest["counts"]["imagefolder_train_images"]
        == len(CLASS_NAMES) * spec.cls_train_per_class
    )


def test_classification_images_are_not_blank_and_differ():
    spec = SyntheticSpec()
    a = synthetic.render_classification_image(spec, "train", 0, 0)
    b = synthetic.render_classification_image(spec, "train", 0, 1)
    assert a.dtype == np.uint8 and a.shape == (48, 48, 3)
    assert a.std() > 20  # a textured object filling most of the frame, not a flat image
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 20  # instances of one class differ


def test_voc_xml_has_every_field_and_boxes_inside(synthetic_root, synthetic_spec):
    seen = {"trainval": set(), "test": set()}
    spec = synthetic_spec
    for split, n in (("trainval", spec.det_trainval_images), ("test", spec.det_test_images)):
        ids = _image_set(synthetic_root, split)
        assert len(ids) == n
        for file_id in ids:
            tree, objs, (h, w) = _voc_objects(synthetic_root, file_id)
            assert tree.find("filename").text == file_id + ".jpg"
            assert tree.find("size/depth").text == "3"
            img = cv2.imread(
                os.path.join(synthetic_root, "VOC2007", "JPEGImages", file_id + ".jpg")
            )
            assert img.shape == (h, w, 3)
            assert max(h, w) == synthetic_spec.det_image_size
            assert 1 <= len(objs) <= synthetic_spec.det_max_objects
            for o in objs:
                assert o["name"] in CLASS_NAMES and o["pose"] == "Unspecified"
                assert o["truncated"] in (0, 1) and o["difficult"] in (0, 1)
                x0, y0, x1, y1 = o["box"]  # 1-based inclusive
                assert 1 <= x0 <= x1 <= w and 1 <= y0 <= y1 <= h
                seen[split].add(o["name"])
    # the top object of image i has class i % num_classes: all classes in both splits
    assert seen["trainval"] == seen["test"] == set(CLASS_NAMES)
    assert set(_image_set(synthetic_root, "trainval")).isdisjoint(
        _image_set(synthetic_root, "test")
    )


def test_coco_matches_voc_and_masks_are_exact(synthetic_root):
    for split in ("trainval", "test"):
        coco = COCO(os.path.join(synthetic_root, "coco", "annotations", f"instances_{split}.json"))
        cats = coco.loadCats(coco.getCatIds())
        assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == list(CLASS_NAMES)
        ids = _image_set(synthetic_root, split)
        assert sorted(img["file_name"] for img in coco.dataset["images"]) == sorted(
            i + ".jpg" for i in ids
        )
        for img in coco.dataset["images"]:
            file_id = img["file_name"][:-4]
            assert os.path.isfile(
                os.path.join(synthetic_root, "VOC2007", "JPEGImages", img["file_name"])
            )
            _, voc, (h, w) = _voc_objects(synthetic_root, file_id)
            assert (img["height"], img["width"]) == (h, w)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            coco_objs = sorted(
                (
                    coco.cats[a["category_id"]]["name"],
                    (
                        a["bbox"][0] + 1,
                        a["bbox"][1] + 1,
                        a["bbox"][0] + a["bbox"][2],
                        a["bbox"][1] + a["bbox"][3],
                    ),
                )
                for a in anns
            )
            assert coco_objs == sorted((o["name"], o["box"]) for o in voc)
            for a in anns:
                assert a["iscrowd"] == 0
                assert a["segmentation"] and all(
                    len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"]
                )
                m = coco.annToMask(a)
                ys, xs = np.nonzero(m)
                # polygons rasterise back to the visible mask: its pixel count and its box
                assert m.sum() == a["area"]
                assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == a[
                    "bbox"
                ]


def test_mask_to_polygons_keeps_holes():
    from pycocotools import mask as mask_util

    m = np.zeros((40, 50), np.uint8)
    cv2.circle(m, (20, 20), 15, 1, -1)
    cv2.circle(m, (20, 20), 6, 0, -1)  # a ring: its hole must stay empty
    cv2.rectangle(m, (42, 5), (47, 30), 1, -1)  # a second component
    m[2, 2] = 1  # a lone pixel is a third component
    polys = mask_to_polygons(m)
    assert len(polys) == 3
    back = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, 40, 50)))
    assert back[20, 20] == 0
    assert np.array_equal(back, m)


def test_occlusion_truncation_and_difficult_rules():
    spec = SyntheticSpec()
    objs = [o for i in range(60) for o in render_detection_image(spec, "trainval", i)[1]]
    vis = np.array([o["visible"] for o in objs])
    assert (vis >= synthetic.MIN_VISIBLE_FRACTION).all()
    assert (vis < 1).any()  # some objects are partially occluded
    for o in objs:
        assert o["difficult"] == (o["visible"] < synthetic.DIFFICULT_VISIBLE_FRACTION)
    assert any(o["truncated"] for o in objs) and not all(o["truncated"] for o in objs)
    # an unoccluded truncated object must reach the border
    for i in range(20):
        img, objects = render_detection_image(spec, "trainval", i)
        h, w = img.shape[:2]
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            if o["truncated"] and o["visible"] == 1.0:
                assert x0 == 0 or y0 == 0 or x1 == w - 1 or y1 == h - 1


def test_render_is_order_independent():
    spec = SyntheticSpec(seed=3)
    first = render_detection_image(spec, "test", 4)
    render_detection_image(spec, "test", 0)
    again = render_detection_image(spec, "test", 4)
    assert np.array_equal(first[0], again[0])
    assert [o["box"] for o in first[1]] == [o["box"] for o in again[1]]


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    spec = dataclasses.replace(
        TINY, cls_train_per_class=4, cls_val_per_class=2
    )  # 65 jobs: pool used
    generate(str(tmp_path / "a"), spec, workers=1)
    generate(str(tmp_path / "b"), spec, workers=2)
    generate(str(tmp_path / "c"), dataclasses.replace(spec, seed=1))
    a, b, c = (_all_files(str(tmp_path / d)) for d in "abc")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 60 + 5
    assert all(a[k] != c[k] for k in jpgs)


def test_ensure_generated_reuses_and_regenerates(tmp_path, monkeypatch):
    root = str(tmp_path / "root")
    m1 = ensure_generated(root, TINY)
    stamp = os.stat(os.path.join(root, "spec.json")).st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("must reuse the existing set")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert ensure_generated(root, TINY) == m1
    assert os.stat(os.path.join(root, "spec.json")).st_mtime_ns == stamp
    monkeypatch.undo()

    smaller = dataclasses.replace(TINY, det_trainval_images=2, cls_val_per_class=2)
    m2 = ensure_generated(root, smaller)
    assert m2["spec"] == smaller.to_dict()
    assert len(os.listdir(os.path.join(root, "VOC2007", "JPEGImages"))) == 4  # no stale images
    assert len(os.listdir(os.path.join(root, "imagefolder", "val", "disk"))) == 2

    # an interrupted run (no manifest) is regenerated, not reused
    os.remove(os.path.join(root, "spec.json"))
    assert not synthetic.is_generated(root, smaller)
    ensure_generated(root, smaller)
    assert synthetic.is_generated(root, smaller)


def test_refuses_to_delete_foreign_data(tmp_path):
    foreign = tmp_path / "VOC2007" / "Annotations"
    foreign.mkdir(parents=True)
    (foreign / "keep.xml").write_text("<annotation/>")
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        ensure_generated(str(tmp_path), TINY)
    assert (foreign / "keep.xml").exists()


def _cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "make_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_generates_and_reports(tmp_path):
    root = str(tmp_path / "cli")
    r = _cli(
        "--root",
        root,
        "--seed",
        "5",
        "--cls-size",
        "32",
        "--cls-train-per-class",
        "2",
        "--cls-val-per-class",
        "1",
        "--det-size",
        "64",
        "--det-trainval",
        "3",
        "--det-test",
        "2",
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "trainval 3 images" in r.stdout
    with open(os.path.join(root, "spec.json")) as f:
        manifest = json.load(f)
    assert manifest["spec"]["seed"] == 5 and manifest["spec"]["det_image_size"] == 64
    assert manifest["counts"]["imagefolder_train_images"] == 2 * len(CLASS_NAMES)


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    r = _cli("--root", str(tmp_path / "x"), "--det-test", "1")
    assert r.returncode == 2
    assert r.stderr.strip() == "make_data.py: error: --det-test must be >= 2, got 1"
    (tmp_path / "y" / "coco").mkdir(parents=True)
    r = _cli("--root", str(tmp_path / "y"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not written by the synthetic generator" in r.stderr
    readme = tmp_path / "README.md"
    readme.write_text("mine\n")
    r = _cli("--root", str(readme))
    assert r.returncode == 2 and r.stderr == (
        f"make_data.py: error: --root {readme} is a file, not a folder; give a folder path\n"
    )
    assert readme.read_text() == "mine\n"


# the manifest's spec keys of every set made before SyntheticSpec.novel_classes (issue 24)
SPEC_KEYS_BEFORE_NOVEL = [
    "seed",
    "cls_image_size",
    "cls_train_per_class",
    "cls_val_per_class",
    "det_image_size",
    "det_trainval_images",
    "det_test_images",
    "det_min_objects",
    "det_max_objects",
    "jpeg_quality",
]


def test_the_default_spec_keeps_the_manifest_and_stage_keys_of_before(tmp_path, monkeypatch):
    """Issue 24: the novel-label option off (its default) leaves the generator version, the
    manifest, the demo's data stage keys and an existing set as they were: such a set is reused,
    not regenerated, and the demo's finished stages keep their folders."""
    from experiments.pipeline import data_identity, load_pipeline_cfg
    from experiments.runs import stage_key
    from moco.data.synthetic.spec import GENERATOR_VERSION

    assert GENERATOR_VERSION == 2
    assert list(TINY.to_dict()) == SPEC_KEYS_BEFORE_NOVEL
    assert SyntheticSpec(novel_classes=0) == SyntheticSpec()
    demo = load_pipeline_cfg("embedded_cpu")
    # the keys main printed before the option (output/pipeline's data-cf277b3034)
    assert stage_key(dict(demo.DATA)) == "cf277b3034"
    assert stage_key(data_identity(demo, "unused")) == "39eabb6549"
    # a set whose manifest was written before the option is reused as it is
    root = str(tmp_path / "root")
    manifest = generate(root, TINY)
    assert set(manifest) == {"generator_version", "spec", "class_names", "counts"}
    with open(os.path.join(root, "spec.json")) as f:
        assert json.load(f)["spec"] == dict(zip(SPEC_KEYS_BEFORE_NOVEL, manifest["spec"].values()))
    monkeypatch.setattr(
        synthetic, "generate", lambda *a, **k: pytest.fail("must reuse the existing set")
    )
    assert ensure_generated(root, SyntheticSpec(**manifest["spec"])) == manifest


def test_novel_classes_split_pretraining_and_detection_classes(tmp_path, synthetic_root):
    """novel_classes 5: the image folder holds the first 5 classes, the detection scenes (VOC XML,
    COCO JSON, the registered datasets) only the last 5, each of which occurs."""
    spec = dataclasses.replace(
        TINY, novel_classes=5, det_trainval_images=6, det_test_images=5, cls_train_per_class=2
    )
    root = str(tmp_path / "novel")
    manifest = ensure_generated(root, spec)
    seen, novel = list(CLASS_NAMES[:5]), list(CLASS_NAMES[5:])
    assert manifest["spec"]["novel_classes"] == 5
    assert (manifest["imagefolder_classes"], manifest["detection_classes"]) == (seen, novel)
    for split, n in (("train", 2), ("val", 1)):
        folder = os.path.join(root, "imagefolder", split)
        assert sorted(os.listdir(folder)) == sorted(seen)
        assert all(len(os.listdir(os.path.join(folder, c))) == n for c in seen)
    assert manifest["counts"]["imagefolder_train_images"] == 10
    names = {
        o["name"]
        for split in ("trainval", "test")
        for i in _image_set(root, split)
        for o in _voc_objects(root, i)[1]
    }
    assert names == set(novel)  # every novel class occurs, no pretraining class does
    coco = COCO(os.path.join(root, "coco", "annotations", "instances_trainval.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == [(i + 1, n) for i, n in enumerate(novel)]
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {1, 2, 3, 4, 5}
    assert not synthetic.is_generated(root, dataclasses.replace(spec, novel_classes=4))

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detection.data.datasets import register_synthetic

    register_synthetic(root)
    try:
        for name in ("synthetic_voc_trainval", "synthetic_coco_test"):
            assert MetadataCatalog.get(name).thing_classes == novel
            labels = {a["category_id"] for d in DatasetCatalog.get(name) for a in d["annotations"]}
            assert labels <= set(range(5))
    finally:  # the other tests' names point at the session's set again
        register_synthetic(synthetic_root)


def test_novel_classes_must_leave_two_pretraining_classes():
    with pytest.raises(ValueError, match=r"novel_classes must be 0 \(off\) or 1-8"):
        SyntheticSpec(novel_classes=9)
    with pytest.raises(ValueError, match="novel_classes"):
        SyntheticSpec(novel_classes=-1)


def test_cli_makes_the_novel_label_set_and_names_a_bad_value(tmp_path):
    tiny = ["--cls-size", "32", "--cls-train-per-class", "1", "--cls-val-per-class", "1"]
    tiny += ["--det-size", "64", "--det-trainval", "5", "--det-test", "5", "--workers", "1"]
    r = _cli("--root", str(tmp_path / "novel"), "--novel-classes", "5", *tiny)
    assert r.returncode == 0, r.stderr
    assert (
        "imagefolder classes disk, square, triangle, star, ring; detection classes cross, "
        "hexagon, crescent, arrow, heart;" in r.stdout
    )
    assert sorted(os.listdir(tmp_path / "novel" / "imagefolder" / "train")) == sorted(
        CLASS_NAMES[:5]
    )
    r = _cli("--root", str(tmp_path / "bad"), "--novel-classes", "9")
    assert r.returncode == 2 and r.stderr == (
        "make_data.py: error: --novel-classes must be 0 (off) or 1-8 (at least 2 pretraining "
        "classes), got 9\n"
    )
