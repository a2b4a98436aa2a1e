"""Detection training data as a function of (seed, position), so that a resumed run continues it.

Detectron2's train loader keeps no state a checkpoint could hold: ``TrainingSampler`` restarts from
its seed, ``AspectRatioGroupedDataset`` buffers mapped images of both aspect groups, the workers
prefetch, and each worker's augmentation RNG runs on from a seed drawn when the loader starts. A
resumed fine-tune saw other images in another order, with other flips and sizes.

:class:`ResumableTrainLoader` keeps Detectron2's sampler (``DATALOADER.SAMPLER_TRAIN`` and its
seed), per-process batch and aspect-ratio grouping (``DATALOADER.ASPECT_RATIO_GROUPING``), with
three changes:

* batches are formed from indices in the training process (Detectron2's ``GroupedBatchSampler``:
  the same rule, width > height or not, as ``AspectRatioGroupedDataset``, in the sampler's order
  rather than the workers' arrival order), so batch ``b`` depends on the seed alone: a resume at
  batch ``b`` replays the index stream (no image is read) instead of saving the group buffers;
* each sample is mapped under numpy / torch / python RNGs seeded from (seed, rank, batch, slot),
  with the process's own streams restored afterwards: augmentation does not depend on the worker
  that maps it, on prefetching, or on where the run started;
* an image the mapper skips (unreadable: ``detection.data.checks.SkipUnreadableMapper``) is
  replaced by the next index, deterministically (``MapDataset`` retries a random one).

Its position (``consumed``) counts the batches handed to the training loop, not those the workers
produced ahead. :class:`DataOrder`, a hook, saves ``{seed, batches}`` with the trainer's checkpoint
and restores it on resume; before each step it seeds the RNGs the step itself draws from (RPN and
ROI sampling) from (seed, rank, iteration), so nothing an evaluation, precise BN or the resume
draws carries into training, and no per-rank RNG state has to reach rank 0's checkpoint.
"""

import contextlib
import logging
import random
import signal

import numpy as np
import torch
from detectron2.data.build import (
    _train_loader_from_config,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import GroupedBatchSampler
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.utils.data import BatchSampler, DataLoader, Dataset

from moco.checkpoint import check_count
from moco.utils.cli import Interrupted
from moco.utils.hooks import stop_requested

__all__ = ["DataOrder", "ResumableTrainLoader", "build_resumable_train_loader", "derived_seed"]

logger = logging.getLogger(__name__)

_STEP, _SAMPLE = 0, 1  # stream tags: a training step's RNG, one sample's augmentation


def derived_seed(*key):
    """A 32-bit seed (numpy, torch and python take it) mixed from ints (a sampler's seed may be
    negative: RepeatFactorTrainingSampler takes SEED -1 as is)."""
    return int(np.random.SeedSequence([int(k) % 2**64 for k in key]).generate_state(1)[0])


class _SeededSamples(Dataset):
    """``mapper(dicts[index])`` for keys ``(batch, slot, index)``, under RNGs seeded from (seed,
    rank, batch, slot); a sample the mapper skips (None) is replaced by the next index."""

    def __init__(self, dicts, mapper, seed, rank):
        # serialized, as Detectron2's loader: workers share the list without copy-on-read growth
        self.dicts = DatasetFromList(dicts, copy=False)
        self.mapper, self.seed, self.rank = mapper, seed, rank

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, key):
        batch, slot, index = key
        with _seeded_cpu_streams(derived_seed(self.seed, self.rank, batch, slot, _SAMPLE)):
            for offset in range(len(self.dicts)):
                mapped = self.mapper(self.dicts[(index + offset) % len(self.dicts)])
                if mapped is not None:
                    return mapped
        raise ValueError(f"none of the {len(self.dicts)} training images could be mapped")


@contextlib.contextmanager
def _seeded_cpu_streams(seed):
    """numpy, python and torch's CPU generator seeded with ``seed`` inside (the draws of
    ``seed_all_rng(seed)`` on a CPU), this process's streams restored after: the training process
    maps here when NUM_WORKERS is 0. Not ``seed_all_rng`` itself: its ``torch.manual_seed`` also
    visits every accelerator backend, ~1 ms a call, 10% of a CPU step of 8 images."""
    saved = np.random.get_state(), random.getstate(), torch.get_rng_state()
    np.random.seed(seed)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved[0])
        random.setstate(saved[1])
        torch.set_rng_state(saved[2])


