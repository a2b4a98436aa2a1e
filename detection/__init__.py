from . import roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm in ROI_HEADS_REGISTRY)
