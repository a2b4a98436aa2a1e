"""``build_basic_resnet_fpn_backbone``: a BasicBlock ResNet (R18/R34) of any base width, with FPN.

Detectron2's ``build_resnet_backbone`` asserts ``RES2_OUT_CHANNELS == 64`` for R18/R34, so the
narrow encoders of ``moco.resnet`` (``resnet18_w32`` ...) need their own builder. This one is
Detectron2's own parts (``BasicStem``, ``ResNet.make_stage`` with ``BasicBlock``, ``FPN``) at
width ``MODEL.RESNETS.RES2_OUT_CHANNELS``: the stem has that many channels (as torchvision's
narrow ResNet) and stage i has width x 2**(i-2). Module names are Detectron2's (``stem.conv1``,
``res2.0.conv1`` ...), so weights converted by ``tools/convert_to_d2.py`` load unchanged.

Importing this module registers the builder in ``BACKBONE_REGISTRY``
(``MODEL.BACKBONE.NAME: build_basic_resnet_fpn_backbone``).
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

__all__ = ["build_basic_resnet_fpn_backbone", "build_basic_resnet"]

_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def build_basic_resnet(cfg, input_shape: ShapeSpec):
    """The bottom-up ResNet: BasicBlocks at base width ``MODEL.RESNETS.RES2_OUT_CHANNELS``."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH {r.DEPTH}: build_basic_resnet_fpn_backbone builds BasicBlock "
            f"ResNets ({', '.join(map(str, _BLOCKS))}); use build_resnet_fpn_backbone for 50 and up"
        )
    width = r.RES2_OUT_CHANNELS
    if r.STEM_OUT_CHANNELS != width:
        raise ValueError(
            f"MODEL.RESNETS.STEM_OUT_CHANNELS {r.STEM_OUT_CHANNELS} != RES2_OUT_CHANNELS {width}: "
            "a torchvision-layout ResNet of base width W has a W-channel stem; set both to W"
        )
    stem = BasicStem(input_shape.channels, width, norm=r.NORM)
    stages, in_channels = [], width
    for i, depth in enumerate(_BLOCKS[r.DEPTH]):
        out_channels = width * 2**i
        stride = 1 if i == 0 else 2
        stages.append(ResNet.make_stage(
            BasicBlock, depth, in_channels=in_channels, out_channels=out_channels,
            stride_per_block=[stride] + [1] * (depth - 1), norm=r.NORM,
        ))  # fmt: skip
        in_channels = out_channels
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    fpn = cfg.MODEL.FPN
    return FPN(
        bottom_up=build_basic_resnet(cfg, input_shape),
        in_features=fpn.IN_FEATURES,
        out_channels=fpn.OUT_CHANNELS,
        norm=fpn.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=fpn.FUSE_TYPE,
    )
