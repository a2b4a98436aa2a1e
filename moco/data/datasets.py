"""Image-folder datasets and loaders for MoCo pretraining, the kNN monitor and linear evaluation.

Pretraining reads ``DATA.ROOT/train/<class>/*`` (labels unused) with two augmented crops per image;
each process loads ``global batch / world size`` images per step from a ``DistributedSampler``
(``drop_last``, ``set_epoch`` every epoch, as official), so one epoch is exactly
``len(dataset) // global batch`` steps on every process. Evaluation loaders shard the dataset in
order with Detectron2's ``InferenceSampler``.
"""

import itertools
import os

import torch
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.samplers import InferenceSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from moco.data.augment import JpegDraftLoader, eval_transform, pretrain_transform
from moco.data.batch_augment import batch_source_transform
from moco.data.checks import CheckedImageFolder, check_scan_mode
from moco.fast import to_device as tensor_batch_to  # noqa: F401  (image batch -> device, layout)

_DATASETS_VAR = "$DETECTRON2_DATASETS"


def resolve_data_path(path):
    """Expand ``$DETECTRON2_DATASETS`` (default "datasets", as Detectron2) and ``~`` in ``path``."""
    if _DATASETS_VAR in path:
        path = path.replace(_DATASETS_VAR, os.environ.get("DETECTRON2_DATASETS", "datasets"))
    return os.path.expanduser(path)


def knn_data(cfg):
    """The kNN monitor's labeled folder: KNN.DATA; with KNN.DATA "auto", DATA.ROOT when it has a
    val/ folder (its train/ the bank, val/ the queries), else "" (no monitor). A config that
    follows the data thus runs on one's own folder with no second setting."""
    if cfg.KNN.DATA != "auto":
        return cfg.KNN.DATA
    has_val = os.path.isdir(os.path.join(resolve_data_path(cfg.DATA.ROOT), "val"))
    return cfg.DATA.ROOT if has_val else ""


def validate_data(cfg):
    """DATA.SCAN_IMAGES is a mode, DATA.CACHE_DECODED has INPUT.BATCH_AUGMENT, DATA.ROOT has
    train/, and the kNN folder (:func:`knn_data`, when the monitor runs) train/ and val/: one-line
    error."""
    check_scan_mode(cfg.DATA.SCAN_IMAGES)
    if cfg.DATA.CACHE_DECODED and not cfg.INPUT.BATCH_AUGMENT:
        raise ValueError(
            "DATA.CACHE_DECODED needs INPUT.BATCH_AUGMENT True (it caches the "
            "uint8 squares the trainer augments)"
        )
    if not cfg.DATA.ROOT:
        raise ValueError("no training data: give DATA (a folder with train/) or DATA.ROOT")
    train_dir = os.path.join(resolve_data_path(cfg.DATA.ROOT), "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(
            f"DATA.ROOT (DATA) = {cfg.DATA.ROOT}: {train_dir} is not a folder "
            "(expected train/<class>/<image>)"
        )
    knn = knn_data(cfg)
    if knn and cfg.KNN.PERIOD > 0:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(resolve_data_path(knn), split)):
                raise FileNotFoundError(
                    f"KNN.DATA (--knn-data) = {knn} has no {split}/ folder; KNN.DATA auto "
                    'follows DATA.ROOT (its val/ if it has one), "" turns the monitor off'
                )


def folder_checks(cfg):
    """A config's checks of every image folder its run reads (:func:`image_folder`'s ``checks``);
    the scan cache goes to OUTPUT_DIR when a folder is not writable."""
    data = cfg.DATA
    return {
        "max_bad_fraction": data.MAX_BAD_FRACTION,
        "max_pixels": data.MAX_IMAGE_PIXELS,
        "scan": data.SCAN_IMAGES,
        "cache_dir": cfg.OUTPUT_DIR,
    }


