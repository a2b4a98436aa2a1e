"""Issue 26's paper-scale task configs (configs/tasks): they load and build on CPU, are written for 8
GPUs and scale to 1, 2 and 4 by Detectron2's rule, the _moco variants differ only in the input
convention; the dilated FCN head and its evaluator."""

import glob
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, load_tool
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from PIL import Image

from detection.config import load_cfg
from detection.data.voc_sem_seg import load_voc_sem_seg, register_voc_sem_seg
from detection.semantic_seg import DilatedFCNHead
from detection.trainer import DetectionTrainer, effective_schedule, prepare_datasets, schedule_line

TASKS = os.path.join(REPO, "configs", "tasks")
DETECTION = os.path.join(REPO, "configs", "detection")
TASK_CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(TASKS, "*.yaml"))
    if not os.path.basename(p).startswith(("Base-", "embedded_"))
)
# every paper-scale config: the tasks' and the detection ones (not the embedded CPU configs,
# tests/test_task_embedded.py)
PAPER = TASK_CONFIGS + sorted(
    p
    for p in glob.glob(os.path.join(DETECTION, "*.yaml"))
    if not os.path.basename(p).startswith(("Base-", "embedded_"))
)
# the input convention of a converted MoCo (torchvision) R-50, and the weights it is given by hand
MOCO_KEYS = {
    "MODEL.PIXEL_MEAN",
    "MODEL.PIXEL_STD",
    "MODEL.RESNETS.STRIDE_IN_1X1",
    "INPUT.FORMAT",
    "MODEL.WEIGHTS",
}
# name -> (meta-architecture, classes, keypoints on, masks on)
EXPECTED = {
    "coco_kp_R_50_FPN_2x": ("GeneralizedRCNN", 1, True, False),
    "lvis_v0.5_R_50_FPN": ("GeneralizedRCNN", 1230, False, True),
    "cityscapes_R_50_FPN": ("GeneralizedRCNN", 8, False, True),
    "voc_sem_seg_R_50_FCN": ("SemanticSegmentor", 21, False, False),
    "cityscapes_sem_seg_R_50_FCN": ("SemanticSegmentor", 19, False, False),
}


def _name(path):
    return os.path.basename(path)[: -len(".yaml")]


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_every_task_has_a_supervised_and_a_moco_config():
    names = {_name(p) for p in TASK_CONFIGS}
    assert names == set(EXPECTED) | {n + "_moco" for n in EXPECTED}


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=_name)
def test_task_config_loads_and_builds_its_model_on_cpu(path):
    cfg = load_cfg(path, ["MODEL.DEVICE", "cpu"])
    arch, classes, keypoints, masks = EXPECTED[_name(path).removesuffix("_moco")]
    assert cfg.MODEL.META_ARCHITECTURE == arch
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 8
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0  # every layer fine-tuned
    assert cfg.MODEL.RESNETS.DEPTH == 50
    model = build_model(cfg)
    # the paper's SyncBN is plain BN in one process (detection.config)
    norms = {type(m).__name__ for m in model.backbone.modules() if "Norm" in type(m).__name__}
    assert norms == {"BatchNorm2d"}
    if arch == "GeneralizedRCNN":
        assert model.roi_heads.box_predictor.cls_score.out_features == classes + 1
        assert hasattr(model.roi_heads, "keypoint_head") == keypoints
        assert hasattr(model.roi_heads, "mask_head") == masks
        return
    head = model.sem_seg_head
    assert isinstance(head, DilatedFCNHead) and head.predictor.out_channels == classes
    # appendix A.5: conv5 with dilation 2 and stride 1 (total stride 16); two 3x3 convs of 256
    # channels with dilation 6 and BN, then the 1x1 classifier
    assert model.backbone.output_shape()["res5"].stride == 16
    assert model.backbone.res5[0].conv2.dilation == (2, 2)
    assert [(c.out_channels, c.kernel_size, c.dilation) for c in head.convs] == [
        (256, (3, 3), (6, 6))
    ] * 2
    assert all(isinstance(c.norm, torch.nn.BatchNorm2d) for c in head.convs)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 40, "width": 56}])
    assert out["sem_seg"].shape == (classes, 40, 56)  # the original image size
    model.train()
    target = torch.randint(0, classes, (40, 56))
    losses = model([{"image": image, "sem_seg": target}])
    assert set(losses) == {"loss_sem_seg"}
    # the classifier starts near zero: the first loss is about log(classes)
    assert losses["loss_sem_seg"].item() == pytest.approx(np.log(classes), rel=0.05)


