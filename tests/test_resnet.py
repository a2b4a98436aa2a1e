"""Narrow ResNets (moco.modeling.resnet): torchvision's layout at another base width, end to end into Detectron2."""

import os

import pytest
import torch
import torchvision
from conftest import REPO, load_tool
from detectron2.modeling import build_model

from detection.checkpoint import SafeDetectionCheckpointer
from detection.config import load_cfg
from detection.convert import rename_key
from moco.modeling.moco import MoCo
from moco.modeling.resnet import parse_arch, resnet_encoder
from moco.utils.file_io import atomic_save

CONFIG = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18w16_FPN.yaml")


def test_names_resolve_to_torchvision_or_a_width():
    assert resnet_encoder("resnet18") is torchvision.models.resnet18
    assert parse_arch("resnet18_w32") == ("resnet18", 32)
    assert parse_arch("resnet50_w16") == ("resnet50", 16)
    for bad in ("resnet18_w", "resnet18_w0", "vgg16_w32", "resnext50_32x4d_w16", "resnet18w32"):
        with pytest.raises(ValueError, match="resnet18_w32|resnet18..resnet152"):
            parse_arch(bad)


@pytest.mark.parametrize(
    "arch, block_channels",
    [("resnet18_w16", [16, 32, 64, 128]), ("resnet50_w8", [32, 64, 128, 256])],
)
def test_narrow_encoder_keeps_torchvision_keys_with_scaled_shapes(arch, block_channels):
    base, width = parse_arch(arch)
    narrow = resnet_encoder(arch)(num_classes=10)
    standard = getattr(torchvision.models, base)(num_classes=10)
    assert list(narrow.state_dict()) == list(standard.state_dict())  # same keys, same order
    assert narrow.conv1.weight.shape == (width, 3, 7, 7)
    for i, channels in enumerate(block_channels):  # each stage's output channels
        assert getattr(narrow, f"layer{i + 1}")[-1].conv1.weight.shape[1] == channels
    assert narrow.fc.in_features == block_channels[-1]
    out = narrow(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_narrow_moco_checkpoint_converts_loads_safely_and_runs_identically(tmp_path, capsys):
    torch.manual_seed(0)
    model = MoCo(resnet_encoder("resnet18_w16"), dim=16, K=32, mlp=True, shuffle_bn="off")
    with torch.no_grad():  # non-default BN statistics, so a skipped buffer would show
        for t in model.encoder_q.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1).abs_()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    src = tmp_path / "checkpoint_0001.pth.tar"
    atomic_save({"epoch": 1, "arch": "resnet18_w16", "state_dict": state}, str(src))
    dst = tmp_path / "w16.pkl"
    assert load_tool("convert_to_d2").main([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "ResNet-18, base width 16" in out and "build_basic_resnet_fpn_backbone" in out

    cfg = load_cfg(CONFIG, ["MODEL.WEIGHTS", str(dst)])
    detector = build_model(cfg)
    SafeDetectionCheckpointer(detector).load(cfg.MODEL.WEIGHTS)
    target = detector.backbone.bottom_up.state_dict()
    source = {k: v for k, v in model.encoder_q.state_dict().items() if not k.startswith("fc.")}
    assert len(source) == len(target) == 120
    for key, value in source.items():
        assert torch.equal(target[rename_key(key)], value), key
    detector.eval()
    encoder = model.encoder_q.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        res5 = detector.backbone.bottom_up(x)["res5"]
        trunk = torch.nn.Sequential(
            encoder.conv1,
            encoder.bn1,
            encoder.relu,
            encoder.maxpool,
            encoder.layer1,
            encoder.layer2,
            encoder.layer3,
            encoder.layer4,
        )
        assert torch.allclose(res5, trunk(x), atol=1e-5)


def test_basic_backbone_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="DEPTH 50"):
        build_model(load_cfg(CONFIG, ["MODEL.RESNETS.DEPTH", "50"]))
    with pytest.raises(ValueError, match="STEM_OUT_CHANNELS 64 != RES2_OUT_CHANNELS 16"):
        build_model(load_cfg(CONFIG, ["MODEL.RESNETS.STEM_OUT_CHANNELS", "64"]))
