"""Hostile COCO annotations (issue 27, item 7): segmentations, iscrowd, category ids and the number
of annotations are checked before Detectron2 reads the file, each a one-line error naming the file
and the annotation; valid polygons and RLE (string and list counts) still load."""

import json

import numpy as np
import pytest
from conftest import REPO
from pycocotools import mask as mask_util


def _coco(tmp_path, annotations, categories=None):
    """A COCO file of one 40x30 image (an empty file: only its presence is checked) and these
    annotations; returns (json path, image folder)."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    (images / "a.jpg").write_bytes(b"")
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": annotations,
        "categories": categories or [{"id": 1, "name": "disk"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))  # NaN written as JSON's NaN, as json.dump does
    return str(path), str(images)


def _ann(i=1, **fields):
    ann = {"id": i, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8], "iscrowd": 0}
    ann["segmentation"] = [[2, 3, 12, 3, 12, 11, 2, 11]]
    ann.update(fields)
    return ann


def _rle(width=40, height=30):
    m = np.zeros((height, width), dtype=np.uint8, order="F")
    m[3:11, 2:12] = 1
    rle = mask_util.encode(m)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _rle_list(width=40, height=30):
    # uncompressed RLE: runs in column-major order, starting with background
    inside = [0] * 2 * height + ([0] * 3 + [1] * 8 + [0] * 19) * 10 + [0] * 28 * height
    runs, value, run = [], 0, 0
    for v in inside:
        if v == value:
            run += 1
        else:
            runs.append(run)
            value, run = v, 1
    return {"size": [height, width], "counts": runs + [run]}


def _check(tmp_path, annotations, **kwargs):
    from detection.data.checks import check_coco_json

    path, images = _coco(tmp_path, annotations, kwargs.pop("categories", None))
    return path, lambda: check_coco_json(path, images, **kwargs)


NAN, BIG = float("nan"), 1e300


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"segmentation": [[NAN, 3, 12, 3, 12, 11]]},
            "has polygon 0 with a coordinate that is not a finite number",
        ),
        (
            {"segmentation": [[2, 3, 12, 3, float("inf"), 11]]},
            "has polygon 0 with a coordinate that is not a finite number",
        ),
        (
            {"segmentation": [[2, 3, BIG, 3, 12, 11]]},
            "has polygon 0 reaching outside the 40x30 image",
        ),
        ({"segmentation": [[2, 3, 12, 3, 12, -40]]}, "has polygon 0 reaching outside the 40x30"),
        ({"segmentation": [[2, 3, 12, 3, 12]]}, "has polygon 0, not a list of an even number >= 6"),
        ({"segmentation": [[2, 3, 12, 3]]}, "has polygon 0, not a list of an even number >= 6"),
        (
            {"segmentation": [[2, 3, "12", 3, 12, 11]]},
            "has polygon 0 with a coordinate that is not",
        ),
        (
            {"segmentation": [[2, 3, [12], 3, 12, 11]]},
            "has polygon 0 with a coordinate that is not",
        ),
        ({"segmentation": [5, 6, 7, 8, 9, 10]}, "has polygon 0, not a list of an even number"),
        ({"segmentation": "abc"}, "has segmentation 'abc', neither polygons"),
        ({"segmentation": [[0, 0, 1, 0, 1, 1]] * 1001}, "has 1001 polygons, more than 1000"),
        (
            {"segmentation": [[1.0, 1.0] * 30_000, [1.0, 1.0] * 30_000]},
            "has polygons of more than 100000 coordinates",
        ),
        (
            {"segmentation": {**_rle(), "size": [30, 41]}},
            "has RLE size [30, 41], not the image's [height, width] [30, 40]",
        ),
        (
            {"segmentation": _rle(41, 30)},
            "has RLE size [30, 41], not the image's [height, width] [30, 40]",
        ),
        (
            {"segmentation": {"size": [30, 40], "counts": "abc~"}},
            "has RLE counts 'abc~': not a compressed RLE string",
        ),
        (
            {"segmentation": {"size": [30, 40], "counts": [100, 20]}},
            "has RLE counts that do not cover the 40x30 image exactly",
        ),
        (
            {"segmentation": {"size": [30, 40], "counts": [1300, -100]}},
            "has RLE counts that do not cover the 40x30 image exactly",
        ),
        (
            {"segmentation": {"size": [30, 40], "counts": [1200.0]}},
            "has RLE counts that are neither a string nor a list of integers",
        ),
        ({"iscrowd": "yes"}, "has iscrowd 'yes', not 0 or 1"),
        ({"iscrowd": 2}, "has iscrowd 2, not 0 or 1"),
        ({"iscrowd": True}, "has iscrowd True, not 0 or 1"),
        ({"ignore": 1}, "has ignore 1, which Detectron2 does not support"),
    ],
    ids=[
        "nan",
        "inf",
        "1e300",
        "far_outside",
        "odd_length",
        "two_points",
        "string_coordinate",
        "nested_coordinate",
        "flat_list",
        "abc",
        "too_many_polygons",
        "too_many_points",
        "rle_size_mismatch",
        "rle_of_another_size",
        "rle_bad_string",
        "rle_short",
        "rle_negative_run",
        "rle_float_runs",
        "iscrowd_yes",
        "iscrowd_2",
        "iscrowd_bool",
        "ignore",
    ],
)
def test_a_hostile_annotation_is_one_line_naming_file_and_id(tmp_path, fields, message):
    path, check = _check(tmp_path, [_ann(1), _ann(7, **fields)])
    with pytest.raises(ValueError) as err:
        check()
    text = str(err.value)
    assert text.startswith(f"COCO annotations {path}: annotation id 7 (image id 1) has "), text
    assert message in text, text
    assert "\n" not in text and len(text) < 400, text


def test_a_compressed_rle_string_overfilling_the_mask_is_refused(tmp_path):
    # valid characters, runs summing past 40x30: pycocotools' decoder would write past the mask
    rle = mask_util.encode(np.ones((60, 40), dtype=np.uint8, order="F"))
    counts = rle["counts"].decode("ascii")
    path, check = _check(tmp_path, [_ann(3, segmentation={"size": [30, 40], "counts": counts})])
    with pytest.raises(ValueError, match=r"annotation id 3 .* do not cover the 40x30 image"):
        check()


def test_a_huge_category_id_is_refused(tmp_path):
    categories = [{"id": 1, "name": "disk"}, {"id": 2**62, "name": "evil"}]
    path, check = _check(tmp_path, [_ann(1, category_id=2**62)], categories=categories)
    with pytest.raises(ValueError) as err:
        check()
    assert str(err.value) == (
        f"COCO annotations {path}: category id {2**62} is outside [0, 2147483647]; number the "
        "categories with small integers (COCO's are 1-90)"
    )


def test_too_many_annotations_an_image_or_in_all_are_refused(tmp_path):
    from detection.data.checks import set_annotation_limits

    anns = [_ann(i) for i in range(1, 6)]
    path, check = _check(tmp_path, anns, max_per_image=4)
    with pytest.raises(ValueError) as err:
        check()
    assert str(err.value) == (
        f"COCO annotations {path}: annotation id 5 (image id 1): the image has more than "
        "DATALOADER.MAX_ANNOTATIONS_PER_IMAGE 4 annotations; remove duplicates or raise the bound"
    )
    path, check = _check(tmp_path, anns, max_annotations=3)
    with pytest.raises(ValueError) as err:
        check()
    assert str(err.value) == (
        f"COCO annotations {path}: 5 annotations, more than DATALOADER.MAX_ANNOTATIONS 3; raise "
        "it if the set is really that large"
    )
    # a registered loader has no arguments: the config's bounds reach it through the module
    path, check = _check(tmp_path, anns)
    check()
    set_annotation_limits(10, 4)
    try:
        with pytest.raises(ValueError, match="MAX_ANNOTATIONS_PER_IMAGE 4"):
            check()
    finally:
        set_annotation_limits(2_000_000, 1000)
    with pytest.raises(ValueError, match=r"^DATALOADER.MAX_ANNOTATIONS must be a positive"):
        set_annotation_limits(0, 4)


def test_valid_segmentations_pass_and_load_in_detectron2(tmp_path):
    from detectron2.data.datasets import load_coco_json

    anns = [
        _ann(1),
        _ann(2, segmentation=[[-0.4, 0, 40.3, 0, 40, 30.2]]),  # rounding just outside: kept
        _ann(3, segmentation=_rle(), iscrowd=1),
        _ann(4, segmentation=_rle_list(), iscrowd=1),
        _ann(5, segmentation=[]),
    ]
    path, check = _check(tmp_path, anns)
    data = check()
    assert [a["id"] for a in data["annotations"]] == [1, 2, 3, 4, 5]
    dicts = load_coco_json(path, str(tmp_path / "images"))
    masks = [a["segmentation"] for a in dicts[0]["annotations"] if "segmentation" in a]
    assert len(masks) == 4
    string_area, list_area = (float(mask_util.area(m)) for m in masks[2:4])
    assert string_area == list_area == 80.0  # both RLEs are the same 10x8 box


def test_the_coco_file_is_read_once_and_loads_as_detectron2_reads_it(tmp_path, monkeypatch):
    import builtins

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    from detection.data.checks import register_coco_checked

    anns = [_ann(1), _ann(2, segmentation=_rle_list(), iscrowd=1), _ann(3, bbox=[30, 20, 20, 20])]
    path, images = _coco(tmp_path, anns)
    expected = load_coco_json(path, images, "test_plain_coco")  # before open is counted
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file) == path:
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    register_coco_checked("test_read_once", {}, path, images)
    try:
        dicts = DatasetCatalog.get("test_read_once")
    finally:
        DatasetCatalog.remove("test_read_once")
        MetadataCatalog.remove("test_read_once")
        MetadataCatalog.remove("test_plain_coco")
    assert len(opened) == 1  # check_coco_json's; load_coco_json's pycocotools got the parsed data
    # the same dicts as Detectron2's own loader, but the box past the 40x30 image clipped
    assert dicts[0]["annotations"][:2] == expected[0]["annotations"][:2]
    assert dicts[0]["annotations"][2]["bbox"] == [30.0, 20.0, 40.0, 30.0]
    import pycocotools.coco

    assert pycocotools.coco.COCO.__name__ == "COCO"  # put back after the load


def test_detectron2_builtin_names_get_the_toolkits_checks(tmp_path, monkeypatch):
    """coco_2017_val and voc_2007_test, registered by Detectron2 at import under the relative
    root ``datasets``, refuse a NaN polygon and a fractional VOC box after prepare_datasets."""
    import os

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detection.config import load_cfg
    from detection.trainer import prepare_datasets

    # each set with its own class count: every TRAIN and TEST set's is checked at start
    cfgs = [
        load_cfg(
            os.path.join(REPO, "configs", "detection", "coco_R_50_FPN_1x.yaml"),
            ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)"]
            + ["MODEL.ROI_HEADS.NUM_CLASSES", str(classes)],
        )
        for name, classes in (("coco_2017_val", 80), ("voc_2007_test", 20))
    ]
    coco, voc = MetadataCatalog.get("coco_2017_val"), MetadataCatalog.get("voc_2007_test")
    if os.path.isabs(coco.json_file) or os.path.isabs(voc.dirname):
        pytest.skip(
            "DETECTRON2_DATASETS is set: the builtin paths are not under this test's folder"
        )
    monkeypatch.chdir(tmp_path)
    os.makedirs(coco.image_root)
    os.makedirs(os.path.dirname(coco.json_file))
    open(os.path.join(coco.image_root, "a.jpg"), "wb").close()
    bad = _ann(5, segmentation=[[2, 3, float("nan"), 3, 12, 11]])
    categories = [{"id": i, "name": n} for i, n in enumerate(coco.thing_classes, 1)]
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": [bad],
        "categories": categories,
    }
    with open(coco.json_file, "w") as f:
        json.dump(data, f)
    for sub in ("Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(voc.dirname, sub))
    with open(os.path.join(voc.dirname, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("a\nb\n")
    xml = os.path.join(voc.dirname, "Annotations", "a.xml")
    with open(xml, "w") as f:
        f.write(
            "<annotation><size><width>40</width><height>30</height></size><object><name>dog"
            "</name><bndbox><xmin>1.5</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
            "</object></annotation>"
        )
    originals = {n: DatasetCatalog[n] for n in ("coco_2017_val", "voc_2007_test")}
    try:
        for cfg in cfgs:
            prepare_datasets(cfg)
        assert all(DatasetCatalog[n] is not originals[n] for n in originals)
        with pytest.raises(ValueError) as err:
            DatasetCatalog.get("coco_2017_val")
        assert str(err.value) == (
            f"COCO annotations {coco.json_file}: annotation id 5 (image id 1) has polygon 0 with a "
            "coordinate that is not a finite number; fix or remove the annotation"
        )
        with pytest.raises(ValueError) as err:
            DatasetCatalog.get("voc_2007_test")
        assert str(err.value) == (
            f"VOC annotation {xml}: <bndbox/xmin> in object 0 is '1.5', not an integer"
        )
    finally:
        for name, loader in originals.items():
            DatasetCatalog.remove(name)
            DatasetCatalog.register(name, loader)


def test_the_garbage_collector_is_paused_for_the_load_and_restored(tmp_path, monkeypatch):
    import gc

    from detection.data import checks

    path, images = _coco(tmp_path, [_ann(1)])
    seen = []
    real_check = checks.check_coco_json

    def check(*args):
        seen.append(gc.isenabled())
        return real_check(*args)

    monkeypatch.setattr(checks, "check_coco_json", check)
    assert gc.isenabled()
    assert len(checks.load_coco_checked(path, images, "test_gc_paused")) == 1
    assert seen == [False] and gc.isenabled()
    monkeypatch.setattr(checks, "check_coco_json", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        checks.load_coco_checked(path, images, "test_gc_paused")
    assert gc.isenabled()  # restored on an error too
    from detectron2.data import MetadataCatalog

    MetadataCatalog.remove("test_gc_paused")


def test_the_training_set_is_frozen_out_of_the_collector_after_earlier_garbage_is_collected():
    import gc
    import weakref

    from detection.data.checks import _gc_paused

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle
    gone = weakref.ref(cycle)
    del cycle  # garbage only the cyclic collector frees
    before = gc.get_freeze_count()
    try:
        with _gc_paused(freeze=True):
            assert not gc.isenabled()
            kept = [[i] for i in range(1000)]
        assert gone() is None  # collected, not frozen
        assert gc.get_freeze_count() >= before + 1000 and gc.isenabled() and len(kept) == 1000
    finally:
        gc.unfreeze()


def test_a_bad_annotation_bound_is_one_line_at_start(synthetic_datasets, tmp_path, capsys):
    from conftest import load_tool
    from test_train_net import COCO_CFG, TINY

    out = tmp_path / "out"
    argv = ["--config-file", COCO_CFG, *TINY, "OUTPUT_DIR", str(out)]
    assert load_tool("train_net").main([*argv, "DATALOADER.MAX_ANNOTATIONS_PER_IMAGE", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "train_net.py: error: DATALOADER.MAX_ANNOTATIONS_PER_IMAGE must be a positive integer, "
        "got 0"
    )
    assert not out.exists()
