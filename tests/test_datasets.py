"""detection.data.datasets: registration through Detectron2's helpers, loaders and evaluators."""

import copy
import os

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2")

from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    detection_utils,
)
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, BoxMode, Instances, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask

from detection.data.datasets import (
    CLASS_NAMES,
    SYNTHETIC_DATASETS,
    default_synthetic_root,
    evaluator_type,
    register_synthetic,
)
from moco.data.synthetic.spec import SyntheticSpec
from moco.data.synthetic.writers import ensure_generated


def _xyxy(ann):
    return BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)


def _ground_truth_as_predictions(dicts, with_masks=False):
    """Detectron2 model outputs that reproduce the ground truth exactly (score 1)."""
    inputs, outputs = [], []
    for d in dicts:
        h, w = d["height"], d["width"]
        inst = Instances((h, w))
        anns = d["annotations"]
        inst.pred_boxes = Boxes(
            torch.tensor([_xyxy(a) for a in anns], dtype=torch.float32).reshape(-1, 4)
        )
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        if with_masks:
            masks = [
                polygons_to_bitmask([np.asarray(p) for p in a["segmentation"]], h, w) for a in anns
            ]
            inst.pred_masks = torch.from_numpy(np.stack(masks).astype(bool))
        inputs.append(
            {"image_id": d["image_id"], "height": h, "width": w, "file_name": d["file_name"]}
        )
        outputs.append({"instances": inst})
    return inputs, outputs


def _evaluate(evaluator, inputs, outputs):
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_default_root_follows_detectron2_datasets(monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", "/some/where")
    assert default_synthetic_root() == os.path.join("/some/where", "moco_det_synthetic")
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert default_synthetic_root() == os.path.join("datasets", "moco_det_synthetic")


def test_register_is_idempotent_and_leaves_builtins(synthetic_root, synthetic_datasets):
    builtin_voc = MetadataCatalog.get("voc_2007_trainval").dirname
    builtin_coco = MetadataCatalog.get("coco_2017_train").json_file
    again = register_synthetic(synthetic_root)
    assert again == synthetic_datasets and set(again) == set(SYNTHETIC_DATASETS)
    for name in SYNTHETIC_DATASETS:
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).thing_classes == list(CLASS_NAMES)
    voc = MetadataCatalog.get("synthetic_voc_test")
    assert (voc.dirname, voc.split, voc.year) == (
        os.path.join(synthetic_root, "VOC2007"),
        "test",
        2007,
    )
    coco = MetadataCatalog.get("synthetic_coco_trainval")
    assert coco.json_file == os.path.join(
        synthetic_root, "coco", "annotations", "instances_trainval.json"
    )
    assert coco.image_root == os.path.join(synthetic_root, "VOC2007", "JPEGImages")
    assert MetadataCatalog.get("voc_2007_trainval").dirname == builtin_voc
    assert MetadataCatalog.get("coco_2017_train").json_file == builtin_coco
    assert (
        "voc_2007_trainval" in DatasetCatalog.list() and "coco_2017_train" in DatasetCatalog.list()
    )


def test_evaluator_type(synthetic_datasets):
    assert (
        evaluator_type("synthetic_voc_trainval") == evaluator_type("voc_2007_test") == "pascal_voc"
    )
    assert evaluator_type("synthetic_coco_test") == evaluator_type("coco_2017_val") == "coco"
    with pytest.raises(ValueError, match="'no_such_set' is not registered"):
        evaluator_type("no_such_set")
    # issue 26's tasks: Detectron2's builtin keypoint, LVIS, Cityscapes and semantic sets
    assert evaluator_type("keypoints_coco_2017_val") == "coco"
    assert evaluator_type("lvis_v0.5_val") == "lvis"
    assert evaluator_type("cityscapes_fine_instance_seg_val") == "cityscapes_instance"
    assert evaluator_type("cityscapes_fine_sem_seg_val") == "cityscapes_sem_seg"
    assert evaluator_type("ade20k_sem_seg_val") == "sem_seg"
    with pytest.raises(ValueError, match="evaluator_type 'coco_panoptic_seg'"):
        evaluator_type("coco_2017_val_panoptic")


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="generate the data first with .*make_data.py --root"
    ):
        register_synthetic(str(tmp_path / "absent"))