@pytest.mark.parametrize("path", PAPER, ids=_name)
def test_every_paper_config_is_written_for_8_gpus(path):
    cfg = load_cfg(path)
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 8
    assert cfg.SOLVER.IMS_PER_BATCH % 8 == 0


@pytest.mark.parametrize(
    "path", [p for p in PAPER if p.endswith("_moco.yaml")], ids=lambda p: _name(p)
)
def test_moco_variant_differs_from_supervised_only_in_the_input_convention(path):
    moco = _flat(load_cfg(path))
    supervised = _flat(load_cfg(path.replace("_moco.yaml", ".yaml")))
    assert moco.keys() == supervised.keys()
    assert {k for k in moco if moco[k] != supervised[k]} == MOCO_KEYS
    assert (moco["INPUT.FORMAT"], moco["MODEL.RESNETS.STRIDE_IN_1X1"]) == ("RGB", False)
    assert moco["MODEL.PIXEL_STD"] == [58.395, 57.120, 57.375] and moco["MODEL.WEIGHTS"] == ""


# (config, GPUs) -> (IMS_PER_BATCH, BASE_LR, MAX_ITER, STEPS, WARMUP_ITERS) by Detectron2's rule:
# per-GPU batch kept, LR scaled with the batch, iterations inversely
SCALED = [
    ("coco_kp_R_50_FPN_2x", 1, (2, 0.0025, 1440000, (960000, 1280000), 8000)),
    ("coco_kp_R_50_FPN_2x", 2, (4, 0.005, 720000, (480000, 640000), 4000)),
    ("coco_kp_R_50_FPN_2x", 4, (8, 0.01, 360000, (240000, 320000), 2000)),
    ("coco_kp_R_50_FPN_2x", 8, (16, 0.02, 180000, (120000, 160000), 1000)),
    ("cityscapes_R_50_FPN", 1, (1, 0.00125, 192000, (144000,), 8000)),
    ("cityscapes_R_50_FPN", 4, (4, 0.005, 48000, (36000,), 2000)),
    ("voc_sem_seg_R_50_FCN", 2, (4, 0.00075, 120000, (84000, 108000), 4000)),
    ("cityscapes_sem_seg_R_50_FCN", 4, (8, 0.005, 180000, (126000, 162000), 2000)),
    ("lvis_v0.5_R_50_FPN", 1, (2, 0.0025, 720000, (480000, 640000), 8000)),
]


@pytest.mark.parametrize("name, gpus, expected", SCALED, ids=lambda v: str(v))
def test_fewer_gpus_scale_batch_lr_and_iterations(name, gpus, expected):
    cfg = load_cfg(os.path.join(TASKS, name + ".yaml"))
    s = effective_schedule(cfg, gpus).SOLVER
    batch, lr, max_iter, steps, warmup = expected
    assert (s.IMS_PER_BATCH, s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS) == (
        batch,
        max_iter,
        steps,
        warmup,
    )
    assert s.BASE_LR == pytest.approx(lr)
    line = schedule_line(cfg, gpus)
    assert "\n" not in line and f"IMS_PER_BATCH {batch} " in line and f"MAX_ITER {max_iter}" in line
    assert ("scaled from SOLVER.REFERENCE_WORLD_SIZE 8" in line) == (gpus != 8)


def test_scaling_is_off_for_reference_world_size_0_and_a_bad_batch_is_one_line():
    path = os.path.join(TASKS, "coco_kp_R_50_FPN_2x.yaml")
    cfg = load_cfg(path, ["SOLVER.REFERENCE_WORLD_SIZE", "0"])
    assert effective_schedule(cfg, 1).SOLVER.IMS_PER_BATCH == 16
    assert "as written (SOLVER.REFERENCE_WORLD_SIZE 0" in schedule_line(cfg, 1)
    bad = load_cfg(path, ["SOLVER.IMS_PER_BATCH", "6"])
    with pytest.raises(ValueError, match="IMS_PER_BATCH 6 is not a multiple of SOLVER.REFERENC"):
        effective_schedule(bad, 1)


