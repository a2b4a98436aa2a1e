"""MoCo pretraining on Detectron2's training machinery.

:class:`PretrainTrainer` is a Detectron2 ``SimpleTrainer`` whose step is MoCo's: two crops, InfoNCE
over ``(logits, labels)`` from :class:`moco.builder.MoCo`, SGD. Hooks: ``IterationTimer``,
``LRScheduler`` (per-epoch step or cosine, :mod:`moco.hooks`), the kNN monitor (``EvalHook``),
official-format checkpoints every ``SOLVER.CHECKPOINT_PERIOD`` epochs and ``PeriodicWriter`` with
``CommonMetricPrinter`` (ETA), ``JSONWriter`` (metrics.json) and ``TensorboardXWriter``.
Epochs map to iterations as ``len(dataset) // global batch`` (drop_last).

Processes: one per GPU (or N CPU processes with ``--num-gpus N`` on a machine without CUDA),
started by Detectron2's ``launch`` (gloo on CPU, NCCL on GPU), or by torchrun (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` in the environment). Each process trains on
``global batch / world size`` images per step.
"""

import dataclasses
import functools
import hashlib
import logging
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.engine import SimpleTrainer
from detectron2.engine.defaults import create_ddp_model
from detectron2.engine.launch import launch
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from moco import checkpoint as ckpt_lib
from moco import file_io
from moco.builder import resnet_encoder
from moco.shuffle_bn import resolve_shuffle_bn
from moco.data import build_pretrain_dataset, build_pretrain_loader, resolve_data_path
from moco.fast import FastPath, autocast_context, prepare_model, sgd, to_device
from moco.hooks import build_epoch_hooks, build_lr_multiplier
from moco.mechanisms import build_contrastive_model, validate_mechanism

logger = logging.getLogger("moco")

SUMMARY_FILE = "pretrain_summary.json"
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


# ------------------------------------------------------------------------------------------------
# processes


@dataclasses.dataclass
class LaunchSpec:
    """How many processes, where. ``from_env``: torchrun started them (init from env://)."""

    procs_per_machine: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    from_env: bool = False

    @property
    def world_size(self):
        return self.procs_per_machine * self.num_machines