def image_folder(root, split, transform, what, loader=None, **checks):
    """``ImageFolder(root/split)`` with a one-line error naming ``what`` (the config key/flag).

    Unreadable files are skipped, counted and bounded by ``max_bad_fraction``; so are images above
    ``max_pixels``; ``scan`` and ``cache_dir`` choose the start-up scan and where its cache may go
    (``checks``: :func:`folder_checks`, each DATA's default when left out):
    :class:`moco.data.checks.CheckedImageFolder`. Call in every process.
    """
    if not root:
        raise ValueError(f"{what} is not set: give a folder with {split}/<class>/ images")
    folder = os.path.join(resolve_data_path(root), split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{what}={root}: {folder} is not a folder (expected the ImageFolder layout "
            f"{split}/<class>/<image>)"
        )
    try:
        return CheckedImageFolder(
            folder, transform=transform, loader=loader, what=f"{what}={root}", **checks
        )
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise FileNotFoundError(f"{what}={root}: {e}") from None


def batch_augment_size(cfg):
    """INPUT.BATCH_AUGMENT_SIZE, or 1.5 x CROP_SIZE when 0."""
    if cfg.INPUT.BATCH_AUGMENT_SIZE < 0:
        raise ValueError(
            f"INPUT.BATCH_AUGMENT_SIZE must be >= 0 (0 = 1.5 x INPUT.CROP_SIZE), got "
            f"{cfg.INPUT.BATCH_AUGMENT_SIZE}"
        )
    return cfg.INPUT.BATCH_AUGMENT_SIZE or int(round(1.5 * cfg.INPUT.CROP_SIZE))


def build_pretrain_dataset(cfg, with_index=False, color=True):
    """DATA.ROOT/train with two crops of the v1 or v2 ("aug+") augmentation per image
    (``color=False``: crops and flips only, see moco.data.augment.pretrain_transform; with
    INPUT.BATCH_AUGMENT: one uint8 square per image, augmented by the trainer).

    ``with_index``: items are ``(crops, label, index)`` (the memory bank's sample index).
    """
    crop, fast = cfg.INPUT.CROP_SIZE, cfg.INPUT.FAST_AUGMENT
    min_scale = cfg.INPUT.MIN_SCALE
    loader = JpegDraftLoader(crop, min_scale) if fast else None
    if (
        cfg.INPUT.BATCH_AUGMENT
    ):  # uint8 squares; the trainer draws both crops (moco.data.batch_augment)
        transform, loader = batch_source_transform(batch_augment_size(cfg)), None
    else:
        transform = pretrain_transform(
            crop,
            aug_plus=cfg.INPUT.AUG_PLUS,
            fast=fast,
            min_scale=min_scale,
            color=color,
            blur=(cfg.INPUT.BLUR_PROB, cfg.INPUT.BLUR_SIGMA),
        )
    dataset = image_folder(
        cfg.DATA.ROOT, "train", transform, "DATA.ROOT (DATA)", loader=loader, **folder_checks(cfg)
    )
    if cfg.DATA.CACHE_DECODED:
        dataset = DecodedCache(dataset, cfg.DATALOADER.NUM_WORKERS)
    return WithIndex(dataset) if with_index else dataset


class DecodedCache(Dataset):
    """Every item of ``dataset`` (an image tensor and its label) decoded once, by a loader with
    ``num_workers``, and kept in one tensor: ``cache[i]`` equals ``dataset[i]``, so a run with the
    cache is the run that decodes in the training process (DATA.CACHE_DECODED)."""

    decoded = True  # build_pretrain_loader indexes it in the training process

    def __init__(self, dataset, num_workers=0, batch_size=256):
        self.dataset = dataset
        # its own generator: the loader's seed draw must not shift the global stream (model init)
        loader = build_eval_loader(
            dataset, batch_size, num_workers, world_size=1, generator=torch.Generator()
        )
        images, labels = zip(*loader)
        self.images, self.labels = torch.cat(images), torch.cat(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])

    def __getattr__(self, name):  # classes, skipped_images, ... of the decoded dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def knn_bank(train_set, size):
    """``size`` evenly spaced items of ``train_set`` (all when 0 or larger): an ImageFolder lists
    its files by class, so every class keeps its share (KNN.BANK_SIZE)."""
    if not size or size >= len(train_set):
        return train_set
    step = len(train_set) / size
    return Subset(train_set, [int(i * step) for i in range(size)])


class WithIndex(Dataset):
    """``dataset[i] + (i,)``: each item also names its sample (InstDisc's memory bank entry)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], index)

    def __getattr__(self, name):  # classes, samples, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (drop_last) that can begin an epoch part-way, for resuming."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start_index = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self):
        return self.num_samples - self.start_index


class EpochLoader:
    """Endless iterable of batches, epoch after epoch, starting at iteration ``start_iter``.

    Each epoch yields exactly ``iters_per_epoch`` batches: with drop_last in both the sampler
    (``len // world`` samples per process) and the loader, that is ``len // global batch``.
    """

    def __init__(self, loader, sampler, iters_per_epoch, start_iter=0):
        self.loader, self.sampler = loader, sampler
        self.iters_per_epoch, self.start_iter = int(iters_per_epoch), int(start_iter)

    def __iter__(self):
        epoch, skip = divmod(self.start_iter, self.iters_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.sampler.start_index = skip * self.loader.batch_size
            yield from itertools.islice(self.loader, self.iters_per_epoch - skip)
            epoch, skip = epoch + 1, 0


def make_loader(dataset, batch_size, sampler, num_workers, drop_last, pin_memory, **kwargs):
    """DataLoader with persistent workers seeded by Detectron2's worker_init_reset_seed."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_reset_seed,
        **kwargs,
    )


def build_pretrain_loader(cfg, dataset, iters_per_epoch, start_iter, seed, pin_memory=False):
    """EpochLoader over this process's share of ``dataset`` (per-process batch = global / world);
    a decoded dataset (:class:`DecodedCache`) is indexed in this process, without workers."""
    world, rank = comm.get_world_size(), comm.get_rank()
    sampler = EpochSampler(dataset, world, rank, seed)
    workers = 0 if getattr(dataset, "decoded", False) else cfg.DATALOADER.NUM_WORKERS
    loader = make_loader(
        dataset,
        cfg.SOLVER.IMS_PER_BATCH // world,
        sampler,
        workers,
        drop_last=True,
        pin_memory=pin_memory,
    )
    return EpochLoader(loader, sampler, iters_per_epoch, start_iter)


def build_eval_loader(
    dataset, batch_size, num_workers, pin_memory=False, world_size=None, **kwargs
):
    """This process's contiguous shard of ``dataset``, in order (Detectron2's InferenceSampler);
    ``world_size`` 1: all of it, in every process."""
    sampler = InferenceSampler(len(dataset)) if world_size != 1 else range(len(dataset))
    return make_loader(
        dataset, batch_size, sampler, num_workers, drop_last=False, pin_memory=pin_memory, **kwargs
    )


def build_labeled_datasets(root, crop_size, what, train_transform=None, **checks):
    """(train, val) ImageFolders of ``root`` with the same classes; val uses ``eval_transform``;
    ``checks``: :func:`image_folder`'s."""
    val_tf = eval_transform(crop=crop_size)
    train = image_folder(root, "train", train_transform or val_tf, what, **checks)
    val = image_folder(root, "val", val_tf, what, **checks)
    if train.classes != val.classes:
        raise ValueError(
            f"{what}={root}: train/ and val/ have different classes "
            f"({len(train.classes)} vs {len(val.classes)}); they must name the same class folders"
        )
    return train, val
