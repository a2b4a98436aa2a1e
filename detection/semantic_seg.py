"""The MoCo paper's semantic segmentation head, in Detectron2's ``SEM_SEG_HEADS_REGISTRY``.

He et al. 2019, appendix A.5: an FCN on the R50 trunk whose conv5 3x3 convolutions have dilation 2
and stride 1 (Detectron2's ``MODEL.RESNETS.RES5_DILATION 2``: total stride 16), "followed by two
extra 3x3 convolutions of 256 channels, with BN and ReLU, and then a 1x1 convolution for per-pixel
classification", the two 3x3 convolutions with dilation 6 (DeepLab's large field of view).
:class:`DilatedFCNHead` is that head; Detectron2's ``SemanticSegmentor`` runs it on the backbone's
one output feature (``MODEL.SEM_SEG_HEAD.IN_FEATURES ["res5"]``) and ``SemSegEvaluator`` scores it
(mIoU).

Config keys are Detectron2's own: ``NUM_CLASSES``, ``CONVS_DIM`` (256), ``NORM`` (SyncBN in the
paper configs), ``IGNORE_VALUE``, ``LOSS_WEIGHT``. The paper's two convolutions and dilation 6 are
the constructor's defaults rather than new config keys: a new key would change every resolved
config, and with it the pipeline's stage keys of finished runs.
"""

import numpy as np
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.utils.file_io import PathManager
from fvcore.nn import weight_init
from PIL import Image
from torch import nn

__all__ = ["DilatedFCNHead", "load_label_png"]


def load_label_png(filename, dtype=None):
    """A label PNG as an array of class indices, for ``SemSegEvaluator(sem_seg_loading_fn=)``:
    Detectron2 0.7.2's default loader asks NumPy for ``copy=False``, which NumPy 2 refuses with a
    ValueError on every image."""
    with PathManager.open(filename, "rb") as f:
        return np.asarray(Image.open(f), dtype=dtype)


@SEM_SEG_HEADS_REGISTRY.register()
class DilatedFCNHead(nn.Module):
    """``num_convs`` 3x3 convolutions (dilation ``dilation``, norm, ReLU) and a 1x1 classifier on
    one feature map; logits upsampled bilinearly to the input (inference) or the targets (loss)."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        conv_dims: int = 256,
        num_convs: int = 2,
        dilation: int = 6,
        norm: str = "BN",
        ignore_value: int = 255,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(
                "MODEL.SEM_SEG_HEAD.IN_FEATURES: DilatedFCNHead takes one feature map (e.g. "
                f"['res5'] with MODEL.RESNETS.OUT_FEATURES ['res5']), got {sorted(input_shape)}"
            )
        ((self.in_feature, shape),) = input_shape.items()
        self.common_stride = shape.stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        layers, channels = [], shape.channels
        for i in range(num_convs):
            conv = Conv2d(
                channels,
                conv_dims,
                kernel_size=3,
                padding=dilation,
                dilation=dilation,
                bias=not norm,
                norm=get_norm(norm, conv_dims),
                activation=F.relu,
            )
            weight_init.c2_msra_fill(conv)
            self.add_module(f"conv{i + 1}", conv)
            layers.append(conv)
            channels = conv_dims
        self.convs = layers
        self.predictor = Conv2d(channels, num_classes, kernel_size=1)
        # as Detectron2's SemSegFPNHead: small logits at the start
        nn.init.normal_(self.predictor.weight, 0, 0.001)
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        missing = [k for k in head.IN_FEATURES if k not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(head.IN_FEATURES)}: the backbone gives "
                f"{sorted(input_shape)}; name one of those"
            )
        return {
            "input_shape": {k: input_shape[k] for k in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "conv_dims": head.CONVS_DIM,
            "norm": head.NORM,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
        }

    def layers(self, features):
        x = features[self.in_feature]
        for conv in self.convs:
            x = conv(x)
        return self.predictor(x)

    def forward(self, features, targets=None):
        """Training: ``(None, {"loss_sem_seg": ...})``; inference: ``(logits at the input's
        padded size, {})``, as Detectron2's ``SemanticSegmentor`` expects of a head."""
        x = self.layers(features)
        if self.training:
            return None, self.losses(x, targets)
        x = F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return x, {}

    def losses(self, predictions, targets):
        # to the targets' size: without size divisibility the stride-16 map need not tile them
        predictions = F.interpolate(
            predictions.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
        )
        loss = F.cross_entropy(
            predictions, targets, reduction="mean", ignore_index=self.ignore_value
        )
        return {"loss_sem_seg": loss * self.loss_weight}
