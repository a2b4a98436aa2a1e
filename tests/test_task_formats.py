"""The paper's other task formats in the embedded set (issue 26): each is generated (same seed, same
bytes), read by Detectron2's own loader, scored by its own evaluator (ground truth as the
prediction scores 100), and bad input in it is one line naming the file and the field."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, TASKS_SPEC
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from moco.data.synthetic.spec import (
    CITYSCAPES_THINGS,
    CLASS_NAMES,
    KEYPOINT_NAMES,
    SyntheticSpec,
)
from moco.data.synthetic.writers import ensure_generated, generate


def _files(root):
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name != ".lock":
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _dump(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _copy(tasks_root, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(tasks_root, dst)
    return dst


def test_tasks_are_opt_in_checked_and_in_one_order():
    assert SyntheticSpec().tasks == () and "tasks" not in SyntheticSpec().to_dict()
    spec = SyntheticSpec(tasks=["voc_semseg", "keypoints", "keypoints"])
    assert spec.tasks == ("keypoints", "voc_semseg")
    assert spec.to_dict()["tasks"] == ["keypoints", "voc_semseg"]
    assert SyntheticSpec(**spec.to_dict()) == spec  # the manifest's spec makes the same set
    with pytest.raises(ValueError, match=r"^SyntheticSpec.tasks: unknown 'coco_kp'; choose from"):
        SyntheticSpec(tasks=["coco_kp"])


def test_same_seed_same_bytes_and_the_detection_files_unchanged(tmp_path):
    """Each format is written; the same spec gives the same bytes (in one process or a pool of
    two), another seed other images, and the detection set's own files are those of the spec
    without tasks, byte for byte."""
    spec = dataclasses.replace(
        TASKS_SPEC, det_image_size=64, det_trainval_images=30, det_test_images=4
    )
    generate(str(tmp_path / "a"), spec, workers=1)
    generate(str(tmp_path / "b"), spec, workers=2)  # 60+ jobs: the pool is used
    generate(str(tmp_path / "c"), dataclasses.replace(spec, seed=1))
    generate(str(tmp_path / "plain"), dataclasses.replace(spec, tasks=()))
    a, b, c, plain = (_files(str(tmp_path / d)) for d in ("a", "b", "c", "plain"))
    assert a == b
    new = sorted(set(a) - set(plain))
    assert {k for k in plain if k != "spec.json"} <= set(a)
    assert all(a[k] == plain[k] for k in plain if k != "spec.json")
    for part in (
        "coco/annotations/keypoints_trainval.json",
        "lvis/lvis_v0.5_test.json",
        "cityscapes/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "cityscapes/gtFine/val/frankfurt/frankfurt_000003_000019_gtFine_instanceIds.png",
        "cityscapes/gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png",
        "VOC2007/SegmentationClass/000034.png",
        "VOC2007/ImageSets/Segmentation/test.txt",
    ):
        assert part in new
    pngs = [k for k in new if k.endswith(".png")]
    assert len(pngs) == 34 * 6  # 2 VOC masks + 4 Cityscapes PNGs, for each of the 34 scenes
    assert all(a[k] != c[k] for k in pngs if "leftImg8bit" in k)


def test_keypoints_are_coco_keypoints_with_true_visibility(tasks_root, registered):
    """COCO keypoint JSON (pycocotools reads it): K = 5 named points per object, v = 1 exactly
    where an object drawn above covers the point, v = 2 where it is seen, 0 outside the image.
    Detectron2's loader reads it (+0.5 pixel convention) with the flip map in the metadata."""
    from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import create_keypoint_hflip_indices

    coco = COCO(os.path.join(tasks_root, "coco", "annotations", "keypoints_trainval.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert all(c["keypoints"] == list(KEYPOINT_NAMES) and c["skeleton"] for c in cats)
    flags = []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))  # bottom to top
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        for i, ann in enumerate(anns):
            points = np.array(ann["keypoints"], float).reshape(-1, 3)
            assert len(points) == len(KEYPOINT_NAMES)
            assert ann["num_keypoints"] == int((points[:, 2] > 0).sum())
            above = np.any(masks[i + 1 :], axis=0) if i + 1 < len(anns) else None
            for x, y, v in points:
                flags.append(v)
                if v == 0:
                    assert x == y == 0
                    continue
                covered = above is not None and above[int(y + 0.5), int(x + 0.5)]
                assert covered == (v == 1)
    assert {0, 1, 2} <= set(flags) or {1, 2} <= set(flags)
    assert flags.count(2) > len(flags) / 2

    dicts = DatasetCatalog.get("synthetic_kp_trainval")
    meta = MetadataCatalog.get("synthetic_kp_trainval")
    assert meta.keypoint_names == list(KEYPOINT_NAMES) and meta.evaluator_type == "coco"
    assert list(create_keypoint_hflip_indices(["synthetic_kp_trainval"])) == [0, 1, 4, 3, 2]
    # Detectron2's training mapper, flip included, gives gt_keypoints of K points
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0)],
        image_format="BGR",
        use_keypoint=True,
        keypoint_hflip_indices=create_keypoint_hflip_indices(["synthetic_kp_trainval"]),
    )
    instances = mapper(dicts[0])["instances"]
    assert instances.gt_keypoints.tensor.shape == (len(dicts[0]["annotations"]), 5, 3)
    first = coco.loadAnns(coco.getAnnIds(imgIds=[dicts[0]["image_id"]]))[0]
    loaded = dicts[0]["annotations"][0]["keypoints"]
    assert len(loaded) == 15
    assert np.allclose(np.array(loaded)[0::3], np.array(first["keypoints"])[0::3] + 0.5)


