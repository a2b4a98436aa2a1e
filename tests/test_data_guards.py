"""Late and silent data faults (issue 17, finding 7): annotations checked at start for every split,
boxes finite, positive and inside the image, no path out of the dataset root, image folders
without symlink loops or escapes, a configurable pixel limit; COCO files checked before
pycocotools reads them (issue 16)."""

import json
import os
import re
import shutil

import pytest
from conftest import load_tool
from detectron2.structures import BoxMode
from test_train_net import COCO_CFG, TINY, VOC_CFG


@pytest.fixture
def data_copy(synthetic_root, tmp_path):
    """A copy of the embedded data (VOC, COCO), registered under the standard names for the test."""
    from detection.data.datasets import register_synthetic

    dst = str(tmp_path / "moco_det_synthetic")
    shutil.copytree(synthetic_root, dst)
    register_synthetic(dst)
    yield dst
    register_synthetic(synthetic_root)


def _first_id(voc, split):
    with open(os.path.join(voc, "ImageSets", "Main", split + ".txt")) as f:
        return f.readline().strip()


def test_a_non_integer_box_in_the_voc_test_split_fails_at_start_naming_the_file(
    data_copy, tmp_path, capsys
):
    voc = os.path.join(data_copy, "VOC2007")
    xml = os.path.join(voc, "Annotations", _first_id(voc, "test") + ".xml")
    with open(xml) as f:
        text = f.read()
    with open(xml, "w") as f:
        f.write(re.sub(r"<xmin>\d+</xmin>", "<xmin>10.5</xmin>", text, count=1))
    out = tmp_path / "out"
    argv = ["--config-file", VOC_CFG, *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)]
    assert load_tool("train_net").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"train_net.py: error: VOC annotation {xml}: <bndbox/xmin> in object 0 is '10.5', "
        "not an integer"
    )
    assert not out.exists()  # refused before training, not in the evaluator after it


def test_an_image_set_id_that_leaves_the_dataset_root_is_refused(data_copy):
    from detection.data.checks import check_voc_annotations
    from moco.data.synthetic.spec import CLASS_NAMES

    voc = os.path.join(data_copy, "VOC2007")
    listing = os.path.join(voc, "ImageSets", "Main", "trainval.txt")
    with open(listing, "a") as f:
        f.write("../../../../outside/evil\n")
    with pytest.raises(ValueError) as err:
        check_voc_annotations(voc, "trainval", CLASS_NAMES)
    assert str(err.value) == (
        f"VOC image set {listing}: id '../../../../outside/evil' is a path, "
        "not a file name; it would read files outside the dataset folder"
    )


def _dicts(box, mode=BoxMode.XYXY_ABS):
    return [
        {
            "file_name": "a.jpg",
            "width": 100,
            "height": 80,
            "annotations": [{"bbox": list(box), "bbox_mode": mode, "category_id": 0}],
        }
    ]


@pytest.mark.parametrize(
    "box, mode, message",
    [
        ((10, 10, float("inf"), 50), BoxMode.XYXY_ABS, "not 4 finite numbers"),
        ((10, 10, float("nan"), 50), BoxMode.XYXY_ABS, "not 4 finite numbers"),
        ((-1e6, 10, 1e6, 50), BoxMode.XYXY_ABS, "far outside the 100x80 image"),
        (
            (60, 10, 20, 50),
            BoxMode.XYXY_ABS,
            "non-positive width or height",
        ),  # inverted: not swapped
        ((10, 10, -5, 20), BoxMode.XYWH_ABS, "non-positive width or height"),  # COCO negative width
        ((10, 10, 0, 20), BoxMode.XYWH_ABS, "non-positive width or height"),
        ((110, 10, 150, 50), BoxMode.XYXY_ABS, "outside the 100x80 image"),
    ],
)
def test_bad_boxes_are_refused_naming_the_file(box, mode, message):
    from detection.data.checks import check_boxes

    with pytest.raises(ValueError) as err:
        check_boxes(_dicts(box, mode), lambda d: "ann.xml")
    assert str(err.value).startswith("ann.xml: object 0 has box") and message in str(err.value)


