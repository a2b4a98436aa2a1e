"""MoCo pretraining on Detectron2's training machinery.

:class:`PretrainTrainer` is a Detectron2 ``SimpleTrainer`` whose step is MoCo's: two crops, InfoNCE
over ``(logits, labels)`` from :class:`moco.modeling.moco.MoCo`, SGD. Hooks: ``IterationTimer``,
``LRScheduler`` (per-epoch step or cosine, :mod:`moco.engine.hooks`), the kNN monitor (``EvalHook``),
official-format checkpoints every ``SOLVER.CHECKPOINT_PERIOD`` epochs and ``PeriodicWriter`` with
``CommonMetricPrinter`` (ETA), ``JSONWriter`` (metrics.json) and ``TensorboardXWriter``.
Epochs map to iterations as ``len(dataset) // global batch`` (drop_last).

Processes: one per GPU (or N CPU processes with ``--num-gpus N`` on a machine without CUDA),
started by :func:`moco.utils.launch.launch_training` (Detectron2's ``launch`` or torchrun). Each process
trains on ``global batch / world size`` images per step. :func:`validate_cfg` checks a config
before any process starts; each module checks its own settings.
"""

import hashlib
import logging
import os
import time

import torch
import torch.nn.functional as F
from detectron2.engine import SimpleTrainer
from detectron2.engine.defaults import create_ddp_model
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.utils import comm

from moco import checkpoint as ckpt_lib
from moco.data.batch_augment import BatchAugment
from moco.data.datasets import build_pretrain_dataset, build_pretrain_loader, validate_data
from moco.engine.hooks import build_epoch_hooks
from moco.evaluation.knn import validate_knn
from moco.fast import FastPath, autocast_context, prepare_model, to_device
from moco.modeling.build import (
    build_contrastive_model,
    mechanism_class,
    validate_mechanism,
    validate_model,
)
from moco.modeling.shuffle_bn import validate_shuffle_bn
from moco.solver import build_lr_multiplier, build_optimizer, validate_solver
from moco.utils import file_io
from moco.utils.launch import kernels, process_group_timeout, resolve_device
from moco.utils.run_files import PRETRAIN_SUMMARY

logger = logging.getLogger(__name__)


def validate_cfg(cfg, world_size):
    """One-line ValueError/FileNotFoundError for a configuration that cannot train."""
    process_group_timeout(cfg.DIST.TIMEOUT_MINUTES)
    validate_model(cfg)
    validate_solver(cfg, world_size)
    validate_mechanism(cfg, world_size)
    validate_shuffle_bn(cfg, world_size)
    validate_knn(cfg)
    validate_data(cfg)


def topk_accuracy(logits, labels, ks=(1, 5)):
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == labels[:, None]
    return [hit[:, : min(k, maxk)].any(dim=1).float().mean() * 100.0 for k in ks]