def test_lvis_is_federated_and_detectron2_reads_it(tasks_root, registered):
    """LVIS v0.5 shape (the lvis API reads it): r / c / f frequencies, every annotation one of
    the COCO twin's (same polygons), a negative category absent from its image, a not-exhaustive
    one present; Detectron2's loader keeps the two id lists."""
    from detectron2.data import DatasetCatalog
    from lvis import LVIS

    lvis = LVIS(os.path.join(tasks_root, "lvis", "lvis_v0.5_trainval.json"))
    coco = COCO(os.path.join(tasks_root, "coco", "annotations", "instances_trainval.json"))
    cats = lvis.load_cats(None)
    assert {c["frequency"] for c in cats} == {"r", "c", "f"}
    counts = {c["frequency"]: [] for c in cats}
    for c in cats:
        counts[c["frequency"]].append(c["image_count"])
    assert max(counts["r"]) <= min(counts["c"]) and max(counts["c"]) <= min(counts["f"])
    coco_polygons = {
        (a["image_id"], a["category_id"], json.dumps(a["segmentation"]))
        for a in coco.dataset["annotations"]
    }
    for image in lvis.dataset["images"]:
        anns = lvis.load_anns(lvis.get_ann_ids(img_ids=[image["id"]]))
        present = {a["category_id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))}
        assert not set(image["neg_category_ids"]) & present
        assert set(image["not_exhaustive_category_ids"]) <= {a["category_id"] for a in anns}
        for a in anns:
            assert (a["image_id"], a["category_id"], json.dumps(a["segmentation"])) in coco_polygons
    assert 0 < len(lvis.get_ann_ids()) < len(coco.getAnnIds())  # federated: not every object
    dicts = DatasetCatalog.get("synthetic_lvis_trainval")
    assert len(dicts) == TASKS_SPEC.det_trainval_images
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert {"neg_category_ids", "not_exhaustive_category_ids"} <= set(dicts[0])
    labels = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert labels <= set(range(len(CLASS_NAMES)))


def test_cityscapes_tree_is_read_by_detectron2(tasks_root, registered):
    """City folders, instanceIds (label id * 1000 + n) agreeing with labelIds and labelTrainIds;
    Detectron2's load_cityscapes_instances / load_cityscapes_semantic read the tree."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    cs = os.path.join(tasks_root, "cityscapes")
    assert sorted(os.listdir(os.path.join(cs, "leftImg8bit", "train"))) == ["aachen", "bremen"]
    assert os.listdir(os.path.join(cs, "gtFine", "val")) == ["frankfurt"]
    ids = {t[1]: t[2] for t in CITYSCAPES_THINGS} | {7: 0}
    for d in DatasetCatalog.get("synthetic_cityscapes_sem_seg_trainval"):
        stem = d["sem_seg_file_name"][: -len("labelTrainIds.png")]
        instance = cv2.imread(stem + "instanceIds.png", cv2.IMREAD_UNCHANGED)
        label = cv2.imread(stem + "labelIds.png", cv2.IMREAD_UNCHANGED)
        train = cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        assert instance.dtype == np.uint16 and instance.shape == label.shape == train.shape
        assert (d["height"], d["width"]) == instance.shape
        assert np.array_equal(np.where(instance >= 1000, instance // 1000, instance), label)
        assert np.array_equal(np.vectorize(ids.get)(label), train)
    dicts = DatasetCatalog.get("synthetic_cityscapes_instance_trainval")
    meta = MetadataCatalog.get("synthetic_cityscapes_instance_trainval")
    assert meta.thing_classes == [t[0] for t in CITYSCAPES_THINGS]
    assert len(dicts) == TASKS_SPEC.det_trainval_images
    anns = [a for d in dicts for a in d["annotations"]]
    assert anns and {a["category_id"] for a in anns} <= set(range(8))
    assert not any(a["iscrowd"] for a in anns)


def test_voc_segmentation_class_pngs(tasks_root, registered):
    """Palette PNGs (VOC's colour map) whose labels are the COCO twin's masks inside a 255 band
    on every boundary; the registered split gives Detectron2's sem_seg dataset dicts, whose grey
    PNGs (SegmentationClassRaw) Detectron2's mapper reads as those labels."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image

    coco = COCO(os.path.join(tasks_root, "coco", "annotations", "instances_test.json"))
    dicts = DatasetCatalog.get("synthetic_voc_sem_seg_test")
    assert len(dicts) == TASKS_SPEC.det_test_images
    meta = MetadataCatalog.get("synthetic_voc_sem_seg_test")
    assert meta.stuff_classes == ["background", *CLASS_NAMES] and meta.ignore_label == 255
    for d in dicts:
        palette_png = d["sem_seg_file_name"].replace("SegmentationClassRaw", "SegmentationClass")
        with Image.open(palette_png) as png:
            assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC's class 1
            labels = np.asarray(png)
        # what Detectron2's DatasetMapper reads (convert("L")): the same labels
        assert np.array_equal(read_image(d["sem_seg_file_name"], "L")[..., 0], labels)
        image_id = int(os.path.basename(d["file_name"])[:-4])
        expected = np.zeros_like(labels)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            expected[coco.annToMask(a).astype(bool)] = a["category_id"]
        void = labels == 255
        assert void.any() and np.array_equal(labels[~void], expected[~void])
        # the band is where a 3x3 neighbourhood holds two labels: one pixel either side
        kernel = np.ones((3, 3), np.uint8)
        assert np.array_equal(void, cv2.dilate(expected, kernel) != cv2.erode(expected, kernel))


def _perfect_instances(d, masks, keypoints=None):
    from detectron2.structures import Boxes, Instances

    h, w = d["height"], d["width"]
    inst = Instances((h, w))
    boxes = [np.nonzero(m) for m in masks]
    inst.pred_boxes = Boxes(
        torch.tensor([[x.min(), y.min(), x.max() + 1, y.max() + 1] for y, x in boxes], dtype=float)
    )
    inst.scores = torch.ones(len(masks))
    inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
    inst.pred_masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w)
    if keypoints is not None:
        inst.pred_keypoints = torch.tensor(keypoints, dtype=torch.float32)
    return inst


def _masks(d):
    h, w = d["height"], d["width"]
    out = []
    for a in d["annotations"]:
        segm = a["segmentation"]
        rle = mask_util.merge(mask_util.frPyObjects(segm, h, w)) if isinstance(segm, list) else segm
        out.append(mask_util.decode(rle).astype(bool))
    return out


def _run(evaluator, dicts, outputs):
    evaluator.reset()
    for d, out in zip(dicts, outputs):
        evaluator.process([d], [out])
    return evaluator.evaluate()


def test_detectron2_evaluators_score_the_ground_truth_100(registered):
    """COCOEvaluator (keypoints, with the metadata's OKS sigmas), LVISEvaluator and
    SemSegEvaluator run on the registered sets: the ground truth as the prediction is AP 100 /
    mIoU 100, so the files, ids and metadata agree with what each evaluator reads."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator, LVISEvaluator, SemSegEvaluator

    from detection.semantic_seg import load_label_png

    name = "synthetic_kp_test"
    dicts = DatasetCatalog.get(name)
    sigmas = MetadataCatalog.get(name).keypoint_oks_sigmas
    outputs = []
    for d in dicts:
        kps = [np.array(a["keypoints"]).reshape(-1, 3) for a in d["annotations"]]
        kps = [np.concatenate([k[:, :2], (k[:, 2:] > 0) * 1.0], 1) for k in kps]
        outputs.append({"instances": _perfect_instances(d, _masks(d), kps)})
    evaluator = COCOEvaluator(name, tasks=("keypoints",), distributed=False, kpt_oks_sigmas=sigmas)
    result = _run(evaluator, dicts, outputs)
    assert result["keypoints"]["AP"] == pytest.approx(100.0)

    name = "synthetic_lvis_test"
    dicts = DatasetCatalog.get(name)
    outputs = [{"instances": _perfect_instances(d, _masks(d))} for d in dicts]
    result = _run(LVISEvaluator(name, tasks=("segm",), distributed=False), dicts, outputs)
    assert result["segm"]["AP"] == pytest.approx(100.0)

    name = "synthetic_voc_sem_seg_test"
    dicts = DatasetCatalog.get(name)
    num = len(MetadataCatalog.get(name).stuff_classes)
    outputs = []
    for d in dicts:
        labels = np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64)
        onehot = np.eye(num)[np.where(labels == 255, 0, labels)].transpose(2, 0, 1)
        outputs.append({"sem_seg": torch.from_numpy(onehot)})
    evaluator = SemSegEvaluator(name, distributed=False, sem_seg_loading_fn=load_label_png)
    result = _run(evaluator, dicts, outputs)
    assert result["sem_seg"]["mIoU"] == pytest.approx(100.0)


def test_cityscapes_evaluators_score_the_ground_truth_100(registered, tmp_path, monkeypatch):
    """CityscapesInstanceEvaluator and CityscapesSemSegEvaluator (cityscapesscripts' own
    evaluation, on CPU) read the gtFine tree: the ground truth as the prediction is 100."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import CityscapesInstanceEvaluator, CityscapesSemSegEvaluator

    monkeypatch.chdir(tmp_path)  # cityscapesscripts writes matches.json into the working folder
    name = "synthetic_cityscapes_instance_test"
    dicts = DatasetCatalog.get(name)
    contiguous = {t[1]: i for i, t in enumerate(CITYSCAPES_THINGS)}
    outputs = []
    for d in dicts:  # the instanceIds PNG's masks (Detectron2's polygons of them drop holes)
        stem = d["file_name"].replace("leftImg8bit", "gtFine")[: -len("gtFine.png")]
        ids = cv2.imread(stem + "gtFine_instanceIds.png", cv2.IMREAD_UNCHANGED)
        things = [i for i in np.unique(ids) if i >= 1000]
        d = dict(d, annotations=[{"category_id": contiguous[i // 1000]} for i in things])
        outputs.append({"instances": _perfect_instances(d, [ids == i for i in things])})
    result = _run(CityscapesInstanceEvaluator(name), dicts, outputs)
    assert result["segm"]["AP"] == pytest.approx(100.0)

    name = "synthetic_cityscapes_sem_seg_test"
    dicts = DatasetCatalog.get(name)
    outputs = []
    for d in dicts:
        train = cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED).astype(np.int64)
        outputs.append({"sem_seg": torch.from_numpy(np.eye(19)[train].transpose(2, 0, 1))})
    result = _run(CityscapesSemSegEvaluator(name), dicts, outputs)
    assert result["sem_seg"]["IoU"] == pytest.approx(100.0)


def _one_line_error(fn, *args, match):
    with pytest.raises(ValueError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(match, message), message
    return message


def _kp_file(root):
    return os.path.join(root, "coco", "annotations", "keypoints_trainval.json")


def _kp_load(root):
    from detection.data.checks import load_coco_checked

    image_root = os.path.join(root, "VOC2007", "JPEGImages")
    return load_coco_checked(_kp_file(root), image_root, "synthetic_kp_trainval")


@pytest.mark.parametrize(
    "case, match",
    [
        ("drop", r"annotation id 1 \(image id 1\) has 4 keypoints, but category id \d+ names 5"),
        ("outside", r"annotation id 1 \(image id 1\): keypoint 1 at \(500, 3\) is outside the "),
        ("visibility", r"annotation id 1 \(image id 1\): keypoint 0 has visibility 3, not COCO"),
    ],
)
def test_bad_keypoints_are_one_line_naming_file_and_annotation(tasks_root, tmp_path, case, match):
    """Keypoints of the wrong count, outside the image or with an unknown visibility flag."""
    root = _copy(tasks_root, tmp_path)
    data = _load(_kp_file(root))
    points = data["annotations"][0]["keypoints"]
    if case == "drop":
        del points[-3:]
    elif case == "outside":
        points[3:6] = [500, 3, 2]
    else:
        points[2] = 3
    _dump(_kp_file(root), data)
    message = _one_line_error(_kp_load, root, match=match)
    assert message.startswith(f"COCO annotations {_kp_file(root)}: ")
    assert "keypoint" in message


def test_an_lvis_category_without_frequency_is_one_line(tasks_root, tmp_path):
    from detection.data.task_formats import load_lvis_checked

    root = _copy(tasks_root, tmp_path)
    path = os.path.join(root, "lvis", "lvis_v0.5_trainval.json")
    data = _load(path)
    del data["categories"][2]["frequency"]
    _dump(path, data)
    voc = os.path.join(root, "VOC2007")
    _one_line_error(
        load_lvis_checked,
        path,
        voc,
        match=rf"^LVIS annotations {re.escape(path)}: categories\[2\] has no 'frequency'$",
    )
    data["categories"][2]["frequency"] = "rare"
    _dump(path, data)
    _one_line_error(
        load_lvis_checked,
        path,
        voc,
        match=r"category id 3 \('triangle'\) has frequency 'rare', not one of r, c, f",
    )


def _city_gt(root, split="train", city="aachen", index=0):
    return os.path.join(
        root, "cityscapes", "gtFine", split, city, f"{city}_{index:06d}_000019_gtFine_"
    )


def test_a_cityscapes_png_of_another_size_than_its_image_is_one_line(tasks_root, tmp_path):
    from detection.data.task_formats import check_cityscapes

    root = _copy(tasks_root, tmp_path)
    png = _city_gt(root) + "labelIds.png"
    label = cv2.imread(png, cv2.IMREAD_UNCHANGED)
    cv2.imwrite(png, label[:-3])
    image = png.replace("gtFine", "leftImg8bit").replace("_leftImg8bit_labelIds", "_leftImg8bit")
    h, w = label.shape
    cs = os.path.join(root, "cityscapes")
    _one_line_error(
        check_cityscapes,
        os.path.join(cs, "leftImg8bit", "train"),
        os.path.join(cs, "gtFine", "train"),
        match=rf"^Cityscapes annotation {re.escape(png)} is {w}x{h - 3} \(width x height\), but "
        rf"its image {re.escape(image)} is {w}x{h};",
    )


@pytest.mark.parametrize(
    "which, value, match",
    [
        ("labelIds", 99, r"unknown label ids \[99\]"),
        ("instanceIds", 7001, r"unknown instance ids .* \[7001\]"),  # road has no instances
        ("labelTrainIds", 40, r"unknown train ids .* \[40\]"),
    ],
)
def test_a_cityscapes_mask_with_unknown_ids_is_one_line(tasks_root, tmp_path, which, value, match):
    from detection.data.task_formats import check_cityscapes

    root = _copy(tasks_root, tmp_path)
    png = _city_gt(root) + which + ".png"
    mask = cv2.imread(png, cv2.IMREAD_UNCHANGED)
    mask[0, 0] = value
    cv2.imwrite(png, mask)
    cs = os.path.join(root, "cityscapes")
    message = _one_line_error(
        check_cityscapes,
        os.path.join(cs, "leftImg8bit", "train"),
        os.path.join(cs, "gtFine", "train"),
        True,
        match=match,
    )
    assert message.startswith(f"Cityscapes annotation {png}: ")


def test_a_voc_segmentation_mask_with_unknown_ids_or_size_is_one_line(tasks_root, tmp_path):
    from detection.data.task_formats import load_voc_sem_seg

    root = _copy(tasks_root, tmp_path)
    voc = os.path.join(root, "VOC2007")
    png = os.path.join(voc, "SegmentationClassRaw", "000002.png")
    labels = cv2.imread(png, cv2.IMREAD_UNCHANGED)
    bad = labels.copy()
    bad[1, 1] = 42
    cv2.imwrite(png, bad)
    n = len(CLASS_NAMES)
    _one_line_error(
        load_voc_sem_seg,
        voc,
        "trainval",
        n,
        match=rf"^VOC segmentation {re.escape(png)}: unknown label ids \[42\]; the classes are 0 "
        rf"\(background\) to {n}, and 255 is void$",
    )
    cv2.imwrite(png, labels[:, :-1])
    _one_line_error(
        load_voc_sem_seg, voc, "trainval", n, match=r"000002.png is \d+x\d+ \(width x height\)"
    )
    # VOC's palette PNGs (as SegmentationClass holds them) would be read as luminance
    shutil.copy(png.replace("SegmentationClassRaw", "SegmentationClass"), png)
    _one_line_error(load_voc_sem_seg, voc, "trainval", n, match=r"000002.png: a P PNG, not class")


def test_the_registered_loaders_run_the_checks(tasks_root, tmp_path, synthetic_root):
    """A bad file under a registered name fails at DatasetCatalog.get with the one line."""
    from detectron2.data import DatasetCatalog

    from detection.data.datasets import register_synthetic

    root = _copy(tasks_root, tmp_path)
    data = _load(_kp_file(root))
    del data["annotations"][0]["keypoints"][-3:]
    _dump(_kp_file(root), data)
    register_synthetic(root)
    try:
        _one_line_error(DatasetCatalog.get, "synthetic_kp_trainval", match="has 4 keypoints")
    finally:
        register_synthetic(synthetic_root)
    assert "synthetic_kp_trainval" not in DatasetCatalog.list()  # that root has no task sets


def _cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "make_data.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_data_writes_the_task_formats_and_names_a_bad_one(tmp_path):
    tiny = ["--cls-size", "32", "--cls-train-per-class", "1", "--cls-val-per-class", "1"]
    tiny += ["--det-size", "64", "--det-trainval", "2", "--det-test", "2", "--workers", "1"]
    root = tmp_path / "set"
    r = _cli("--root", str(root), "--tasks", "voc_semseg", "keypoints", *tiny)
    assert r.returncode == 0, r.stderr
    assert "task formats keypoints, voc_semseg" in r.stdout
    assert (root / "coco" / "annotations" / "keypoints_test.json").is_file()
    assert len(os.listdir(root / "VOC2007" / "SegmentationClass")) == 4
    assert not (root / "lvis").exists() and not (root / "cityscapes").exists()
    assert _load(root / "spec.json")["spec"]["tasks"] == ["keypoints", "voc_semseg"]
    r = _cli("--root", str(tmp_path / "bad"), "--tasks", "densepose", *tiny)
    assert r.returncode == 2 and r.stderr == (
        "make_data.py: error: --tasks: unknown 'densepose'; choose from keypoints, lvis, "
        "cityscapes, voc_semseg\n"
    )


def test_the_formats_follow_the_novel_label_classes(tmp_path, synthetic_root):
    """With SyntheticSpec.novel_classes the task sets hold only the detection classes: LVIS and
    keypoint categories, VOC segmentation labels, the Cityscapes classes the shapes stand for."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detection.data.datasets import register_synthetic

    spec = dataclasses.replace(TASKS_SPEC, novel_classes=5, det_trainval_images=5)
    root = str(tmp_path / "novel")
    ensure_generated(root, spec)
    novel = list(CLASS_NAMES[5:])
    register_synthetic(root)
    try:
        for name in ("synthetic_kp_trainval", "synthetic_lvis_trainval"):
            assert MetadataCatalog.get(name).thing_classes == novel
            labels = {a["category_id"] for d in DatasetCatalog.get(name) for a in d["annotations"]}
            assert labels and labels <= set(range(5))
        cats = _load(os.path.join(root, "lvis", "lvis_v0.5_test.json"))["categories"]
        assert [c["name"] for c in cats] == novel
        segm = MetadataCatalog.get("synthetic_voc_sem_seg_trainval").stuff_classes
        assert segm == ["background", *novel]
        for d in DatasetCatalog.get("synthetic_voc_sem_seg_trainval"):
            values = set(np.unique(cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)))
            assert values <= set(range(6)) | {255}
        shapes = MetadataCatalog.get("synthetic_cityscapes_instance_trainval").shape_classes
        assert shapes == dict(zip([t[0] for t in CITYSCAPES_THINGS[:5]], novel))
        dicts = DatasetCatalog.get("synthetic_cityscapes_instance_trainval")
        assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(5))
    finally:
        register_synthetic(synthetic_root)


def test_a_config_naming_a_task_set_registers_the_embedded_root(
    tasks_root, synthetic_root, monkeypatch
):
    """tools/train_net.py's start (prepare_datasets) registers the embedded root when a config
    names one of its task sets, as it does for the detection sets."""
    from detectron2.data import DatasetCatalog

    from detection.config import load_cfg
    from detection.trainer import prepare_datasets

    assert "synthetic_kp_trainval" not in DatasetCatalog.list()  # the session's root has none
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(tasks_root))
    opts = ["MODEL.KEYPOINT_ON", "True", "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "5"]
    opts += [
        "DATASETS.TRAIN",
        "('synthetic_kp_trainval',)",
        "DATASETS.TEST",
        "('synthetic_kp_test',)",
    ]
    cfg = load_cfg(os.path.join(REPO, "configs", "detection", "embedded_voc_R_18_FPN.yaml"), opts)
    try:
        prepare_datasets(cfg)
        assert {"synthetic_kp_trainval", "synthetic_lvis_test"} <= set(DatasetCatalog.list())
        assert len(DatasetCatalog.get("synthetic_kp_test")) == TASKS_SPEC.det_test_images
    finally:
        from detection.data.datasets import register_synthetic

        register_synthetic(synthetic_root)
