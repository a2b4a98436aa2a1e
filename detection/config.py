"""Detection configs: Detectron2's ``get_cfg()`` + a YAML file + ``KEY VALUE`` overrides.

Adjustments made here, and why:

* :func:`add_moco_det_config` adds the toolkit's keys (``DATALOADER.MAX_BAD_FRACTION``,
  ``DATALOADER.SCAN_IMAGES``,
  ``DATALOADER.MAX_ANNOTATIONS``, ``DATALOADER.MAX_ANNOTATIONS_PER_IMAGE``,
  ``MODEL.ALLOW_PARTIAL_WEIGHTS``, ``DIST.TIMEOUT_MINUTES``, ``DATASETS.REGISTER``).
* ``MODEL.DEVICE`` becomes ``cpu`` when CUDA is unavailable, so every config runs on CPU as is.
* In a single process, ``SyncBN`` (``torch.nn.SyncBatchNorm``) becomes ``BN``: with one process it
  computes exactly batch norm, but it raises on CPU tensors whenever a process group exists, even
  of size 1. ``naiveSyncBN`` is left alone: Detectron2's ``NaiveSyncBatchNorm`` already falls back
  to plain BN when the world size is 1. State-dict keys are the same, so checkpoints are unaffected.

Importing this module registers ``Res5ROIHeadsExtraNorm`` (the paper's C4 ROI head) and
``DilatedFCNHead`` (the paper's semantic segmentation head, detection.semantic_seg).
"""

import logging
import os
import re

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup

# registers the backbone builders, the ROI head and the semantic segmentation head
from detection import backbone, roi_heads, semantic_seg  # noqa: F401
from detection.data import checks, voc_sem_seg  # noqa: F401  (registers voc_2012_sem_seg_*)
from moco.config import get_cfg as moco_defaults
from moco.data.checks import check_scan_mode, default_max_bad_fraction
from moco.utils.config_loading import check_safe_yaml, key_hint

__all__ = ["NORM_KEYS", "add_moco_det_config", "load_cfg", "setup_cfg"]

logger = logging.getLogger(__name__)

# every config key that names a normalization layer for get_norm()
NORM_KEYS = (
    ("MODEL", "RESNETS", "NORM"),
    ("MODEL", "FPN", "NORM"),
    ("MODEL", "ROI_BOX_HEAD", "NORM"),
    ("MODEL", "ROI_MASK_HEAD", "NORM"),
    ("MODEL", "SEM_SEG_HEAD", "NORM"),
    ("MODEL", "RETINANET", "NORM"),
)
_SINGLE_PROCESS_NORM = {"SyncBN": "BN", "nnSyncBN": "BN"}


def add_moco_det_config(cfg):
    """The toolkit's keys on top of Detectron2's config (as PointRend's ``add_pointrend_config``)."""
    # unreadable training images tolerated before the run stops (detection.data.checks)
    cfg.DATALOADER.MAX_BAD_FRACTION = default_max_bad_fraction()
    # the training images' start-up decode scan, as pretraining's DATA.SCAN_IMAGES: always, never,
    # or auto (up to moco.config.SCAN_AUTO_MAX_FILES files), cached per file in each image folder
    cfg.DATALOADER.SCAN_IMAGES = moco_defaults().DATA.SCAN_IMAGES
    # COCO files with more annotations (in all, or on one image) are refused at start
    # (detection.data.checks.check_coco_json): 10^6 of them exhausted a run's memory
    cfg.DATALOADER.MAX_ANNOTATIONS = checks.MAX_ANNOTATIONS
    cfg.DATALOADER.MAX_ANNOTATIONS_PER_IMAGE = checks.MAX_ANNOTATIONS_PER_IMAGE
    # Weights must load every backbone tensor, shape for shape (detection.checkpoint); True trains
    # with a partly loaded backbone anyway (an expert's choice, recorded in final_metrics.json).
    cfg.MODEL.ALLOW_PARTIAL_WEIGHTS = False
    # the process group's timeout in minutes (moco.utils.launch.process_group_timeout): pretraining's key
    # one's own detection sets, registered by name before DATASETS.TRAIN / TEST are looked up
    # (detection.data.datasets.register_datasets): [name, "coco", annotations.json, image_folder]
    # or [name, "voc", VOC_folder, split] (a fifth item: the classes, else read from the XML)
    cfg.DATASETS.REGISTER = []
    cfg.DIST = CfgNode()
    cfg.DIST.TIMEOUT_MINUTES = moco_defaults().DIST.TIMEOUT_MINUTES


def _single_process_norms(cfg):
    for path in NORM_KEYS:
        node = cfg
        for name in path[:-1]:
            node = node[name]
        old = node[path[-1]]
        if old in _SINGLE_PROCESS_NORM:
            node[path[-1]] = _SINGLE_PROCESS_NORM[old]
            logger.info("%s: %s -> %s (single process)", ".".join(path), old, node[path[-1]])


def load_cfg(config_file, opts=(), world_size=1):
    """Build a frozen config from ``config_file`` and ``opts`` (``[KEY, VALUE, ...]``).

    ``world_size`` is the number of training processes the config will run with.
    """
    if not config_file:
        raise ValueError(
            "--config-file is required (e.g. configs/detection/embedded_voc_R_18_FPN.yaml)"
        )
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file}: no such file")
    check_safe_yaml(config_file, "--config-file")
    cfg = get_cfg()
    add_moco_det_config(cfg)
    try:
        # Detectron2's default allow_unsafe=True falls back to yaml.unsafe_load, which runs
        # !!python/object/apply tags: never.
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except (KeyError, AssertionError, ValueError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # YAML errors span lines; the CLI prints one
        raise ValueError(f"{config_file}: invalid config ({reason}){key_hint(cfg, e)}") from None
    try:
        cfg.merge_from_list(list(opts or []))
    except (KeyError, AssertionError, ValueError) as e:
        raise ValueError(f"command-line overrides {list(opts)}: {e}{key_hint(cfg, e)}") from None
    check_scan_mode(cfg.DATALOADER.SCAN_IMAGES, "DATALOADER.SCAN_IMAGES")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if world_size == 1:
        _single_process_norms(cfg)
    cfg.freeze()
    return cfg


class UnusedCExtensionNote(logging.Filter):
    """Detectron2's environment dump says "detectron2._C not built correctly", which reads as a
    broken install; this toolkit never uses ``_C`` (ROIAlign and NMS come from torchvision), so
    the line says that instead."""

    _LINE = re.compile(r"(detectron2\._C\s+)not built correctly[^\n]*")

    def filter(self, record):
        if isinstance(record.msg, str) and "detectron2._C" in record.msg:
            record.msg = self._LINE.sub(
                r"\1not used (ROIAlign and NMS come from torchvision)", record.msg
            )
        return True


def setup_cfg(args):
    """``load_cfg`` from parsed ``default_argument_parser`` args, then Detectron2's ``default_setup``
    (logger, config.yaml in OUTPUT_DIR, seeding)."""
    world_size = args.num_gpus * args.num_machines
    cfg = load_cfg(args.config_file, args.opts, world_size=world_size)
    d2_logger = logging.getLogger("detectron2")
    if not any(isinstance(f, UnusedCExtensionNote) for f in d2_logger.filters):
        d2_logger.addFilter(UnusedCExtensionNote())
    default_setup(cfg, args)
    return cfg
