"""Detection transfer library on Detectron2 (see docs/DESIGN.md)."""

import moco  # noqa: F401  (first: quiets an upstream deprecation warning at Detectron2's import)

from . import roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm in ROI_HEADS_REGISTRY)
