"""ROI heads used by the MoCo detection protocol.

``Res5ROIHeadsExtraNorm``: Detectron2's C4 ``Res5ROIHeads`` with one extra normalization layer after
the res5 stage, as in the official MoCo detection code (the paper fine-tunes with normalization in
every layer; a torchvision ResNet has no norm after its last block's residual sum). The extra layer
(``roi_heads.res5.norm``) is not in any pretrained checkpoint and starts at its default init.
"""

from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

__all__ = ["Res5ROIHeadsExtraNorm"]


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads + ``get_norm(cfg.MODEL.RESNETS.NORM, out_channels)`` appended to res5."""

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        norm = get_norm(cfg.MODEL.RESNETS.NORM, out_channels)
        if norm is None:
            raise ValueError(
                "MODEL.ROI_HEADS.NAME Res5ROIHeadsExtraNorm needs a normalization: set "
                "MODEL.RESNETS.NORM (e.g. BN, SyncBN, naiveSyncBN), or use Res5ROIHeads"
            )
        seq.add_module("norm", norm)
        return seq, out_channels
