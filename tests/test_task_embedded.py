"""Issue 26's embedded config per task (configs/tasks/embedded_*): each trains a few iterations on
CPU on a tiny generated set, is scored by its task's Detectron2 evaluator (the metric keys
final_metrics.json holds are those tools/report.py reads), and loads converted MoCo, CMC and CPC
weights into every backbone tensor."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import REPO
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from test_convert import _randomized

from detection.checkpoint import SafeDetectionCheckpointer, safe_load_pickle
from detection.config import load_cfg
from detection.convert import convert_checkpoint
from detection.data.checks import train_mapper
from detection.trainer import main as train_main
from moco.checkpoint import build_checkpoint
from moco.modeling.cmc import CMC
from moco.modeling.cpc import CPC
from moco.modeling.moco import MoCo
from moco.modeling.resnet import resnet_encoder

TASKS = os.path.join(REPO, "configs", "tasks")
# config -> (task in final_metrics.json, {section: metric keys the report reads})
EXPECTED = {
    "embedded_kp_R_18w16_FPN": ("coco_kp", {"keypoints": {"AP", "AP50", "AP75"}}),
    "embedded_lvis_R_18w16_FPN": ("lvis", {"segm": {"AP", "AP50", "AP75", "APr", "APc", "APf"}}),
    "embedded_cityscapes_R_18w16_FPN": ("cityscapes", {"segm": {"AP", "AP50"}}),
    "embedded_voc_sem_seg_R_18w16_FCN": ("sem_seg", {"sem_seg": {"mIoU", "fwIoU", "pACC"}}),
}
# a few iterations of 2 images, no precise BN: seconds per config
TINY = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.STEPS",
    "()",
    "TEST.PRECISE_BN.ENABLED",
    "False",
    "DATALOADER.NUM_WORKERS",
    "0",
]


def _path(name):
    return os.path.join(TASKS, name + ".yaml")


def _tree(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{MoCo, CMC, CPC: a converted .pkl} of resnet18_w16 checkpoints with random weights
    (defaults would match a fresh detector by accident)."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    models = {
        "moco": MoCo(resnet_encoder("resnet18_w16"), dim=8, K=8, mlp=True, shuffle_bn="off"),
        "cmc": CMC("resnet18_w16", "moco", size=6, dim=8, K=8, shuffle_bn="off"),
        "cpc": CPC(resnet_encoder("resnet18_w16"), 32, patch_size=16, steps=2, dim=8),
    }
    paths = {}
    for i, (name, model) in enumerate(models.items()):
        encoders = [model.l.encoder_q, model.ab.encoder_q] if name == "cmc" else [model.encoder_q]
        for j, encoder in enumerate(encoders):
            _randomized(encoder, seed=10 * i + j)
        src = folder / f"{name}.pth.tar"
        torch.save(build_checkpoint(model, None, 1, "resnet18_w16"), src)
        paths[name] = str(folder / f"{name}.pkl")
        result = convert_checkpoint(src, paths[name])
        assert result.format == ("cmc" if name == "cmc" else "moco") and result.width == 16
    return paths


def _cmc_backbone(cfg):
    """CMC's Lab backbone in place of the plain one (as embedded_voc_R_18w16_FPN_cmc.yaml)."""
    fpn = cfg.MODEL.BACKBONE.NAME.endswith("_fpn_backbone")
    return "build_lab_resnet_fpn_backbone" if fpn else "build_lab_resnet_backbone"


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("init", ["moco", "cmc", "cpc"])
def test_converted_weights_fill_every_backbone_tensor(name, init, weights, registered):
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights[init]]
    if init == "cmc":
        opts += ["MODEL.BACKBONE.NAME", _cmc_backbone(load_cfg(_path(name)))]
    cfg = load_cfg(_path(name), opts)
    model = build_model(cfg)
    checkpointer = SafeDetectionCheckpointer(model)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    load = checkpointer.weights_load
    assert load["matched"] == load["backbone_tensors"] > 0
    # every converted tensor is what the model holds (res5 dilated or not: the same tensors)
    state = model.state_dict()
    prefix = "backbone.bottom_up." if hasattr(model.backbone, "bottom_up") else "backbone."
    source = safe_load_pickle(weights[init])["model"]
    assert len(source) >= load["backbone_tensors"]
    for key, value in source.items():
        assert torch.equal(state[prefix + key], torch.as_tensor(value)), key


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_embedded_task_trains_evaluates_and_writes_its_metrics(
    name, weights, registered, tasks_root, tmp_path, monkeypatch, one_thread
):
    cwd = tmp_path / "cwd"  # cityscapesscripts writes into the working folder unless told
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cityscapes = os.path.join(tasks_root, "cityscapes")
    before = _tree(cityscapes)
    out = str(tmp_path / "out")
    argv = ["--config-file", _path(name), *TINY, "MODEL.WEIGHTS", weights["moco"]]
    train_main(default_argument_parser().parse_args([*argv, "OUTPUT_DIR", out]))
    with open(os.path.join(out, "final_metrics.json")) as f:
        data = json.load(f)
    task, sections = EXPECTED[name]
    assert data["task"] == task and data["iterations"] == 2
    for section, keys in sections.items():
        values = data["metrics"][section]
        assert keys <= set(values), (section, sorted(values))
        assert all(v is None or 0 <= v <= 100 for k, v in values.items() if k in keys)
    load = data["weights_load"]
    assert load["matched"] == load["backbone_tensors"] > 0
    assert np.isfinite(data["train_seconds"])
    # nothing written into the Cityscapes tree (a scan cache in a city folder breaks its loader)
    # nor the working folder: cityscapesscripts' matches.json is in the inference folder
    assert _tree(cityscapes) == before
    assert os.listdir(cwd) == []
    if task == "cityscapes":
        inference = os.path.join(out, "inference", "synthetic_cityscapes_instance_test")
        assert os.path.isfile(os.path.join(inference, "matches.json"))
        assert os.path.isdir(os.path.join(out, "scan_cache"))


