"""Every MoCo pretraining default in one place: ``get_cfg()`` returns an fvcore ``CfgNode``.

Defaults are the MoCo v1 paper's (ResNet-50, dim 128, K 65536, m 0.999, T 0.07, SGD lr 0.03 for a
global batch of 256, momentum 0.9, wd 1e-4, 200 epochs, lr x0.1 at epochs 120 and 160). YAML files
under ``configs/pretrain/`` override them (``_BASE_`` inheritance), the official ``main_moco.py``
flags override the YAML (:func:`apply_official_args`) and trailing ``KEY VALUE`` pairs come last.

Conventions: ``SOLVER.IMS_PER_BATCH`` is the *global* batch (all processes) and
``DATALOADER.NUM_WORKERS`` is per process, as in Detectron2; epochs count the schedule.
"""

import math

from fvcore.common.config import CfgNode as CN

from moco.utils.config_loading import load_config


def get_cfg():
    """A fresh copy of the defaults."""
    return _C.clone()


_C = CN()


_C.VERSION = 1


_C.MODEL = CN()


_C.MODEL.ARCH = "resnet50"  # a torchvision ResNet name, or one at base width W: resnet18_w32 (moco.modeling.resnet)


_C.MODEL.DIM = 128  # feature dimension of the contrastive head


_C.MODEL.K = 65536  # queue size; must be a multiple of SOLVER.IMS_PER_BATCH


_C.MODEL.M = 0.999  # key encoder momentum


_C.MODEL.T = 0.07  # softmax temperature


_C.MODEL.MLP = False  # MoCo v2 2-layer MLP head (the official --mlp: MODEL.HEAD "mlp")


# Contrastive mechanism (moco.modeling.build): "moco" (momentum encoder + queue), "end_to_end" (keys of
# the global batch, one encoder with gradients; MODEL.K unused), "memory_bank" (InstDisc; MODEL.K
# negatives sampled from a bank of one feature per training image), "cmc" (L and ab views of Lab),
# "cpc" (CPC v2: patches predicted by a masked-convolution context network).
_C.MODEL.MECHANISM = "moco"


_C.MODEL.LOSS = "info_nce"  # or "nt_xent" (SimCLR, symmetric; end_to_end only)


_C.MODEL.HEAD = "linear"  # projection head (moco.modeling.heads): "linear", "mlp", "simclr_v2"


_C.MODEL.MEMORY_BANK_MOMENTUM = 0.5  # InstDisc's bank entry update


# "cmc" (moco.modeling.cmc): each view's dictionary, "memory_bank" (the paper; MODEL.K negatives drawn) or
# "moco" (momentum encoders, queues of MODEL.K keys)
_C.MODEL.CMC_DICTIONARY = "memory_bank"


# "cpc" (moco.modeling.cpc): patches of this many pixels (stride half a patch) tile INPUT.CROP_SIZE; the
# context network predicts the patch embeddings 1 .. CPC_STEPS rows below
_C.MODEL.CPC_PATCH_SIZE = 16


_C.MODEL.CPC_STEPS = 2


# Shuffle BN: "auto" (ddp when world size > 1, else split), "ddp", "split", "sync", "off".
_C.MODEL.SHUFFLE_BN = "auto"


_C.MODEL.SPLIT_BN_GROUPS = 8  # sub-batches of "split" (MoCo CIFAR demo: 8)


# "auto": this process's GPU if CUDA is available, else CPU; or "cpu", "cuda", "cuda:N".
_C.MODEL.DEVICE = "auto"


# Fast path (moco.fast): channels_last memory format of the image batches and encoders
_C.MODEL.CHANNELS_LAST = False


_C.INPUT = CN()


_C.INPUT.AUG_PLUS = False  # MoCo v2 augmentation (blur, jitter p=0.8)
# aug+'s Gaussian blur: applied with probability BLUR_PROB, sigma drawn from BLUR_SIGMA (min, max)
# in pixels of the crop; v2's 0.5 and (0.1, 2.0) were set for 224-px crops
_C.INPUT.BLUR_PROB = 0.5
_C.INPUT.BLUR_SIGMA = (0.1, 2.0)


_C.INPUT.CROP_SIZE = 224


_C.INPUT.MIN_SCALE = 0.2  # smallest RandomResizedCrop area fraction (official 0.2)


# Same transforms, parameters and random draws with OpenCV hue/blur and a reduced-scale JPEG
# decode (moco.data.augment, fast=True); False = torchvision's PIL implementations as official.
_C.INPUT.FAST_AUGMENT = True