def test_a_box_partly_outside_is_clipped_and_counted():
    from detection.data.checks import check_boxes

    dicts = _dicts((-4, 10, 120, 50))
    assert check_boxes(dicts, lambda d: "ann.xml") == 1
    assert dicts[0]["annotations"][0]["bbox"] == [0.0, 10.0, 100.0, 50.0]
    assert check_boxes(_dicts((0, 0, 100, 80)), lambda d: "ann.xml") == 0  # the whole image is fine


def test_a_coco_box_with_negative_width_is_refused_at_load(data_copy):
    from detectron2.data import DatasetCatalog

    path = os.path.join(data_copy, "coco", "annotations", "instances_test.json")
    with open(path) as f:
        coco = json.load(f)
    coco["annotations"][0]["bbox"][2] = -7
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(
        ValueError,
        match=rf"^COCO annotations {path} \(image .*\): object \d+ has box "
        r".* non-positive width or height$",
    ):
        DatasetCatalog.get("synthetic_coco_test")


def _coco_edit(fn):
    """An edit of the parsed COCO file: ``fn(coco)`` changes it and returns what the error names."""

    def edit(text):
        coco = json.loads(text)
        message = fn(coco)
        return json.dumps(coco), message

    return edit


def _without(key):
    def edit(coco):
        del coco[key]
        return f"missing top-level key '{key}' (COCO needs images, annotations and categories)"

    return _coco_edit(edit)


def _undeclared_category(coco):
    ann = coco["annotations"][0]
    ann["category_id"] = 99
    return (
        f"annotation id {ann['id']} (image id {ann['image_id']}) has category_id 99, not "
        "declared in 'categories'"
    )


def _orphan(coco):
    ann = coco["annotations"][0]
    ann["image_id"] = 424242
    return f"annotation id {ann['id']} has image_id 424242, which no entry of 'images' has"


def _zero_height(coco):
    coco["annotations"][0]["bbox"][3] = 0
    return "with non-positive width or height"


def _nan_polygon(coco):
    # issue 27: one NaN drove the mask config to 22.7 GB RSS in 37 s, until the kernel killed it
    ann = coco["annotations"][0]
    ann["segmentation"][0][0] = float("nan")
    return (
        f"annotation id {ann['id']} (image id {ann['image_id']}) has polygon 0 with a coordinate "
        "that is not a finite number; fix or remove the annotation"
    )


def _iscrowd_yes(coco):
    ann = coco["annotations"][-1]
    ann["iscrowd"] = "yes"
    return f"annotation id {ann['id']} (image id {ann['image_id']}) has iscrowd 'yes', not 0 or 1"


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: (text[: len(text) // 2], ": not valid JSON ("),
        _without("images"),
        _without("annotations"),
        _without("categories"),
        _coco_edit(_undeclared_category),
        _coco_edit(_orphan),
        _coco_edit(_zero_height),
        _coco_edit(_nan_polygon),
        _coco_edit(_iscrowd_yes),
        "missing image file",
    ],
    ids=[
        "malformed",
        "no_images",
        "no_annotations",
        "no_categories",
        "undeclared_category",
        "orphan_annotation",
        "zero_height_box",
        "nan_polygon",
        "iscrowd_yes",
        "missing_image",
    ],
)
def test_a_broken_coco_file_is_one_line_naming_it(data_copy, tmp_path, capsys, edit):
    path = os.path.join(data_copy, "coco", "annotations", "instances_test.json")
    with open(path) as f:
        text = f.read()
    if edit == "missing image file":
        image = json.loads(text)["images"][0]
        jpeg = os.path.join(data_copy, "VOC2007", "JPEGImages", image["file_name"])
        os.remove(jpeg)
        message = f"image id {image['id']} is {jpeg}, which does not exist"
    else:
        text, message = edit(text)
        with open(path, "w") as f:
            f.write(text)
    out = tmp_path / "out"
    argv = ["--config-file", COCO_CFG, *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)]
    assert load_tool("train_net").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"train_net.py: error: COCO annotations {path}") and message in err, err
    assert not out.exists()  # refused at start