def test_semantic_segmentation_trains_on_scaled_then_cropped_images(registered):
    """The paper's order (scale, crop, flip): CROP.SIZE is the size trained at."""
    from detectron2.data import DatasetCatalog
    from detectron2.data import transforms as T

    cfg = load_cfg(_path("embedded_voc_sem_seg_R_18w16_FCN"), ["MODEL.DEVICE", "cpu"])
    mapper = train_mapper(cfg)
    kinds = [type(a) for a in mapper.augmentations.augs]
    assert kinds == [T.ResizeShortestEdge, T.RandomCrop, T.RandomFlip]
    crop = tuple(cfg.INPUT.CROP.SIZE)
    sizes = set()
    for d in DatasetCatalog.get("synthetic_voc_sem_seg_trainval"):
        for _ in range(3):
            item = mapper(dict(d))
            assert item["image"].shape[1:] == item["sem_seg"].shape
            assert item["image"].shape[1] <= crop[0] and item["image"].shape[2] <= crop[1]
            sizes.add(tuple(item["image"].shape[1:]))
    assert crop in sizes  # scaled up past the crop, then cut to it
    # a detector keeps Detectron2's own mapper (crop, if any, before the resize)
    det = load_cfg(_path("embedded_lvis_R_18w16_FPN"), ["MODEL.DEVICE", "cpu"])
    assert [type(a) for a in train_mapper(det).augmentations.augs] == [
        T.ResizeShortestEdge,
        T.RandomFlip,
    ]


def test_keypoint_sets_are_scored_with_their_own_oks_sigmas(registered, tmp_path):
    """COCO's 17 sigmas do not fit the embedded K = 5: the set's metadata gives them, unless
    TEST.KEYPOINT_OKS_SIGMAS does."""
    from detectron2.data import MetadataCatalog

    from detection.trainer import DetectionTrainer

    name, path = "synthetic_kp_test", _path("embedded_kp_R_18w16_FPN")
    cfg = load_cfg(path, ["OUTPUT_DIR", str(tmp_path)])
    sigmas = MetadataCatalog.get(name).keypoint_oks_sigmas
    assert len(sigmas) == 5
    assert list(DetectionTrainer.build_evaluator(cfg, name)._kpt_oks_sigmas) == sigmas
    given = load_cfg(
        path, ["OUTPUT_DIR", str(tmp_path), "TEST.KEYPOINT_OKS_SIGMAS", str([0.1] * 5)]
    )
    assert list(DetectionTrainer.build_evaluator(given, name)._kpt_oks_sigmas) == [0.1] * 5


def test_a_model_that_detects_nothing_scores_ap_0_not_nan(registered, tmp_path):
    """COCOEvaluator says NaN when no image has a detection; with ground truth in the test set
    that is AP 0 (the report refuses a null AP): AP, AP50, AP75 are 0, the area APs stay NaN."""
    import math

    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances

    from detection.trainer import DetectionTrainer

    name = "synthetic_kp_test"
    cfg = load_cfg(_path("embedded_kp_R_18w16_FPN"), ["OUTPUT_DIR", str(tmp_path)])
    evaluator = DetectionTrainer.build_evaluator(cfg, name)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        empty = Instances((d["height"], d["width"]))
        empty.pred_boxes = Boxes(torch.zeros(0, 4))
        empty.scores = torch.zeros(0)
        empty.pred_classes = torch.zeros(0, dtype=torch.long)
        empty.pred_keypoints = torch.zeros(0, 5, 3)
        evaluator.process([d], [{"instances": empty}])
    results = evaluator.evaluate()
    for section in ("bbox", "keypoints"):
        assert {k: results[section][k] for k in ("AP", "AP50", "AP75")} == dict.fromkeys(
            ("AP", "AP50", "AP75"), 0.0
        )
        assert math.isnan(results[section]["APl"])
