"""Evaluation of a pretrained backbone: the weighted kNN monitor and linear classification."""

from moco.utils.lazy import lazy_exports

_EXPORTS = {
    "knn_evaluate": "knn",
    "validate_knn": "knn",
    "run_lincls": "lincls",
    "LinclsOptions": "lincls",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
