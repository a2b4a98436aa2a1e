"""Paper and embedded detection configs: they load, follow the MoCo protocol, and build their models."""

import glob
import json
import os

import pytest
import torch
from conftest import REPO
from detectron2.engine import default_argument_parser
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import build_model

from detection.config import load_cfg
from detection.roi_heads import Res5ROIHeadsExtraNorm

ROOT = REPO
CONFIGS = os.path.join(ROOT, "configs", "detection")
ALL = sorted(
    p
    for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))
    if not os.path.basename(p).startswith("Base-")
)
PAPER = [p for p in ALL if not os.path.basename(p).startswith("embedded_")]
MOCO = [p for p in PAPER if p.endswith("_moco.yaml")]
IMAGENET_RGB = ([123.675, 116.280, 103.530], [58.395, 57.120, 57.375])
# issue 24's normalization variants of embedded_voc_R_18w16_FPN ("" = the base config itself):
# the norm layer type of the backbone, the FPN and the box head (None: none), box head convs
NORM_VARIANTS = {
    "": ("BatchNorm2d", "BatchNorm2d", None, 0),
    "frozen_bn": ("FrozenBatchNorm2d", None, None, 0),
    "bn_backbone": ("BatchNorm2d", None, None, 0),
    "bn_backbone_lr0.02": ("BatchNorm2d", None, None, 0),  # the demo's detector since 2026-12-06
    "4conv1fc": ("BatchNorm2d", "BatchNorm2d", None, 4),
    "bn_heads": ("BatchNorm2d", "BatchNorm2d", "BatchNorm2d", 4),
    "gn_heads": ("BatchNorm2d", "BatchNorm2d", "GroupNorm", 4),
}


def _name(path):
    return os.path.basename(path)[: -len(".yaml")]


def test_config_set_is_complete():
    names = {_name(p) for p in ALL}
    expected = {
        "pascal_voc_R_50_C4_24k",
        "coco_R_50_C4_1x",
        "coco_R_50_C4_2x",
        "coco_R_50_FPN_1x",
        "coco_R_50_FPN_2x",
    }
    expected |= {n + "_moco" for n in expected}
    expected |= {"embedded_voc_R_18_FPN", "embedded_voc_R_18w16_FPN", "embedded_coco_R_18_FPN_mask"}
    expected |= {"embedded_voc_R_18w16_FPN_cmc"}  # CMC's weights: the Lab backbone
    expected |= {f"embedded_voc_R_18w16_FPN_{v}" for v in NORM_VARIANTS if v}  # issue 24
    assert names == expected


@pytest.mark.parametrize("path", ALL, ids=_name)
def test_config_loads_and_builds_model_on_cpu(path):
    cfg = load_cfg(path, ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert next(model.parameters()).device.type == "cpu"
    n_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert model.roi_heads.box_predictor.cls_score.out_features == n_classes + 1
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0  # every layer fine-tuned
    assert cfg.TEST.PRECISE_BN.ENABLED
    if "_C4_" in path:
        assert isinstance(model.roi_heads, Res5ROIHeadsExtraNorm)
        norm = model.roi_heads.res5.norm
        assert isinstance(norm, NaiveSyncBatchNorm) and norm.num_features == 2048
        assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    elif not any(_name(path).endswith("_FPN_" + v) for v in NORM_VARIANTS if v):
        # SyncBN in one process is plain BN; heads stay unnormalized
        norms = {
            type(m).__name__
            for m in model.backbone.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        }
        assert norms == {"BatchNorm2d"}
        assert cfg.MODEL.ROI_BOX_HEAD.NORM == "" and cfg.MODEL.ROI_MASK_HEAD.NORM == ""
    assert hasattr(model.roi_heads, "mask_head") == cfg.MODEL.MASK_ON


@pytest.mark.parametrize("path", PAPER, ids=_name)
def test_paper_protocol(path):
    cfg = load_cfg(path, world_size=8)
    name = _name(path)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.02)
    assert cfg.MODEL.RESNETS.DEPTH == 50
    if name.startswith("pascal_voc"):
        assert cfg.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
        assert cfg.DATASETS.TEST == ("voc_2007_test",) and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS) == (
            24000,
            (18000, 22000),
            100,
        )
        assert (
            cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(480, 801, 32))
            and cfg.INPUT.MIN_SIZE_TEST == 800
        )
        assert not cfg.MODEL.MASK_ON
    else:
        assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == (
            "coco_2017_val",
        )
        assert cfg.MODEL.MASK_ON and cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(640, 801, 32))
        schedule = {"1x": (90000, (60000, 80000)), "2x": (180000, (120000, 160000))}
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == schedule["2x" if "_2x" in name else "1x"]
    if "_C4_" in name:
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
        assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    else:
        assert cfg.MODEL.RESNETS.NORM == "SyncBN" and cfg.MODEL.FPN.NORM == "SyncBN"
    if name.endswith("_moco"):
        assert (list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)) == IMAGENET_RGB
        assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
        assert cfg.MODEL.WEIGHTS == ""  # given on the command line
        supervised = load_cfg(path.replace("_moco.yaml", ".yaml"), world_size=8)
        differing = {
            k for k in ("MODEL", "INPUT", "SOLVER", "DATASETS", "TEST") if cfg[k] != supervised[k]
        }
        assert differing == {"MODEL", "INPUT"}
    else:
        assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
        assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is True


