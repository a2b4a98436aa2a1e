"""Detection transfer library on Detectron2 (see docs/DESIGN.md)."""

import moco  # noqa: F401  (first: quiets an upstream deprecation warning at Detectron2's import)
from detection import backbone, roi_heads, semantic_seg  # noqa: F401  (registers builders, heads)
