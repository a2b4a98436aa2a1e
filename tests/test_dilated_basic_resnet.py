"""MODEL.RESNETS.RES5_DILATION 2 on the BasicBlock ResNet (detection.backbone): res5 keeps stride
16 with its 3x3 convolutions dilated, as Detectron2 builds it for bottleneck ResNets, and converted
weights load into it unchanged (same keys and shapes)."""

import os

import pytest
import torch
from conftest import REPO
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from test_convert import _randomized

from detection.backbone import DilatedBasicBlock
from detection.checkpoint import SafeDetectionCheckpointer
from detection.config import load_cfg
from detection.convert import convert_state_dict, rename_key, save_d2_weights
from moco.modeling.resnet import resnet_encoder

CONFIG = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18w16_FPN.yaml")
BARE = ["MODEL.BACKBONE.NAME", "build_basic_resnet_backbone"]
OUT = ["MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']"]


def _backbone(*opts, name="build_basic_resnet_backbone"):
    cfg = load_cfg(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", name, *OUT, *opts])
    return BACKBONE_REGISTRY.get(name)(cfg, ShapeSpec(channels=3)).eval()


@pytest.mark.parametrize("name", ["build_basic_resnet_backbone", "build_lab_resnet_backbone"])
def test_res5_dilation_2_gives_stride_16_and_dilated_3x3_convs(name):
    plain = _backbone(name=name)
    dilated = _backbone("MODEL.RESNETS.RES5_DILATION", "2", name=name)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = plain(x), dilated(x)
    shapes = {k: s.stride for k, s in plain.output_shape().items()}
    assert shapes == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert {k: s.stride for k, s in dilated.output_shape().items()} == dict(shapes, res5=16)
    assert a["res5"].shape == (1, 128, 2, 3) and b["res5"].shape == (1, 128, 4, 6)
    for k in ("res2", "res3", "res4"):  # only res5 changes
        assert a[k].shape == b[k].shape
    nets = [dilated.l, dilated.ab] if hasattr(dilated, "l") else [dilated]
    for net in nets:
        blocks = list(net.res5)
        assert all(isinstance(blk, DilatedBasicBlock) for blk in blocks)
        assert [blk.stride for blk in blocks] == [1, 1]
        convs = [c for blk in blocks for c in (blk.conv1, blk.conv2)]
        assert {(c.stride, c.dilation, c.padding) for c in convs} == {((1, 1), (2, 2), (2, 2))}
        assert blocks[0].shortcut.stride == (1, 1)  # the projection keeps the size too
        assert not any(isinstance(b, DilatedBasicBlock) for b in net.res4)


def test_converted_weights_load_into_the_dilated_resnet_with_the_same_keys(tmp_path):
    encoder = _randomized(resnet_encoder("resnet18_w16")(), seed=3)
    model, _ = convert_state_dict(encoder.state_dict())
    path = str(tmp_path / "w16.pkl")
    save_d2_weights(model, path)
    plain = _backbone()
    dilated = _backbone("MODEL.RESNETS.RES5_DILATION", "2")
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in dilated.state_dict().items()
    }

    class Holder(torch.nn.Module):  # the detector's layout: the ResNet under "backbone"
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

    holder = Holder(dilated)
    checkpointer = SafeDetectionCheckpointer(holder)
    checkpointer.load(path)
    load = checkpointer.weights_load
    assert load["matched"] == load["backbone_tensors"] > 0
    target = dilated.state_dict()
    for key, value in encoder.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(target[rename_key(key)], value), key


@pytest.mark.parametrize("dilation", ["3", "0"])
def test_other_dilations_are_one_line(dilation):
    with pytest.raises(ValueError, match=f"MODEL.RESNETS.RES5_DILATION {dilation}: 1, or 2") as e:
        _backbone("MODEL.RESNETS.RES5_DILATION", dilation)
    assert "\n" not in str(e.value)
