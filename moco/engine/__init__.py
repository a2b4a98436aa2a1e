"""Pretraining on Detectron2's trainer: the trainer (a loop plus hooks), its hooks (checkpoints,\nkNN monitor), the supervised baseline, and the launch of a trainer in every process."""

from moco.utils.lazy import lazy_exports

_EXPORTS = {
    "PretrainTrainer": "trainer",
    "validate_cfg": "trainer",
    "EpochCheckpointer": "hooks",
    "KNNMonitor": "hooks",
    "build_epoch_hooks": "hooks",
    "SupervisedTrainer": "supervised",
    "launch_training": "launch",
    "train_worker": "launch",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