# Augment whole batches in the training process (moco.data.batch_augment): the loader only decodes each
# image to a BATCH_AUGMENT_SIZE square (0 = 1.5 x CROP_SIZE); same v1/v2 augmentation, per-sample
# draws. Measured on 2 cores it frees the loader's core (docs/RESULTS.md).
_C.INPUT.BATCH_AUGMENT = False


_C.INPUT.BATCH_AUGMENT_SIZE = 0


_C.DATA = CN()


# Folder with train/<class>/ images (ImageFolder). "$DETECTRON2_DATASETS" expands with the
# default "datasets" (see moco.data.datasets.resolve_data_path).
_C.DATA.ROOT = ""


# Unreadable image files (corrupt, truncated, empty, not an image) are found by a decode scan at
# start (DATA.SCAN_IMAGES) and skipped with a warning (moco.data.checks); more than this fraction
# of a folder stops the run with an error.
_C.DATA.MAX_BAD_FRACTION = 0.01


# images with more pixels are skipped and counted like unreadable ones (moco.data.checks); PIL's
# own limit (only a warning up to twice it) let 177-MP images through at ~1.4 GB each
_C.DATA.MAX_IMAGE_PIXELS = 89478485


# The start-up decode scan (moco.data.checks): "always", "never", or "auto" = a full scan of a folder
# of up to SCAN_AUTO_MAX_FILES files. Results are cached per file (path, size, mtime), so a later
# start decodes only new or changed files. Without the scan an unreadable file is replaced by the
# next image and counted when loaded, and DATA.MAX_BAD_FRACTION is not enforced.
_C.DATA.SCAN_IMAGES = "auto"


# INPUT.BATCH_AUGMENT only: decode every training image once, at start, into one uint8 tensor in
# each process (N x 3 x BATCH_AUGMENT_SIZE^2 bytes: 138 MB for the embedded 20,000 48-px images);
# the steps then index it and no loader worker decodes an image per epoch. For small folders.
_C.DATA.CACHE_DECODED = False


# auto's bound: a cold scan of 50,000 files costs 61-90 CPU-s at ImageNet's JPEG sizes (1.22 ms a
# file measured, 1.8 ms in issue #16), once; a warm start ~12 us a file. So ImageNet val and the
# embedded sets are scanned, ImageNet train (1.28M files: 26-38 CPU-min cold) is not
# (docs/RESULTS.md, 2026-12-03).
SCAN_AUTO_MAX_FILES = 50_000


_C.DATALOADER = CN()


_C.DATALOADER.NUM_WORKERS = 4  # per process (official -j 32 per 8-GPU node)


_C.SOLVER = CN()


_C.SOLVER.IMS_PER_BATCH = 256  # global batch


_C.SOLVER.BASE_LR = 0.03  # for the global batch above; not rescaled automatically (as official)


_C.SOLVER.MOMENTUM = 0.9


_C.SOLVER.WEIGHT_DECAY = 1e-4


_C.SOLVER.EPOCHS = 200


_C.SOLVER.START_EPOCH = 0  # first epoch of a run that does not resume (official --start-epoch)


_C.SOLVER.STEPS = (120, 160)  # epochs where lr is multiplied by GAMMA (ignored with COS)


_C.SOLVER.GAMMA = 0.1


_C.SOLVER.COS = False  # lr * 0.5 * (1 + cos(pi * epoch / EPOCHS)), per epoch


_C.SOLVER.CHECKPOINT_PERIOD = 1  # epochs; the last epoch is always saved


# bfloat16 autocast for the encoders (no loss scaling needed; logits stay fp32). A gain on CUDA and
# on CPUs with native bf16; much slower on CPUs without it (moco.fast).
_C.SOLVER.AMP = False


_C.SOLVER.FUSED_SGD = True  # torch's fused SGD kernel where the device has it (same update rule)


_C.KNN = CN()


# folder with train/ and val/ (labeled); "" = no kNN monitor; "auto" = DATA.ROOT when it has a
# val/ folder, else off (moco.data.datasets.knn_data; the log says which)
_C.KNN.DATA = ""


_C.KNN.K = 200  # InstDisc weighted kNN


_C.KNN.T = 0.1


_C.KNN.PERIOD = 1  # epochs between measurements (the last epoch always); 0 = monitor off


_C.KNN.AT_START = False  # also measure before the first step (the untrained encoder's baseline)


_C.KNN.BATCH_SIZE = 256  # per process, feature extraction


# training images in the bank: 0 = all; N = N evenly spaced ones (ImageFolder lists by class, so
# every class keeps its share). Each pass encodes the bank: 20,000 images took ~10-19 s on a CPU.
_C.KNN.BANK_SIZE = 0