def test_repoint_to_another_root_and_refuse_foreign_names(synthetic_root, tmp_path):
    other = str(tmp_path / "other")
    ensure_generated(
        other,
        SyntheticSpec(
            seed=9,
            cls_train_per_class=1,
            cls_val_per_class=1,
            det_trainval_images=2,
            det_test_images=2,
        ),
    )
    try:
        register_synthetic(other)
        assert MetadataCatalog.get("synthetic_voc_trainval").dirname == os.path.join(
            other, "VOC2007"
        )
        assert len(DatasetCatalog.get("synthetic_coco_trainval")) == 2
        DatasetCatalog.remove("synthetic_voc_test")
        MetadataCatalog.remove("synthetic_voc_test")
        DatasetCatalog.register("synthetic_voc_test", list)  # someone else's dataset
        with pytest.raises(
            ValueError, match="synthetic_voc_test is already registered, not by register_"
        ):
            register_synthetic(synthetic_root)
        DatasetCatalog.remove("synthetic_voc_test")
    finally:
        register_synthetic(synthetic_root)
    assert MetadataCatalog.get("synthetic_voc_trainval").dirname == os.path.join(
        synthetic_root, "VOC2007"
    )


def test_voc_and_coco_loaders_agree(synthetic_datasets, synthetic_spec):
    spec = synthetic_spec
    for split, n in (("trainval", spec.det_trainval_images), ("test", spec.det_test_images)):
        voc = DatasetCatalog.get(f"synthetic_voc_{split}")
        coco = DatasetCatalog.get(f"synthetic_coco_{split}")
        assert len(voc) == len(coco) == n
        by_file = {d["file_name"]: d for d in coco}
        total = 0
        for v in voc:
            c = by_file[v["file_name"]]
            assert (v["height"], v["width"]) == (c["height"], c["width"])
            assert int(v["image_id"]) == c["image_id"]
            vb = sorted((a["category_id"], tuple(_xyxy(a))) for a in v["annotations"])
            cb = sorted((a["category_id"], tuple(_xyxy(a))) for a in c["annotations"])
            assert vb == cb and len(vb) > 0
            total += len(vb)
            for _, (x0, y0, x1, y1) in vb:
                assert 0 <= x0 < x1 <= v["width"] and 0 <= y0 < y1 <= v["height"]
        assert total >= n


def test_coco_annotations_build_mask_rcnn_targets(synthetic_datasets):
    d = DatasetCatalog.get("synthetic_coco_trainval")[0]
    annos = copy.deepcopy(d["annotations"])
    inst = detection_utils.annotations_to_instances(
        annos, (d["height"], d["width"]), mask_format="polygon"
    )
    assert isinstance(inst.gt_masks, PolygonMasks) and len(inst.gt_masks) == len(annos)
    # the polygons hug their boxes (outline within half a pixel of the box edges)
    assert torch.allclose(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor, atol=0.5)


def test_voc_evaluator_scores_ground_truth_100(synthetic_datasets):
    dicts = DatasetCatalog.get("synthetic_voc_test")
    inputs, outputs = _ground_truth_as_predictions(dicts)
    evaluator = PascalVOCDetectionEvaluator("synthetic_voc_test")
    res = _evaluate(evaluator, inputs, outputs)["bbox"]
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    assert res["AP75"] == pytest.approx(100.0)
    # not vacuous: boxes shifted by 40% of their width fail the stricter IoU thresholds
    for out in outputs:
        t = out["instances"].pred_boxes.tensor
        dx = 0.4 * (t[:, 2] - t[:, 0])
        t[:, 0] += dx
        t[:, 2] += dx
    worse = _evaluate(evaluator, inputs, outputs)["bbox"]
    assert worse["AP75"] < 50.0


def test_coco_evaluator_scores_ground_truth_100(synthetic_datasets, tmp_path):
    dicts = DatasetCatalog.get("synthetic_coco_test")
    inputs, outputs = _ground_truth_as_predictions(dicts, with_masks=True)
    evaluator = COCOEvaluator(
        "synthetic_coco_test", tasks=("bbox", "segm"), distributed=False, output_dir=str(tmp_path)
    )
    res = _evaluate(evaluator, inputs, outputs)
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)
    # not vacuous: wrong classes score nothing
    for out in outputs:
        out["instances"].pred_classes = (out["instances"].pred_classes + 1) % len(CLASS_NAMES)
    assert _evaluate(evaluator, inputs, outputs)["bbox"]["AP"] < 5.0