class ResumableTrainLoader:
    """Endless batches (lists of mapped dicts) of this process, from batch ``start`` on; see the
    module docstring. ``sampler``: a Detectron2 training sampler (its ``_seed`` is the stream's)."""

    def __init__(self, dicts, mapper, sampler, batch_size, aspect_ratio_grouping, num_workers):
        seed = getattr(sampler, "_seed", None)
        if seed is None:
            raise ValueError(f"sampler {type(sampler).__name__} has no seed to resume from")
        self.sampler, self.seed = sampler, int(seed)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.group_ids = (
            [0 if d["width"] > d["height"] else 1 for d in dicts] if aspect_ratio_grouping else None
        )
        self.dataset = _SeededSamples(dicts, mapper, self.seed, comm.get_rank())
        self.start = self.consumed = 0

    def _index_batches(self):
        if self.group_ids is not None:
            batches = GroupedBatchSampler(self.sampler, self.group_ids, self.batch_size)
        else:
            batches = BatchSampler(self.sampler, self.batch_size, drop_last=True)
        batches = _replay(iter(batches), self.start)  # the stream up to start, no image read
        for b, batch in enumerate(batches, self.start):
            yield [(b, slot, index) for slot, index in enumerate(batch)]

    def __iter__(self):
        loader = DataLoader(
            self.dataset,
            batch_sampler=_Reiterable(self._index_batches),
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            worker_init_fn=worker_init_reset_seed,
            # the workers' base seed comes from here, not from the training process's torch RNG
            generator=torch.Generator().manual_seed(self.seed),
        )
        self.consumed = self.start
        for batch in loader:
            self.consumed += 1  # handed to the loop: the position a checkpoint saves
            yield batch

    def state_dict(self):
        return {"seed": self.seed, "batches": self.consumed}

    def load_state_dict(self, state, source="checkpoint", iteration=None):
        """Continue at ``state`` (:meth:`state_dict` of the run that saved ``source``, at its
        ``iteration``: one batch per step, so at most ``iteration + 1`` were consumed)."""
        state = state if isinstance(state, dict) else {}
        seed = state.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**63:
            raise ValueError(f"{source}: data order seed {seed!r} is not a 64-bit integer")
        batches = check_count(state.get("batches"), source, "data order batches")
        if iteration is not None and batches > iteration + 1:
            # a replay of 2^61 batches ran for ever (55,000 a second)
            raise ValueError(
                f"{source}: data order batches {batches} is more than the {iteration + 1} steps "
                f"to its iteration {iteration} consumed; the file is damaged or was edited"
            )
        if seed != self.seed:  # SEED < 0: this run drew another; the saved one continues the order
            self.sampler._seed = seed
            self.dataset.seed = self.seed = seed
        self.start = self.consumed = batches


class _Reiterable:
    """A generator function as the ``batch_sampler`` DataLoader iterates (it calls ``iter``)."""

    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return self.fn()


def build_resumable_train_loader(cfg, dicts, mapper):
    """:class:`ResumableTrainLoader` with Detectron2's choices for ``cfg`` (sampler, batch per
    process, grouping, workers: ``build_detection_train_loader``'s own from-config)."""
    kwargs = _train_loader_from_config(cfg, mapper, dataset=dicts)
    world = comm.get_world_size()
    total = kwargs["total_batch_size"]
    if total <= 0 or total % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {total} is not a positive multiple of the {world} processes"
        )
    return ResumableTrainLoader(
        dicts,
        mapper,
        kwargs["sampler"],
        total // world,
        kwargs["aspect_ratio_grouping"],
        kwargs["num_workers"],
    )


class DataOrder(HookBase):
    """Saves and restores the training loader's position (trainer checkpoint, ``hooks.DataOrder``)
    and seeds each step's RNGs from (seed, rank, iteration)."""

    def __init__(self, loader):
        self.loader = loader

    def before_train(self):
        if self.trainer.start_iter > 0 and self.loader.start == 0:
            logger.warning(
                "resuming at iteration %d from a checkpoint without the data position "
                "(written before it was saved): the data order starts again",
                self.trainer.start_iter,
            )

    def before_step(self):
        seed_all_rng(derived_seed(self.loader.seed, comm.get_rank(), self.trainer.iter, _STEP))

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        source = getattr(self.trainer.checkpointer, "_loading", None) or "resume checkpoint"
        # Detectron2 sets the trainer's iteration from the same checkpoint before its hooks' states
        iteration = check_count(self.trainer.iter, source, "iteration")
        self.loader.load_state_dict(state, source, iteration)


def _replay(batches, count):
    """``batches`` after its first ``count`` (drawn, not mapped). A SIGTERM / SIGINT that a
    SignalStop hook recorded meanwhile ends the replay (moco.utils.hooks.stop_requested): no step
    boundary comes until it is over."""
    for done in range(count):
        if done % 1024 == 0:
            signum = stop_requested()
            if signum:
                raise Interrupted(
                    f"stopped by {signal.Signals(signum).name} while replaying the data order "
                    f"to the checkpoint's position ({done} of {count} batches); nothing was "
                    "trained since the checkpoint: rerun the same command with --resume",
                    signum,
                )
        next(batches)  # Detectron2's training samplers are endless
    return batches