_C.DIST = CN()


# Minutes a collective, and the start-up rendezvous, waits for the other processes (the process
# group's timeout; torch's default is 30). A peer that hangs without closing its connection (a
# frozen or cut-off machine) ends the run after this long; a float (0.5 = 30 s). moco.utils.launch.
_C.DIST.TIMEOUT_MINUTES = 30.0


_C.OUTPUT_DIR = "./output/pretrain"


_C.SEED = -1  # < 0: a random seed per run; >= 0: SEED + rank seeds torch/numpy/random


_C.LOG_PERIOD = 10  # iterations (official -p/--print-freq)


def load_cfg(config_file=None, opts=None, what="config file", keys="moco/config.py"):
    """The pretraining config: defaults (:func:`get_cfg`), then ``config_file``, then opts."""
    return load_config(get_cfg, config_file, opts, what, keys)


# Keys added after runs were stored, each with the value that computes what the runs before it
# did: at that value a key is left out of a run's identity (:func:`identity_dump`), so the sweeps'
# and the pipeline's finished runs keep their stage keys and are reused.
NEUTRAL_DEFAULTS = {"INPUT.BLUR_PROB": 0.5, "INPUT.BLUR_SIGMA": (0.1, 2.0)}


def identity_dump(cfg):
    """``cfg.dump()`` without the :data:`NEUTRAL_DEFAULTS` keys that hold their neutral value: the
    text a run's stage key hashes (experiments.ablate, experiments.pipeline)."""
    cfg = cfg.clone()
    cfg.defrost()
    for key, neutral in NEUTRAL_DEFAULTS.items():
        node, leaf = _parent(cfg, key)
        value = node.get(leaf)
        if isinstance(value, (list, tuple)) and isinstance(neutral, tuple):
            value = tuple(value)
        if value == neutral:
            del node[leaf]
    return cfg.dump()


# official main_moco.py flag -> config key (for flags that map one to one)
_FLAG_TO_KEY = {
    "arch": "MODEL.ARCH",
    "epochs": "SOLVER.EPOCHS",
    "start_epoch": "SOLVER.START_EPOCH",
    "lr": "SOLVER.BASE_LR",
    "schedule": "SOLVER.STEPS",
    "momentum": "SOLVER.MOMENTUM",
    "wd": "SOLVER.WEIGHT_DECAY",
    "print_freq": "LOG_PERIOD",
    "seed": "SEED",
    "moco_dim": "MODEL.DIM",
    "moco_k": "MODEL.K",
    "moco_m": "MODEL.M",
    "moco_t": "MODEL.T",
    "mlp": "MODEL.MLP",
    "aug_plus": "INPUT.AUG_PLUS",
    "cos": "SOLVER.COS",
    "data": "DATA.ROOT",
    "output_dir": "OUTPUT_DIR",
    "knn_data": "KNN.DATA",
}


def _parent(cfg, key):
    """(the node holding ``key``, its last name): ``"INPUT.BLUR_PROB"`` -> (cfg.INPUT, "BLUR_PROB")."""
    *parents, leaf = key.split(".")
    for p in parents:
        cfg = cfg[p]
    return cfg, leaf


def _set(cfg, key, value):
    node, leaf = _parent(cfg, key)
    if isinstance(node[leaf], tuple) and isinstance(value, list):
        value = tuple(value)
    node[leaf] = value


def apply_official_args(cfg, args, procs_per_machine, num_machines):
    """Override ``cfg`` with the official ``main_moco.py`` flags that were given (not None).

    Semantics of the official script (one process per GPU, ``--world-size`` = number of nodes):
    ``-b`` is the batch of one node, so the global batch is ``b * num_machines``; ``-j`` is the
    data-loading workers of one node, so each process gets ``ceil(j / procs_per_machine)``;
    ``--gpu N`` pins the single process to GPU N.
    """
    for flag, key in _FLAG_TO_KEY.items():
        value = getattr(args, flag, None)
        if value is not None:
            _set(cfg, key, value)
    if getattr(args, "batch_size", None) is not None:
        cfg.SOLVER.IMS_PER_BATCH = int(args.batch_size) * int(num_machines)
    if getattr(args, "workers", None) is not None:
        cfg.DATALOADER.NUM_WORKERS = int(math.ceil(int(args.workers) / int(procs_per_machine)))
    if getattr(args, "gpu", None) is not None:
        cfg.MODEL.DEVICE = f"cuda:{int(args.gpu)}"
    return cfg