@pytest.mark.parametrize(
    "name, width",
    [
        ("embedded_voc_R_18_FPN", 64),
        ("embedded_voc_R_18w16_FPN", 16),
        ("embedded_coco_R_18_FPN_mask", 64),
    ],
)
def test_embedded_configs_fit_the_synthetic_set(name, width, synthetic_datasets):
    from detectron2.data import MetadataCatalog

    cfg = load_cfg(os.path.join(CONFIGS, name + ".yaml"))
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == width
    assert (
        cfg.INPUT.FORMAT == "RGB"
        and (list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)) == IMAGENET_RGB
    )
    assert cfg.TEST.EVAL_PERIOD == 0 and cfg.SEED >= 0 and cfg.SOLVER.MAX_ITER <= 1000
    for dataset in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        assert dataset in synthetic_datasets
        assert len(MetadataCatalog.get(dataset).thing_classes) == cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert cfg.MODEL.MASK_ON == ("coco" in name)


def test_syncbn_becomes_bn_only_in_a_single_process():
    path = os.path.join(CONFIGS, "coco_R_50_FPN_1x.yaml")
    single, multi = load_cfg(path, world_size=1), load_cfg(path, world_size=8)
    assert (single.MODEL.RESNETS.NORM, single.MODEL.FPN.NORM) == ("BN", "BN")
    assert (multi.MODEL.RESNETS.NORM, multi.MODEL.FPN.NORM) == ("SyncBN", "SyncBN")
    # naiveSyncBN is kept: Detectron2's NaiveSyncBatchNorm is BN at world size 1 (checked below)
    c4 = load_cfg(os.path.join(CONFIGS, "coco_R_50_C4_1x.yaml"), world_size=1)
    assert c4.MODEL.RESNETS.NORM == "naiveSyncBN"
    torch.manual_seed(0)
    naive, bn = NaiveSyncBatchNorm(8), torch.nn.BatchNorm2d(8)
    x = torch.randn(4, 8, 5, 5) * 3 + 1
    assert torch.allclose(naive.train()(x), bn.train()(x), atol=1e-6)
    assert torch.allclose(naive.running_var, bn.running_var)


def test_device_falls_back_to_cpu_without_cuda():
    cfg = load_cfg(os.path.join(CONFIGS, "embedded_voc_R_18_FPN.yaml"), ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_config_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_cfg(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="--config-file is required"):
        load_cfg("")
    path = os.path.join(CONFIGS, "embedded_voc_R_18_FPN.yaml")
    with pytest.raises(ValueError, match="MODEL.NOT_A_KEY"):
        load_cfg(path, ["MODEL.NOT_A_KEY", "1"])
    with pytest.raises(ValueError, match="overrides"):
        load_cfg(path, ["SOLVER.MAX_ITER"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("MODEL:\n  ROI_HEADS: [\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: invalid config \([^\n]*\)$"):
        load_cfg(str(broken))


def test_extra_norm_head_needs_a_norm():
    cfg = load_cfg(
        os.path.join(CONFIGS, "pascal_voc_R_50_C4_24k_moco.yaml"), ["MODEL.RESNETS.NORM", ""]
    )
    with pytest.raises(ValueError, match="MODEL.RESNETS.NORM"):
        build_model(cfg)


def test_the_environment_dump_says_c_is_unused_not_broken():
    import logging

    from detection.config import UnusedCExtensionNote

    record = logging.LogRecord(
        "detectron2",
        logging.INFO,
        __file__,
        1,
        "Environment info:\n"
        "detectron2._C                    not built correctly: No module "
        "named 'detectron2._C'\nnext line",
        None,
        None,
    )
    assert UnusedCExtensionNote().filter(record)
    assert record.getMessage() == (
        "Environment info:\ndetectron2._C                    not used "
        "(ROIAlign and NMS come from torchvision)\nnext line"
    )


def _norm_of(conv):
    """The type name of a Detectron2 Conv2d's norm layer, None when it has none."""
    return type(conv.norm).__name__ if conv.norm is not None else None


@pytest.mark.parametrize("variant", list(NORM_VARIANTS), ids=lambda v: v or "base")
def test_norm_variants_build_their_norm_layers_and_train(
    variant, synthetic_datasets, tmp_path, one_thread
):
    """Issue 24: each normalization variant of the embedded fine-tune builds the norm layers its
    name says (backbone, FPN, box head), and trains 2 iterations at tiny size; a frozen-BN
    backbone keeps its statistics, a trainable one updates them."""
    from test_train_net import TINY

    from detection.trainer import main as train_main

    name = "embedded_voc_R_18w16_FPN" + (f"_{variant}" if variant else "")
    path = os.path.join(CONFIGS, name + ".yaml")
    backbone_norm, fpn_norm, head_norm, convs = NORM_VARIANTS[variant]
    cfg = load_cfg(path, ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0  # every conv fine-tuned, whatever the norm
    model = build_model(cfg)
    bottom_up = {
        type(m).__name__ for m in model.backbone.bottom_up.modules() if "Norm" in type(m).__name__
    }
    assert bottom_up == {backbone_norm}
    fpn = [m for n, m in model.backbone.named_children() if n.startswith("fpn_")]
    assert len(fpn) == 8 and {_norm_of(m) for m in fpn} == {fpn_norm}
    head = model.roi_heads.box_head
    assert len(head.conv_norm_relus) == convs
    assert {_norm_of(m) for m in head.conv_norm_relus} <= {head_norm}
    assert len(head.fcs) == (1 if convs else 2)

    out = tmp_path / "run"
    argv = ["--config-file", path, *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)]
    train_main(default_argument_parser().parse_args(argv))
    with open(out / "final_metrics.json") as f:
        final = json.load(f)
    assert final["iterations"] == 2 and set(final["metrics"]["bbox"]) == {"AP", "AP50", "AP75"}
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    mean = state["backbone.bottom_up.stem.conv1.norm.running_mean"]
    # random init: FrozenBN's statistics stay (0, 1); BN's move with the data
    assert torch.equal(mean, torch.zeros_like(mean)) == (backbone_norm == "FrozenBatchNorm2d")