def test_train_net_prints_the_effective_schedule_once_at_start(tmp_path, capsys):
    # the VOC segmentation set is not on this machine: the run stops at the data, after the line
    argv = ["--config-file", os.path.join(TASKS, "voc_sem_seg_R_50_FCN_moco.yaml")]
    argv += ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "o")]
    assert load_tool("train_net").main(argv) == 2
    out = capsys.readouterr()
    lines = [x for x in out.out.splitlines() if "schedule:" in x]
    assert lines == [
        "train_net.py: schedule: world size 1, IMS_PER_BATCH 2 (2 per process), BASE_LR "
        "0.000375, MAX_ITER 240000, STEPS (168000, 216000), WARMUP_ITERS 8000 (scaled from "
        "SOLVER.REFERENCE_WORLD_SIZE 8 by Detectron2's rule)"
    ]
    assert len(out.err.strip().splitlines()) == 1  # the missing data: one line


def _head(**kw):
    return DilatedFCNHead({"res5": ShapeSpec(channels=32, stride=16)}, num_classes=5, **kw)


def test_fcn_head_output_shape_and_loss_on_a_tiny_input():
    torch.manual_seed(0)
    head = _head(conv_dims=8)
    features = {"res5": torch.randn(2, 32, 3, 4)}
    head.eval()
    logits, losses = head(features)
    assert logits.shape == (2, 5, 48, 64) and losses == {}  # stride 16 back to the input
    head.train()
    targets = torch.randint(0, 5, (2, 48, 64))
    targets[:, :10] = 255  # ignored pixels
    none, losses = head(features, targets)
    assert none is None and set(losses) == {"loss_sem_seg"}
    expected = F.cross_entropy(
        F.interpolate(head.layers(features), size=(48, 64), mode="bilinear", align_corners=False),
        targets,
        ignore_index=255,
    )
    assert losses["loss_sem_seg"].item() == pytest.approx(expected.item(), rel=1e-5)
    losses["loss_sem_seg"].backward()
    assert all(p.grad is not None for p in head.parameters())
    # the loss weight scales it; targets whose size is not a multiple of 16 are matched
    odd = torch.randint(0, 5, (2, 45, 61))
    weighted = _head(conv_dims=8, loss_weight=0.5)
    weighted.load_state_dict(head.state_dict())
    assert weighted(features, odd)[1]["loss_sem_seg"].item() == pytest.approx(
        0.5 * head(features, odd)[1]["loss_sem_seg"].item(), rel=1e-5
    )


def test_fcn_head_takes_one_feature_map():
    with pytest.raises(ValueError, match="IN_FEATURES: DilatedFCNHead takes one feature map"):
        DilatedFCNHead(
            {"res4": ShapeSpec(channels=8, stride=16), "res5": ShapeSpec(channels=8, stride=16)},
            num_classes=3,
        )
    cfg = load_cfg(
        os.path.join(TASKS, "voc_sem_seg_R_50_FCN.yaml"),
        ["MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res4']", "MODEL.DEVICE", "cpu"],
    )
    with pytest.raises(ValueError, match=r"IN_FEATURES \['res4'\]: the backbone gives \['res5'\]"):
        build_model(cfg)


