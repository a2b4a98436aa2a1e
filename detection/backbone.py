"""``build_basic_resnet_fpn_backbone``: a BasicBlock ResNet (R18/R34) of any base width, with FPN.

Detectron2's ``build_resnet_backbone`` asserts ``RES2_OUT_CHANNELS == 64`` for R18/R34, so the
narrow encoders of ``moco.modeling.resnet`` (``resnet18_w32`` ...) need their own builder. This one is
Detectron2's own parts (``BasicStem``, ``ResNet.make_stage`` with ``BasicBlock``, ``FPN``) at
width ``MODEL.RESNETS.RES2_OUT_CHANNELS``: the stem has that many channels (as torchvision's
narrow ResNet) and stage i has width x 2**(i-2). Module names are Detectron2's (``stem.conv1``,
``res2.0.conv1`` ...), so weights converted by ``tools/convert_to_d2.py`` load unchanged.

``build_lab_resnet_fpn_backbone`` is the backbone of CMC's weights (moco.modeling.cmc): the detector's
RGB input is converted to Lab (moco.modeling.lab) and split into L and ab, the L ResNet runs on L and the
ab ResNet on ab, each at half of ``RES2_OUT_CHANNELS`` with a 1- or 2-channel stem, and each
stage's two outputs are concatenated, so the FPN sees the channels of the full-width network (the
paper's evaluation concatenates the two views' features). Module names are ``l.stem.conv1`` ...,
``ab.res5.1.conv2`` ..., as the converter writes a CMC checkpoint.

``MODEL.RESNETS.RES5_DILATION 2`` works here as Detectron2 allows it for bottleneck ResNets (its
own builder asserts 1 for R18/R34): res5's first block has stride 1 and every 3x3 convolution in
res5 dilation 2 (:class:`DilatedBasicBlock`; a BasicBlock's two convolutions are both 3x3, and the
MoCo paper's FCN dilates "the 3x3 convolutions in conv5 blocks"), so res5 has stride 16, not 32.
The weights' names and shapes do not change: converted weights load as they are.

Importing this module registers the builders in ``BACKBONE_REGISTRY`` (``MODEL.BACKBONE.NAME``):
``build_basic_resnet_fpn_backbone`` / ``build_lab_resnet_fpn_backbone`` (with FPN) and
``build_basic_resnet_backbone`` / ``build_lab_resnet_backbone`` (the bare ResNet, e.g. under the
dilated FCN of detection.semantic_seg).
"""

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

from moco.modeling.lab import LabSplit

__all__ = [
    "DilatedBasicBlock",
    "LabResNet",
    "build_basic_resnet",
    "build_basic_resnet_backbone",
    "build_basic_resnet_fpn_backbone",
    "build_lab_resnet_backbone",
    "build_lab_resnet_fpn_backbone",
]

_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class DilatedBasicBlock(BasicBlock):
    """Detectron2's ``BasicBlock`` with both 3x3 convolutions dilated by ``dilation`` (padding
    equal to it, so the spatial size is kept); same parameters, so the same state-dict keys."""

    def __init__(self, in_channels, out_channels, *, stride=1, dilation=1, norm="BN"):
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        for conv in (self.conv1, self.conv2):
            conv.dilation = conv.padding = (dilation, dilation)


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
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(
            f"MODEL.RESNETS.RES5_DILATION {r.RES5_DILATION}: 1, or 2 (res5 at stride 16, "
            "as Detectron2 allows for its ResNets)"
        )
    stem = BasicStem(input_shape.channels, width, norm=r.NORM)
    stages, in_channels = [], width
    for i, depth in enumerate(_BLOCKS[r.DEPTH]):
        out_channels = width * 2**i
        stride = 1 if i == 0 else 2
        block, extra = BasicBlock, {}
        if i == 3 and r.RES5_DILATION == 2:  # Detectron2's rule for res5: stride 1, dilation 2
            stride, block, extra = 1, DilatedBasicBlock, {"dilation": 2}
        stages.append(
            ResNet.make_stage(
                block,
                depth,
                in_channels=in_channels,
                out_channels=out_channels,
                stride_per_block=[stride] + [1] * (depth - 1),
                norm=r.NORM,
                **extra,
            )
        )
        in_channels = out_channels
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


class LabResNet(Backbone):
    """Detectron2's normalised input -> L and ab -> two half-width ResNets (``l``, ``ab``) ->
    each feature map the concatenation of the two views' (L channels first)."""

    def __init__(self, cfg):
        super().__init__()
        r = cfg.MODEL.RESNETS
        if r.RES2_OUT_CHANNELS % 2 or r.STEM_OUT_CHANNELS % 2:
            raise ValueError(
                f"build_lab_resnet_fpn_backbone: MODEL.RESNETS.RES2_OUT_CHANNELS "
                f"{r.RES2_OUT_CHANNELS} is split between the L and ab views, so it "
                "must be even"
            )
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(
                f"build_lab_resnet_fpn_backbone: INPUT.FORMAT {cfg.INPUT.FORMAT} "
                "must be RGB or BGR (the input is converted to Lab)"
            )
        half = cfg.clone()
        half.defrost()
        half.MODEL.RESNETS.RES2_OUT_CHANNELS = r.RES2_OUT_CHANNELS // 2
        half.MODEL.RESNETS.STEM_OUT_CHANNELS = r.STEM_OUT_CHANNELS // 2
        self.l = build_basic_resnet(half, ShapeSpec(channels=1))
        self.ab = build_basic_resnet(half, ShapeSpec(channels=2))
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        mean, std = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD)
        if self.bgr:
            mean, std = mean[::-1], std[::-1]
        # the model feeds (x - PIXEL_MEAN) / PIXEL_STD of 0-255 pixels: LabSplit undoes it to [0, 1]
        self.lab = LabSplit([m / 255.0 for m in mean], [s / 255.0 for s in std])

    def forward(self, x):
        l_view, ab_view = self.lab(x.flip(1) if self.bgr else x)
        l_out, ab_out = self.l(l_view), self.ab(ab_view)
        return {name: torch.cat([l_out[name], ab_out[name]], dim=1) for name in l_out}

    def output_shape(self):
        return {
            name: ShapeSpec(channels=2 * s.channels, stride=s.stride)
            for name, s in self.l.output_shape().items()
        }


def _fpn(cfg, bottom_up):
    fpn = cfg.MODEL.FPN
    return FPN(
        bottom_up=bottom_up,
        in_features=fpn.IN_FEATURES,
        out_channels=fpn.OUT_CHANNELS,
        norm=fpn.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=fpn.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    return _fpn(cfg, build_basic_resnet(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_lab_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    return _fpn(cfg, LabResNet(cfg))


@BACKBONE_REGISTRY.register()
def build_basic_resnet_backbone(cfg, input_shape: ShapeSpec):
    return build_basic_resnet(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_lab_resnet_backbone(cfg, input_shape: ShapeSpec):
    return LabResNet(cfg)