@pytest.fixture
def image_folder_copy(synthetic_root, tmp_path):
    dst = tmp_path / "imagefolder"
    shutil.copytree(os.path.join(synthetic_root, "imagefolder", "train"), dst / "train")
    return dst


def test_directory_symlinks_do_not_loop_or_leave_the_root(image_folder_copy, tmp_path):
    from moco.data.checks import CheckedImageFolder

    train = image_folder_copy / "train"
    before = CheckedImageFolder(str(train)).samples
    disk = train / "disk"
    os.symlink(".", disk / "loop")  # a cycle: multiplied the class 41x
    os.symlink("..", disk / "up")  # back to the root: every class again, under disk
    os.symlink("/", disk / "slash")  # out of the root: listing never finished
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(before[0][0], outside / "x.png")
    os.symlink(str(outside), train / "ring" / "elsewhere")
    after = CheckedImageFolder(str(train)).samples
    assert after == before


def test_images_above_the_pixel_limit_are_skipped_and_counted(image_folder_copy, caplog):
    from PIL import Image

    from moco.data.datasets import image_folder

    big = image_folder_copy / "train" / "disk" / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    with caplog.at_level("WARNING"):
        ds = image_folder(
            str(image_folder_copy),
            "train",
            None,
            "DATA.ROOT",
            max_bad_fraction=0.1,
            max_pixels=50_000,
        )
    assert str(big) not in [p for p, _ in ds.samples] and ds.skipped_images == 1
    assert (
        f"skipping unreadable image {big} (300x200 = 60000 pixels > DATA.MAX_IMAGE_PIXELS 50000)"
        in caplog.text
    )
    assert (
        len(image_folder(str(image_folder_copy), "train", None, "DATA.ROOT").samples) == 31
    )  # default


def test_boxes_checked_at_once_match_the_box_by_box_pass():
    """check_boxes' numpy pass keeps, clips and counts exactly as the box-by-box one."""
    import copy

    import numpy as np

    from detection.data.checks import _check_boxes_one_by_one, check_boxes

    rng = np.random.default_rng(0)
    dicts = []
    for k in range(60):
        anns = []
        for _ in range(3):
            x, y = rng.uniform(-20, 110, 2).round(1)
            if rng.random() < 0.5:  # COCO's width and height, or corners
                box, mode = [x, y, *rng.uniform(1, 40, 2).round(1)], BoxMode.XYWH_ABS
            else:
                box, mode = [x, y, x + rng.uniform(1, 40), y + rng.uniform(1, 40)], BoxMode.XYXY_ABS
            anns.append({"bbox": [float(v) for v in box], "bbox_mode": mode, "category_id": 0})
        dicts.append({"file_name": f"{k}.jpg", "width": 100, "height": 80, "annotations": anns})
    dicts = [d for d in dicts if all(_fits(a, d) for a in d["annotations"])]
    slow = copy.deepcopy(dicts)
    clipped = check_boxes(dicts, lambda d: d["file_name"])
    assert clipped == _check_boxes_one_by_one(slow, lambda d: d["file_name"]) and clipped > 10
    for a, b in zip(dicts, slow):
        for x, y in zip(a["annotations"], b["annotations"]):
            assert x["bbox_mode"] == y["bbox_mode"]
            assert np.allclose(x["bbox"], y["bbox"], atol=1e-4)  # the box-by-box pass is float32


def _fits(ann, d):
    """Whether a box is one check_boxes keeps (clipped or not), by the box-by-box pass."""
    from detection.data.checks import _check_boxes_one_by_one

    try:
        _check_boxes_one_by_one([{**d, "annotations": [dict(ann)]}], lambda d: "")
    except ValueError:
        return False
    return True