def queue_digest(model):
    """sha256 of the mechanism's dictionary (MoCo: queue and pointer; memory bank: the bank);
    replicas must agree bit for bit."""
    model = getattr(model, "module", model)
    buffers = dict(model.named_buffers())
    h = hashlib.sha256()
    for name in model.dictionary_buffers:
        h.update(buffers[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class PretrainTrainer(SimpleTrainer):
    """MoCo pretraining: ``PretrainTrainer(cfg, resume=None).train()`` -> summary dict.

    ``resume``: a checkpoint path, a folder (its ``last_checkpoint``), or "auto" (OUTPUT_DIR's
    last checkpoint if any). Model, queue and pointer, optimizer, LR schedule, iteration, sampler
    seed and RNG states are restored; an official checkpoint without resume state continues at
    its ``epoch``.

    Subclasses plug in through :meth:`validate`, :meth:`build_dataset`, :meth:`build_model`,
    :meth:`forward_batch`, :meth:`build_summary` and :meth:`write_outputs` (the supervised
    baseline, moco.engine.supervised); the contrastive mechanisms are models (MODEL.MECHANISM).
    """

    summary_file = PRETRAIN_SUMMARY

    def __init__(self, cfg, resume=None):
        world = comm.get_world_size()
        self.cfg = cfg
        self.validate(world)
        self.device = resolve_device(cfg.MODEL.DEVICE)
        dataset = self.build_dataset()
        batch = cfg.SOLVER.IMS_PER_BATCH
        if len(dataset) < batch:
            raise ValueError(
                f"DATA.ROOT {cfg.DATA.ROOT}: train/ has {len(dataset)} images, fewer "
                f"than the global batch {batch} (one epoch = len // batch steps)"
            )
        self.iters_per_epoch = len(dataset) // batch
        self.dataset_size = len(dataset)
        self.dataset = dataset
        self.wants_index = mechanism_class(cfg).wants_index(cfg)
        self.fast = FastPath.resolve(
            self.device,
            amp=cfg.SOLVER.AMP,
            channels_last=cfg.MODEL.CHANNELS_LAST,
            fused_sgd=cfg.SOLVER.FUSED_SGD,
        )
        self.moco = prepare_model(
            self.build_model(dataset).to(self.device), self.fast.channels_last
        )
        self.batch_augment = None
        if cfg.INPUT.BATCH_AUGMENT:
            self.batch_augment = BatchAugment(
                cfg.INPUT.CROP_SIZE,
                cfg.INPUT.AUG_PLUS,
                cfg.INPUT.MIN_SCALE,
                color=mechanism_class(cfg).wants_color(cfg),
                blur_prob=cfg.INPUT.BLUR_PROB,
                blur_sigma=cfg.INPUT.BLUR_SIGMA,
            ).to(self.device)
        optimizer = build_optimizer(cfg, self.moco)
        max_iter = cfg.SOLVER.EPOCHS * self.iters_per_epoch

        resume_path = ckpt_lib.resolve_resume(resume, cfg.OUTPUT_DIR)
        if resume == "auto":  # say which way "auto" went: a fresh start is no silent surprise
            found = (
                f"resuming from {resume_path}"
                if resume_path
                else f"no checkpoint in {cfg.OUTPUT_DIR}, starting from the beginning"
            )
            logger.info("--resume auto: %s", found)
        state = (
            ckpt_lib.load_resume_state(resume_path, self.moco, optimizer, cfg, self.iters_per_epoch)
            if resume_path
            else {}
        )
        start_iter = state.get("iteration", cfg.SOLVER.START_EPOCH * self.iters_per_epoch)
        for group in optimizer.param_groups:  # the schedule's base LR is this run's SOLVER.BASE_LR
            group["initial_lr"] = cfg.SOLVER.BASE_LR
        self.scheduler = LRMultiplier(
            optimizer, build_lr_multiplier(cfg), max_iter, last_iter=start_iter - 1
        )
        seed = state.get("sampler_seed")
        if seed is None:
            seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        self.sampler_seed = int(seed)
        loader = build_pretrain_loader(
            cfg,
            dataset,
            self.iters_per_epoch,
            start_iter,
            self.sampler_seed,
            pin_memory=self.device.type == "cuda",
        )
        # DDP keeps buffers (queue, BN statistics) in sync from rank 0, as official
        ddp = create_ddp_model(
            self.moco, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        super().__init__(ddp, loader, optimizer)
        self.start_iter = self.iter = self.completed_iters = start_iter
        self.max_iter = max_iter
        self.knn_history, self.knn_num_classes = [], None
        self.drift_history = []  # moco.engine.hooks.KeyEncoderDrift's, with a key encoder
        self.last_checkpoint = resume_path
        self._step_seconds = 0.0
        self.register_hooks(self.build_hooks())
        rng = state.get("rng_states")
        if rng is not None:  # last, so nothing above consumes the restored streams
            if isinstance(rng, (list, tuple)) and len(rng) == world:
                try:
                    ckpt_lib.restore_rng_state(rng[comm.get_rank()])
                except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError):
                    raise ValueError(
                        f"{resume_path}: rng_states[{comm.get_rank()}] is not an RNG "
                        "state of torch, numpy and python"
                    ) from None
            else:
                logger.warning(
                    "checkpoint has RNG states of %d processes, this run has %d: not restored",
                    len(rng),
                    world,
                )

    @classmethod
    def check_launch(cls, cfg, world_size):
        """Checks before any process starts (moco.utils.launch.launch_training)."""
        validate_cfg(cfg, world_size)
        if world_size > 1 and torch.cuda.is_available() and cfg.MODEL.DEVICE == "cpu":
            raise ValueError(
                "MODEL.DEVICE=cpu with several processes on a CUDA machine: Detectron2's "
                "launch uses NCCL there; hide the GPUs with CUDA_VISIBLE_DEVICES=''"
            )

    def validate(self, world_size):
        """One-line error for a configuration that cannot train (before anything is built)."""
        validate_cfg(self.cfg, world_size)

    def build_dataset(self):
        """DATA.ROOT/train, two crops per image (and the sample index for a memory bank)."""
        mechanism = mechanism_class(self.cfg)
        return build_pretrain_dataset(
            self.cfg,
            with_index=mechanism.wants_index(self.cfg),
            color=mechanism.wants_color(self.cfg),
        )

    def build_model(self, dataset):
        """The unwrapped model trained by the step (MoCo or another mechanism)."""
        return build_contrastive_model(self.cfg, comm.get_world_size(), len(dataset))

    def forward_batch(self, batch):
        """``(logits, labels)`` of one loader batch; the step's loss is their cross-entropy."""
        if self.batch_augment is not None:  # uint8 images: both crops drawn here
            images, *rest = batch
            images = images.to(self.device, non_blocking=True)
            crops = (self.batch_augment(images), self.batch_augment(images))
        else:
            crops, *rest = batch
        inputs = [to_device(im, self.device, self.fast.channels_last) for im in crops]
        if self.wants_index:  # memory bank: (crops, label, index)
            inputs.append(rest[1].to(self.device, non_blocking=True))
        with autocast_context(self.device, self.fast.amp):
            return self.model(*inputs)

    @property
    def encoder(self):
        """The network whose L2-normalised output the kNN monitor scores (MoCo's query encoder)."""
        return self.moco.encoder_q

    def build_hooks(self):
        return build_epoch_hooks(self, self.cfg)

    def run_step(self):
        assert self.model.training, "[PretrainTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        batch = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        logits, labels = self.forward_batch(batch)
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward()
        acc1, acc5 = topk_accuracy(logits.detach(), labels)
        self._write_metrics({"loss": loss.detach()}, data_time)  # gathers; raises on NaN/inf
        acc = comm.reduce_dict({"acc1": acc1, "acc5": acc5})
        if comm.is_main_process():
            self.storage.put_scalars(**{k: float(v) for k, v in acc.items()})
        self.optimizer.step()
        self.completed_iters = self.iter + 1
        self._step_seconds += time.perf_counter() - start

    def save_checkpoint(self, epoch, name=None):
        """Official checkpoint after ``epoch`` finished epochs (file ``name``, default the official
        one); call on every process."""
        rng_states = comm.all_gather(ckpt_lib.capture_rng_state())
        if comm.is_main_process():
            ckpt = ckpt_lib.build_checkpoint(
                self.moco,
                self.optimizer,
                epoch,
                self.cfg.MODEL.ARCH,
                iteration=self.iter + 1,
                scheduler=self.scheduler.state_dict(),
                sampler_seed=self.sampler_seed,
                rng_states=rng_states,
                config=self.cfg.dump(),
            )
            self.last_checkpoint = ckpt_lib.save_checkpoint(ckpt, self.cfg.OUTPUT_DIR, name)
            logger.info(
                "saved %s (epoch %d, iteration %d)", self.last_checkpoint, epoch, self.iter + 1
            )
        self._saved_iter = self.iter + 1
        comm.synchronize()

    def save_stop_checkpoint(self):
        """The checkpoint of a run stopped by a signal after this step (moco.engine.hooks.SignalStop):
        the epoch's own when this step ended an epoch that was saved, else a mid-epoch one whose
        ``iteration`` resumes exactly here. Returns its path (rank 0's)."""
        done = self.iter + 1
        if getattr(self, "_saved_iter", None) != done:
            self.save_checkpoint(done // self.iters_per_epoch, name=ckpt_lib.INTERRUPTED_CHECKPOINT)
        return os.path.abspath(self.last_checkpoint) if self.last_checkpoint else None

    def train(self):
        """Train from ``start_iter`` to ``max_iter``; returns the summary (also pretrain_summary.json)."""
        cfg = self.cfg
        logger.info(
            "%d images, global batch %d (%d per process x %d), %d iterations per epoch, "
            "epochs %d..%d",
            self.dataset_size,
            cfg.SOLVER.IMS_PER_BATCH,
            cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
            comm.get_world_size(),
            self.iters_per_epoch,
            self.start_iter // self.iters_per_epoch,
            cfg.SOLVER.EPOCHS,
        )
        if self.start_iter >= self.max_iter:
            logger.info(
                "checkpoint is at iteration %d >= %d: nothing to train; the end-of-training "
                "hooks run (the final kNN measurement a stop may have cut short)",
                self.start_iter,
                self.max_iter,
            )
        super().train(self.start_iter, self.max_iter)
        summary = self.build_summary()
        if comm.is_main_process():
            self.write_outputs(summary)
        return summary

    def build_summary(self):
        """The run's summary (every process calls it: the dictionary digests are gathered)."""
        cfg = self.cfg
        digests = comm.all_gather(queue_digest(self.moco))
        if len(set(digests)) != 1:
            raise RuntimeError(
                f"dictionaries (queue / memory bank) differ between processes after "
                f"training: {digests}"
            )
        iters = max(0, self.max_iter - self.start_iter)
        summary = {
            "world_size": comm.get_world_size(),
            "device": str(self.device),
            "kernels": kernels(self.device),
            "mechanism": cfg.MODEL.MECHANISM,
            "loss": cfg.MODEL.LOSS,
            "fast_path": self.fast.describe(),
            "arch": cfg.MODEL.ARCH,
            "shuffle_bn": self.moco.shuffle_bn,
            "dataset_size": self.dataset_size,
            # unreadable image files left out or replaced (moco.data.checks)
            "skipped_images": getattr(self.dataset, "skipped_images", 0),
            "global_batch": cfg.SOLVER.IMS_PER_BATCH,
            "iters_per_epoch": self.iters_per_epoch,
            "epochs": cfg.SOLVER.EPOCHS,
            "start_iter": self.start_iter,
            "max_iter": self.max_iter,
            "train_step_seconds": self._step_seconds,
            "images_per_sec": (
                iters * cfg.SOLVER.IMS_PER_BATCH / self._step_seconds
                if self._step_seconds > 0
                else None
            ),
            "knn": self.knn_history,
            "knn_chance": 100.0 / self.knn_num_classes if self.knn_num_classes else None,
            "key_encoder_drift": self.drift_history,
            "last_checkpoint": self.last_checkpoint,
            "queue_sha256_per_rank": digests,
        }
        return summary

    def write_outputs(self, summary):
        """Rank 0, after training: the summary file (OUTPUT_DIR/``summary_file``)."""
        file_io.atomic_write_json(os.path.join(self.cfg.OUTPUT_DIR, self.summary_file), summary)
