"""MoCo v1/v2 pretraining library (see docs/DESIGN.md)."""

import warnings

# fvcore (imported by Detectron2) calls torch.jit.script at import, which torch >= 2.9 reports as
# deprecated on every command's stderr; keep stderr for the toolkit's own errors.
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)
