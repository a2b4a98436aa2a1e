"""Pretraining data: image-folder datasets and loaders (with the decoded cache and the kNN bank),\nthe start-up scan of unreadable images, MoCo's augmentations (per image and per batch), and the\nembedded synthetic set."""

from moco.utils.lazy import lazy_exports

_EXPORTS = {
    "build_pretrain_dataset": "datasets",
    "build_pretrain_loader": "datasets",
    "build_eval_loader": "datasets",
    "build_labeled_datasets": "datasets",
    "folder_checks": "datasets",
    "image_folder": "datasets",
    "validate_data": "datasets",
    "knn_bank": "datasets",
    "CheckedImageFolder": "checks",
    "ScanCache": "checks",
    "scan_images": "checks",
    "check_image": "checks",
    "check_scan_mode": "checks",
    "pretrain_transform": "augment",
    "eval_transform": "augment",
    "TwoCropsTransform": "augment",
    "moco_v1_transform": "augment",
    "moco_v2_transform": "augment",
    "BatchAugment": "batch_augment",
    "batch_source_transform": "batch_augment",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