def resolve_launch(num_gpus=None, num_machines=None, machine_rank=None, dist_url=None,
                   world_size=None, rank=None, multiprocessing_distributed=False,
                   environ=None):  # fmt: skip
    """Process layout from Detectron2's and the official main_moco.py's flags.

    Official semantics: with ``--multiprocessing-distributed``, ``--world-size`` is the number of
    nodes and ``--rank`` the node rank, one process per GPU of the node; without it,
    ``--world-size`` > 1 means one process per node. ``--num-gpus`` (processes per machine; CPU
    processes where there is no CUDA), ``--num-machines`` and ``--machine-rank`` are Detectron2's
    names and may be combined with them when consistent.
    """
    environ = os.environ if environ is None else environ
    if all(v in environ for v in _TORCHRUN_VARS):
        world = int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_WORLD_SIZE", world))
        if num_gpus not in (None, local) or num_machines not in (None, world // local):
            raise ValueError("started by torchrun (RANK/WORLD_SIZE set): drop --num-gpus / "
                             "--num-machines, torchrun decides the processes")  # fmt: skip
        return LaunchSpec(local, world // local, int(environ.get("GROUP_RANK", 0)), "env://", True)

    ws = world_size if world_size is not None and world_size > 0 else None  # official default -1
    node_rank = rank if rank is not None and rank >= 0 else None
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if multiprocessing_distributed:
        machines, per_machine = ws or 1, num_gpus or (cuda or 1)
    else:
        machines, per_machine = ws or 1, num_gpus or 1
    if num_machines is not None:
        if ws is not None and num_machines != ws:
            raise ValueError(f"--num-machines {num_machines} contradicts --world-size {ws} "
                             "(the number of nodes); give one of them")  # fmt: skip
        machines = num_machines
    if machine_rank is not None:
        if node_rank is not None and machine_rank != node_rank:
            raise ValueError(f"--machine-rank {machine_rank} contradicts --rank {node_rank}")
        node_rank = machine_rank
    node_rank = 0 if node_rank is None else node_rank
    if per_machine < 1 or machines < 1:
        raise ValueError(f"--num-gpus ({per_machine}) and --num-machines ({machines}) must be >= 1")
    if not 0 <= node_rank < machines:
        raise ValueError(f"--machine-rank/--rank {node_rank} must be in [0, {machines})")
    if cuda and per_machine > cuda:
        raise ValueError(f"--num-gpus {per_machine} but this machine has {cuda} CUDA devices")
    if machines > 1 and (not dist_url or dist_url == "auto"):
        raise ValueError("--dist-url tcp://HOST:PORT (of machine 0) is needed with several machines")
    return LaunchSpec(per_machine, machines, node_rank, dist_url or "auto", False)


def _init_from_env():
    """Process group for a torchrun start (NCCL with CUDA, else gloo), as Detectron2's launch."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    comm.synchronize()


def launch_pretraining(cfg, spec, resume=None):
    """Run :func:`pretrain_worker` in every process of ``spec``; returns its summary when in-process."""
    validate_cfg(cfg, spec.world_size)
    if spec.world_size > 1 and torch.cuda.is_available() and cfg.MODEL.DEVICE == "cpu":
        raise ValueError("MODEL.DEVICE=cpu with several processes on a CUDA machine: Detectron2's "
                         "launch uses NCCL there; hide the GPUs with CUDA_VISIBLE_DEVICES=''")  # fmt: skip
    return launch_processes(pretrain_worker, spec, (cfg, resume))


def launch_processes(fn, spec, args):
    """``fn(*args)`` in every process of ``spec`` (Detectron2's launch, or torchrun's env).

    Returns ``fn``'s result when it runs in this process (one process or torchrun), else None.
    """
    if spec.from_env:
        _init_from_env()
        return _close_after(fn, *args)
    if spec.world_size == 1:
        return fn(*args)
    launch(functools.partial(_close_after, fn), spec.procs_per_machine, spec.num_machines,
           spec.machine_rank, spec.dist_url, args=args)  # fmt: skip
    return None


def _close_after(fn, *args):
    """``fn(*args)``, then a barrier and ``destroy_process_group`` once every rank has finished.

    Without it a process can exit while gloo's threads still serve a peer, and the process group's
    destructor aborts it ("terminate called without an active exception", seen in 2-process runs).
    On failure nothing waits: the other ranks are ended by launch or by their broken connection.
    """
    result = fn(*args)
    if dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
    return result


def pretrain_worker(cfg, resume=None):
    """Per-process entry point: set up logging and seeds, build the trainer, train."""
    setup_process(cfg)
    trainer = PretrainTrainer(cfg, resume=resume)
    return trainer.train()


def setup_process(cfg):
    rank = comm.get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name in ("moco", "detectron2", "fvcore"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name=name, abbrev_name=name[:4])
    if comm.is_main_process():
        file_io.atomic_write_text(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
    logger.info("rank %d of %d, config:\n%s", rank, comm.get_world_size(), cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if cfg.SEED >= 0 and torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True  # official --seed


# ------------------------------------------------------------------------------------------------
# configuration checks (before any process is started)


def shuffle_bn_mode(cfg, world_size):
    """MODEL.SHUFFLE_BN with "auto" resolved for ``world_size`` (moco.shuffle_bn's rule)."""
    mode = cfg.MODEL.SHUFFLE_BN
    if mode == "auto":
        return "ddp" if world_size > 1 else "split"
    return mode


def validate_cfg(cfg, world_size):
    """One-line ValueError/FileNotFoundError for a configuration that cannot train."""
    resnet_encoder(cfg.MODEL.ARCH)  # raises for an unknown arch
    s = cfg.SOLVER
    batch = s.IMS_PER_BATCH
    if batch < 1:
        raise ValueError(f"SOLVER.IMS_PER_BATCH (-b) must be >= 1, got {batch}")
    if batch % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH (-b) = {batch} is not divisible by the {world_size} "
                         "processes; each process must get the same batch")  # fmt: skip
    validate_mechanism(cfg, world_size)
    if cfg.MODEL.MECHANISM == "moco" and cfg.MODEL.K % batch:
        raise ValueError(
            f"MODEL.K (--moco-k) = {cfg.MODEL.K} is not a multiple of the global batch "
            f"SOLVER.IMS_PER_BATCH = {batch}: the queue takes whole batches (official assert "
            f"K % batch_size == 0); use e.g. MODEL.K {max(1, cfg.MODEL.K // batch) * batch}"
        )
    if not 0.0 <= cfg.MODEL.M <= 1.0 or cfg.MODEL.T <= 0 or cfg.MODEL.DIM < 1:
        raise ValueError(f"MODEL.M (--moco-m) must be in [0, 1], MODEL.T (--moco-t) > 0 and "
                         f"MODEL.DIM >= 1; got {cfg.MODEL.M}, {cfg.MODEL.T}, {cfg.MODEL.DIM}")  # fmt: skip
    mode = resolve_shuffle_bn(shuffle_bn_mode(cfg, world_size))  # rejects unknown names
    if mode == "sync" and world_size > 1 and (cfg.MODEL.DEVICE == "cpu" or not torch.cuda.is_available()):
        raise ValueError("MODEL.SHUFFLE_BN=sync needs CUDA with several processes (torch's "
                         "SyncBatchNorm rejects CPU tensors); use 'ddp' or 'auto'")  # fmt: skip
    if mode == "ddp" and world_size < 2:
        raise ValueError("MODEL.SHUFFLE_BN=ddp shuffles across processes and needs >= 2; use "
                         "'auto' or 'split' for one process")  # fmt: skip
    if mode == "split" and (batch // world_size) % cfg.MODEL.SPLIT_BN_GROUPS:
        raise ValueError(
            f"split Shuffle BN: the per-process batch {batch // world_size} is not divisible by "
            f"MODEL.SPLIT_BN_GROUPS = {cfg.MODEL.SPLIT_BN_GROUPS}"
        )
    if mode == "split" and batch // world_size < 2 * cfg.MODEL.SPLIT_BN_GROUPS:
        # one sample per sub-batch: BN over a 1x1 map (small crops) has a single value per channel
        raise ValueError(
            f"split Shuffle BN: the per-process batch {batch // world_size} gives fewer than 2 "
            f"samples per sub-batch with MODEL.SPLIT_BN_GROUPS = {cfg.MODEL.SPLIT_BN_GROUPS}; "
            "lower MODEL.SPLIT_BN_GROUPS or raise SOLVER.IMS_PER_BATCH"
        )
    if s.EPOCHS < 1:
        raise ValueError(f"SOLVER.EPOCHS (--epochs) must be >= 1, got {s.EPOCHS}")
    if not 0 <= s.START_EPOCH < s.EPOCHS:
        raise ValueError(f"SOLVER.START_EPOCH (--start-epoch) {s.START_EPOCH} must be in [0, {s.EPOCHS})")
    if cfg.LOG_PERIOD < 1:
        raise ValueError(f"LOG_PERIOD (-p) must be >= 1, got {cfg.LOG_PERIOD}")
    if cfg.KNN.DATA and (cfg.KNN.K < 1 or cfg.KNN.T <= 0):
        raise ValueError(f"KNN.K must be >= 1 and KNN.T > 0, got {cfg.KNN.K} and {cfg.KNN.T}")
    if not cfg.DATA.ROOT:
        raise ValueError("no training data: give DATA (a folder with train/) or DATA.ROOT")
    train_dir = os.path.join(resolve_data_path(cfg.DATA.ROOT), "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"DATA.ROOT (DATA) = {cfg.DATA.ROOT}: {train_dir} is not a folder "
                                "(expected train/<class>/<image>)")  # fmt: skip
    if cfg.KNN.DATA and cfg.KNN.PERIOD > 0:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(resolve_data_path(cfg.KNN.DATA), split)):
                raise FileNotFoundError(f"KNN.DATA (--knn-data) = {cfg.KNN.DATA} has no {split}/ folder")


def resolve_device(cfg):
    name = cfg.MODEL.DEVICE
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"MODEL.DEVICE must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE={name} (or --gpu) but CUDA is not available here")
    device = torch.device(name)
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if comm.get_local_size() > 1:
        raise ValueError(f"MODEL.DEVICE={name} pins one GPU; with several processes per machine "
                         "use 'auto' or 'cuda'")  # fmt: skip
    torch.cuda.set_device(device)
    return device


def build_model(cfg, world_size, dataset_size=None):
    """The MODEL.MECHANISM model (moco.mechanisms); ``dataset_size``: memory bank entries."""
    return build_contrastive_model(cfg, world_size, dataset_size)


def build_optimizer(cfg, model):
    """SGD over all parameters, as official (encoder_k's have no gradient and are skipped), so the
    optimizer state's parameter indices are those of official checkpoints."""
    device = next(model.parameters()).device
    return sgd(model.parameters(), cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM,
               cfg.SOLVER.WEIGHT_DECAY, device, fused=cfg.SOLVER.FUSED_SGD)  # fmt: skip


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
    for name in getattr(model, "dictionary_buffers", ("queue", "queue_ptr")):
        h.update(buffers[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# the trainer


class PretrainTrainer(SimpleTrainer):
    """MoCo pretraining: ``PretrainTrainer(cfg, resume=None).train()`` -> summary dict.

    ``resume``: a checkpoint path, a folder (its ``last_checkpoint``), or "auto" (OUTPUT_DIR's
    last checkpoint if any). Model, queue and pointer, optimizer, LR schedule, iteration, sampler
    seed and RNG states are restored; an official checkpoint without resume state continues at
    its ``epoch``.

    Subclasses plug in through :meth:`validate`, :meth:`build_dataset`, :meth:`build_model`,
    :meth:`forward_batch`, :meth:`build_summary` and :meth:`write_outputs` (the supervised
    baseline, moco.supervised); the contrastive mechanisms are models (MODEL.MECHANISM).
    """

    summary_file = SUMMARY_FILE

    def __init__(self, cfg, resume=None):
        world = comm.get_world_size()
        self.cfg = cfg
        self.validate(world)
        self.device = resolve_device(cfg)
        dataset = self.build_dataset()
        batch = cfg.SOLVER.IMS_PER_BATCH
        if len(dataset) < batch:
            raise ValueError(f"DATA.ROOT {cfg.DATA.ROOT}: train/ has {len(dataset)} images, fewer "
                             f"than the global batch {batch} (one epoch = len // batch steps)")  # fmt: skip
        self.iters_per_epoch = len(dataset) // batch
        self.dataset_size = len(dataset)
        self.dataset = dataset
        self.fast = FastPath.resolve(self.device, amp=cfg.SOLVER.AMP,
                                     channels_last=cfg.MODEL.CHANNELS_LAST,
                                     fused_sgd=cfg.SOLVER.FUSED_SGD)  # fmt: skip
        self.moco = prepare_model(self.build_model(dataset).to(self.device), self.fast.channels_last)
        optimizer = build_optimizer(cfg, self.moco)
        max_iter = cfg.SOLVER.EPOCHS * self.iters_per_epoch

        resume_path = ckpt_lib.resolve_resume(resume, cfg.OUTPUT_DIR)
        state = self._load_resume_state(resume_path, optimizer) if resume_path else {}
        start_iter = state.get("iteration", cfg.SOLVER.START_EPOCH * self.iters_per_epoch)
        for group in optimizer.param_groups:  # the schedule's base LR is this run's SOLVER.BASE_LR
            group["initial_lr"] = cfg.SOLVER.BASE_LR
        self.scheduler = LRMultiplier(optimizer, build_lr_multiplier(cfg), max_iter,
                                      last_iter=start_iter - 1)  # fmt: skip
        seed = state.get("sampler_seed")
        if seed is None:
            seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        self.sampler_seed = int(seed)
        loader = build_pretrain_loader(cfg, dataset, self.iters_per_epoch, start_iter,
                                       self.sampler_seed, pin_memory=self.device.type == "cuda")  # fmt: skip
        # DDP keeps buffers (queue, BN statistics) in sync from rank 0, as official
        ddp = create_ddp_model(
            self.moco, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        super().__init__(ddp, loader, optimizer)
        self.start_iter = self.iter = self.completed_iters = start_iter
        self.max_iter = max_iter
        self.knn_history, self.knn_num_classes = [], None
        self.last_checkpoint = resume_path
        self._step_seconds = 0.0
        self.register_hooks(self.build_hooks())
        rng = state.get("rng_states")
        if rng is not None:  # last, so nothing above consumes the restored streams
            if len(rng) == world:
                ckpt_lib.restore_rng_state(rng[comm.get_rank()])
            else:
                logger.warning("checkpoint has RNG states of %d processes, this run has %d: "
                               "not restored", len(rng), world)  # fmt: skip

    def validate(self, world_size):
        """One-line error for a configuration that cannot train (before anything is built)."""
        validate_cfg(self.cfg, world_size)

    def build_dataset(self):
        """DATA.ROOT/train, two crops per image (and the sample index for the memory bank)."""
        return build_pretrain_dataset(self.cfg, with_index=self.cfg.MODEL.MECHANISM == "memory_bank")

    def build_model(self, dataset):
        """The unwrapped model trained by the step (MoCo or another mechanism)."""
        return build_model(self.cfg, comm.get_world_size(), len(dataset))

    def forward_batch(self, batch):
        """``(logits, labels)`` of one loader batch; the step's loss is their cross-entropy."""
        (im_q, im_k), *rest = batch
        inputs = [to_device(im, self.device, self.fast.channels_last) for im in (im_q, im_k)]
        if getattr(self.moco, "needs_index", False):  # memory bank: (crops, label, index)
            inputs.append(rest[1].to(self.device, non_blocking=True))
        with autocast_context(self.device, self.fast.amp):
            return self.model(*inputs)

    def _load_resume_state(self, path, optimizer):
        cfg = self.cfg
        ckpt = ckpt_lib.load_checkpoint(path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
            raise ValueError(f"{path}: not a MoCo pretraining checkpoint (needs 'epoch' and "
                             "'state_dict')")  # fmt: skip
        if ckpt.get("arch") not in (None, cfg.MODEL.ARCH):
            raise ValueError(f"{path}: checkpoint arch {ckpt['arch']} != MODEL.ARCH (-a) "
                             f"{cfg.MODEL.ARCH}")  # fmt: skip
        ckpt_lib.load_model_state(self.moco, ckpt["state_dict"], path)
        if ckpt.get("optimizer"):
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path}: optimizer state does not fit the model ({e})") from None
            for group in optimizer.param_groups:  # this run's hyper-parameters, as official
                group["momentum"] = cfg.SOLVER.MOMENTUM
                group["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY
        else:
            logger.warning("%s has no optimizer state: SGD momentum restarts from zero", path)
        iteration = int(ckpt.get("iteration", int(ckpt["epoch"]) * self.iters_per_epoch))
        sched = ckpt.get("scheduler") or {}
        if sched and int(sched.get("last_epoch", iteration)) != iteration:
            raise ValueError(f"{path}: scheduler is at iteration {sched['last_epoch']} but the "
                             f"checkpoint at {iteration}; the file is inconsistent")  # fmt: skip
        saved_lr = sched.get("base_lrs", [cfg.SOLVER.BASE_LR])
        if any(abs(lr - cfg.SOLVER.BASE_LR) > 1e-12 for lr in saved_lr):
            logger.warning("base LR %s of %s replaced by SOLVER.BASE_LR %s (official resume uses "
                           "the command line's --lr)", saved_lr, path, cfg.SOLVER.BASE_LR)  # fmt: skip
        logger.info("resuming from %s: epoch %s, iteration %d", path, ckpt["epoch"], iteration)
        return {
            "iteration": iteration,
            "sampler_seed": ckpt.get("sampler_seed"),
            "rng_states": ckpt.get("rng_states"),
        }

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

    def save_checkpoint(self, epoch):
        """Official checkpoint after ``epoch`` finished epochs; call on every process."""
        rng_states = comm.all_gather(ckpt_lib.capture_rng_state())
        if comm.is_main_process():
            ckpt = ckpt_lib.build_checkpoint(
                self.moco, self.optimizer, epoch, self.cfg.MODEL.ARCH,
                iteration=self.iter + 1, scheduler=self.scheduler.state_dict(),
                sampler_seed=self.sampler_seed, rng_states=rng_states, config=self.cfg.dump(),
            )  # fmt: skip
            self.last_checkpoint = ckpt_lib.save_checkpoint(ckpt, self.cfg.OUTPUT_DIR)
            logger.info("saved %s (epoch %d, iteration %d)", self.last_checkpoint, epoch, self.iter + 1)
        comm.synchronize()

    def train(self):
        """Train from ``start_iter`` to ``max_iter``; returns the summary (also pretrain_summary.json)."""
        cfg = self.cfg
        logger.info("%d images, global batch %d (%d per process x %d), %d iterations per epoch, "
                    "epochs %d..%d", self.dataset_size, cfg.SOLVER.IMS_PER_BATCH,
                    cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), comm.get_world_size(),
                    self.iters_per_epoch, self.start_iter // self.iters_per_epoch,
                    cfg.SOLVER.EPOCHS)  # fmt: skip
        if self.start_iter >= self.max_iter:
            logger.info("checkpoint is at iteration %d >= %d: nothing to train", self.start_iter,
                        self.max_iter)  # fmt: skip
        else:
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
            raise RuntimeError(f"dictionaries (queue / memory bank) differ between processes after "
                               f"training: {digests}")
        iters = max(0, self.max_iter - self.start_iter)
        summary = {
            "world_size": comm.get_world_size(),
            "device": str(self.device),
            "mechanism": cfg.MODEL.MECHANISM,
            "loss": cfg.MODEL.LOSS,
            "fast_path": self.fast.describe(),
            "arch": cfg.MODEL.ARCH,
            "shuffle_bn": self.moco.shuffle_bn,
            "dataset_size": self.dataset_size,
            # unreadable image files left out or replaced (moco.data_checks)
            "skipped_images": getattr(self.dataset, "skipped_images", 0),
            "global_batch": cfg.SOLVER.IMS_PER_BATCH,
            "iters_per_epoch": self.iters_per_epoch,
            "epochs": cfg.SOLVER.EPOCHS,
            "start_iter": self.start_iter,
            "max_iter": self.max_iter,
            "train_step_seconds": self._step_seconds,
            "images_per_sec": (iters * cfg.SOLVER.IMS_PER_BATCH / self._step_seconds
                               if self._step_seconds > 0 else None),  # fmt: skip
            "knn": self.knn_history,
            "knn_chance": 100.0 / self.knn_num_classes if self.knn_num_classes else None,
            "last_checkpoint": self.last_checkpoint,
            "queue_sha256_per_rank": digests,
        }
        return summary

    def write_outputs(self, summary):
        """Rank 0, after training: the summary file (OUTPUT_DIR/``summary_file``)."""
        file_io.atomic_write_json(os.path.join(self.cfg.OUTPUT_DIR, self.summary_file), summary)


# ------------------------------------------------------------------------------------------------
# command-line error handling shared by tools/pretrain.py and tools/lincls.py

INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


def run_cli(prog, fn):
    """Call ``fn()``; bad input becomes one line ``prog: error: ...`` on stderr and exit code 2.

    Errors raised inside processes started by ``launch`` arrive as a traceback text; its last line
    (``ValueError: ...``) is reported the same way.
    """
    try:
        fn()
    except INPUT_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except torch.multiprocessing.ProcessRaisedException as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "a worker process failed"
        print(f"{prog}: error: {last}", file=sys.stderr)
        names = tuple(t.__name__ for t in INPUT_ERRORS) + ("UnsafeCheckpointError",)
        sys.exit(2 if last.split(":", 1)[0].split(".")[-1] in names else 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