def test_semantic_sets_are_checked_against_the_head_and_scored_by_miou(tmp_path):
    path = os.path.join(TASKS, "cityscapes_sem_seg_R_50_FCN.yaml")
    bad = load_cfg(path, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "20"])
    with pytest.raises(
        ValueError, match="NUM_CLASSES is 20 but cityscapes_fine_sem_seg_train has 19"
    ):
        prepare_datasets(bad)
    # a two-image set of label PNGs: SemSegEvaluator's mIoU through the trainer's choice
    name = "test_task_configs_sem_seg"
    labels = [np.array([[0, 0, 1, 1], [2, 2, 255, 255]], np.uint8), np.full((2, 4), 1, np.uint8)]
    dicts = []
    for i, label in enumerate(labels):
        file = str(tmp_path / f"{i}.png")
        Image.fromarray(label).save(file)
        dicts.append({"file_name": f"{i}.jpg", "sem_seg_file_name": file, "height": 2, "width": 4})
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(
        stuff_classes=["a", "b", "c"], ignore_label=255, evaluator_type="sem_seg"
    )
    try:
        cfg = load_cfg(path, ["OUTPUT_DIR", str(tmp_path)])
        evaluator = DetectionTrainer.build_evaluator(cfg, name)
        assert isinstance(evaluator, SemSegEvaluator)
        evaluator.reset()
        for d, label in zip(dicts, labels):
            pred = label.copy()
            pred[pred == 255] = 0
            if d["file_name"] == "1.jpg":
                pred[0, 0] = 2  # one of 14 scored pixels wrong
            scores = F.one_hot(torch.as_tensor(pred, dtype=torch.long), 3).permute(2, 0, 1)
            evaluator.process([d], [{"sem_seg": scores.float()}])
        miou = evaluator.evaluate()["sem_seg"]["mIoU"]
        # 14 scored pixels (255 ignored); IoU a = 2/2, b = 9/10 (one b pixel predicted c), c = 2/3
        assert miou == pytest.approx(100 * (1 + 9 / 10 + 2 / 3) / 3)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize(
    "name, package",
    [("lvis_v0.5_R_50_FPN", "lvis"), ("cityscapes_R_50_FPN", "cityscapesscripts")],
)
def test_a_set_whose_package_is_missing_fails_at_start_in_one_line(name, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails, installed or not
    cfg = load_cfg(os.path.join(TASKS, name + "_moco.yaml"))
    with pytest.raises(ValueError, match=f"needs the '{package}' package") as e:
        prepare_datasets(cfg)
    assert len(str(e.value).splitlines()) == 1 and f"pip install {package}" in str(e.value)


def _voc_seg(root, label_modes):
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    ids = [f"2007_00000{i}" for i in range(len(label_modes))]
    for image_id, mode in zip(ids, label_modes):
        Image.new("RGB", (2, 2)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        label = Image.fromarray(np.array([[0, 15], [255, 20]], np.uint8)).convert(mode)
        label.save(voc / "SegmentationClassAug" / f"{image_id}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return voc


def test_voc_semantic_sets_load_class_index_pngs_and_refuse_palette_ones(tmp_path):
    voc = _voc_seg(tmp_path / "good", ["L", "L"])
    dicts = load_voc_sem_seg(str(voc), "val")
    assert [d["image_id"] for d in dicts] == ["2007_000000", "2007_000001"]
    assert dicts[1]["sem_seg_file_name"] == str(voc / "SegmentationClassAug" / "2007_000001.png")
    assert dicts[1]["file_name"] == str(voc / "JPEGImages" / "2007_000001.jpg")
    # VOC's own SegmentationClass is a palette PNG: read as grayscale it gives other classes
    bad = _voc_seg(tmp_path / "palette", ["L", "P"])
    with pytest.raises(ValueError, match="2007_000001.png: a P PNG, not class indices") as e:
        load_voc_sem_seg(str(bad), "val")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="train_aug.txt does not exist"):
        load_voc_sem_seg(str(voc), "train_aug")
    (voc / "SegmentationClassAug" / "2007_000000.png").unlink()
    with pytest.raises(FileNotFoundError, match="2007_000000.png"):
        load_voc_sem_seg(str(voc), "val")
    # registered under $DETECTRON2_DATASETS, 21 classes with 255 ignored, checked at start
    meta = MetadataCatalog.get("voc_2012_sem_seg_val")
    assert (len(meta.stuff_classes), meta.ignore_label, meta.evaluator_type) == (21, 255, "sem_seg")
    register_voc_sem_seg(str(tmp_path))  # already registered: left as it is
    assert MetadataCatalog.get("voc_2012_sem_seg_val").dirname == meta.dirname
    cfg = load_cfg(os.path.join(TASKS, "voc_sem_seg_R_50_FCN.yaml"))
    prepare_datasets(cfg)  # 21 = 21: no data read
    bad_cfg = load_cfg(
        os.path.join(TASKS, "voc_sem_seg_R_50_FCN.yaml"), ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "20"]
    )
    with pytest.raises(ValueError, match="set MODEL.SEM_SEG_HEAD.NUM_CLASSES 21"):
        prepare_datasets(bad_cfg)


def test_the_trainer_trains_the_scaled_schedule_and_records_it(synthetic_datasets, tmp_path):
    from detectron2.engine import default_argument_parser
    from test_train_net import TINY, VOC_CFG

    from detection.trainer import main as train_main
    from moco.utils.run_files import read_metrics

    # written for 2 processes (2 images, 2 iterations), run in 1: 1 image, 4 iterations
    out = str(tmp_path / "scaled")
    argv = ["--config-file", VOC_CFG, *TINY, "SOLVER.REFERENCE_WORLD_SIZE", "2"]
    argv += ["SOLVER.MAX_ITER", "2", "TEST.PRECISE_BN.ENABLED", "False", "OUTPUT_DIR", out]
    train_main(default_argument_parser().parse_args(argv))
    with open(os.path.join(out, "final_metrics.json")) as f:
        data = json.load(f)
    assert (data["iterations"], data["ims_per_batch"], data["world_size"]) == (4, 1, 1)
    lr = {r["iteration"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    assert max(lr) == 3  # the fourth iteration ran (0-based)
