"""Pretraining hooks on Detectron2's hook system: per-epoch LR, epoch checkpoints, kNN monitor.

- LR: the official ``adjust_learning_rate`` multiplier of every epoch (step: x GAMMA at each epoch
  in STEPS; cosine: ``0.5 * (1 + cos(pi * epoch / EPOCHS))``), held constant within the epoch, as
  an fvcore ``MultiStepParamScheduler`` driven by Detectron2's ``LRMultiplier`` /
  ``hooks.LRScheduler``.
- :class:`EpochCheckpointer`: Detectron2's ``PeriodicCheckpointer`` writes its own format
  non-atomically, so checkpoints in the official format go through this hook.
- kNN monitor: Detectron2's ``EvalHook`` running :func:`moco.evaluation.knn.knn_evaluate`; the results are
  the scalars ``knn_top1`` / ``knn_top5`` (backbone features) and ``knn_head_top1`` /
  ``knn_head_top5`` of the event storage (metrics.json, TensorBoard).
- :class:`KeyEncoderDrift`: how far the momentum (key) encoder has moved from its start and how far
  it is from the query encoder, per epoch (scalars ``key_drift_start`` / ``key_gap_query``): with
  m = 0.9999 it moves only ``1 - m^t`` of the way in t steps, so a short run's keys stay those of
  the random network (the momentum ablation's explanation, measured, not assumed).
- :class:`SignalStop`: SIGTERM / SIGINT end the run at the next step boundary after a checkpoint
  (pretraining and detection alike); :class:`AtomicJSONWriter`: metrics.json written atomically.
"""

import logging
import os
import signal

import torch
from detectron2.engine import hooks
from detectron2.engine.hooks import EvalHook, HookBase
from detectron2.utils import comm

from moco import checkpoint as ckpt_lib
from moco.data.datasets import (
    build_eval_loader,
    build_labeled_datasets,
    folder_checks,
    knn_bank,
    knn_data,
)
from moco.evaluation.knn import knn_evaluate
from moco.utils.hooks import SignalStop, build_writers

logger = logging.getLogger(__name__)


class EpochCheckpointer(HookBase):
    """Calls ``trainer.save_checkpoint(epoch)`` every ``period`` epochs and after the last one.

    Runs on every process (the RNG states of all ranks are gathered); only rank 0 writes.
    ``period`` 0 saves only the last epoch.
    """

    def __init__(self, iters_per_epoch, period):
        self.iters_per_epoch, self.period = int(iters_per_epoch), int(period)

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if next_iter % self.iters_per_epoch:
            return
        epoch = next_iter // self.iters_per_epoch
        if next_iter >= self.trainer.max_iter or (self.period > 0 and epoch % self.period == 0):
            self.trainer.save_checkpoint(epoch)


class KNNMonitor(EvalHook):
    """Detectron2's EvalHook, plus an optional measurement before the first step (epoch 0)."""

    def __init__(self, eval_period, eval_function, at_start=False):
        super().__init__(eval_period, eval_function)
        self._at_start = at_start

    def before_train(self):
        if self._at_start and self.trainer.iter == 0:
            self._do_eval()


KEY_ENCODER_INIT = "key_encoder_init.pth"  # the key encoder's parameters before the first step


def _flat(params):
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in params])


class KeyEncoderDrift(HookBase):
    """Per epoch (and before the first step): the key encoder's relative distance from its start,
    ``|k - k0| / |k0|``, and from the query encoder, ``|k - q| / |q|`` (parameters, not buffers).

    Appended to ``trainer.drift_history`` (the run summary's ``key_encoder_drift``) and put in the
    event storage (metrics.json). ``k0`` is saved once in OUTPUT_DIR/:data:`KEY_ENCODER_INIT` so a
    resumed run measures from the same start.
    """

    def __init__(self, model, iters_per_epoch, output_dir):
        self.model, self.iters_per_epoch = model, int(iters_per_epoch)
        self.path = os.path.join(output_dir, KEY_ENCODER_INIT)
        self.start = None

    def before_train(self):
        if self.trainer.iter == 0:
            self.start = _flat(self.model.encoder_k.parameters())
            if comm.is_main_process():
                from moco.utils.file_io import atomic_save

                atomic_save({"params": self.start}, self.path)
            self._measure(0)
        elif os.path.isfile(self.path):
            self.start = ckpt_lib.load_checkpoint(self.path)["params"]
        else:
            logger.warning(
                "%s missing: the key encoder's drift from its start is not measured", self.path
            )

    def after_step(self):
        done = self.trainer.iter + 1
        if done % self.iters_per_epoch == 0:
            self._measure(done)

    def _measure(self, done):
        k = _flat(self.model.encoder_k.parameters())
        q = _flat(self.model.encoder_q.parameters())
        entry = {
            "epoch": done // self.iters_per_epoch,
            "iteration": done,
            "key_gap_query": float((k - q).norm() / q.norm().clamp_min(1e-12)),
            "key_drift_start": None,
        }
        if self.start is not None and self.start.shape == k.shape:
            entry["key_drift_start"] = float(
                (k - self.start).norm() / self.start.norm().clamp_min(1e-12)
            )
        self.trainer.drift_history.append(entry)
        if comm.is_main_process():
            self.trainer.storage.put_scalars(
                **{n: v for n, v in entry.items() if n.startswith("key_") and v is not None},
                smoothing_hint=False,
            )


class _WorkersWithoutSigint:
    """``loader``, whose worker processes start with SIGINT blocked (the mask is inherited): a
    Ctrl-C, sent to the whole process group, then reaches only the training process, whose
    SignalStop ends the run after the step with a checkpoint. A worker that took it would exit
    and the evaluation end in "DataLoader worker exited unexpectedly". A signal that comes while
    blocked here is delivered when the mask is restored."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        if not self.loader.num_workers:
            return iter(self.loader)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return iter(self.loader)  # persistent workers start on the first call only
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def build_knn_hook(trainer, cfg):
    """kNN monitor every KNN.PERIOD epochs and after the last (and at start with KNN.AT_START).

    ``trainer`` provides ``encoder`` (the network scored), ``device``, ``iters_per_epoch``,
    ``completed_iters`` and ``knn_history`` (list the results are appended to). None when off.
    """
    data = knn_data(cfg)
    if cfg.KNN.DATA == "auto":  # say which way it went: the folder decided, not a setting
        if data:
            logger.info("kNN monitor on %s's train/ and val/ (KNN.DATA auto = DATA.ROOT)", data)
        else:
            logger.info(
                "kNN monitor off: KNN.DATA is auto and DATA.ROOT %s has no val/ folder (set "
                "KNN.DATA to a folder with train/<class>/ and val/<class>/ to turn it on)",
                cfg.DATA.ROOT,
            )
    if not data or cfg.KNN.PERIOD <= 0:
        return None
    train_set, val_set = build_labeled_datasets(
        data, cfg.INPUT.CROP_SIZE, "KNN.DATA (--knn-data)", **folder_checks(cfg)
    )
    num_classes = len(train_set.classes)
    train_set = knn_bank(train_set, cfg.KNN.BANK_SIZE)
    pin = trainer.device.type == "cuda"
    workers = cfg.DATALOADER.NUM_WORKERS
    train_loader = _WorkersWithoutSigint(
        build_eval_loader(train_set, cfg.KNN.BATCH_SIZE, workers, pin)
    )
    val_loader = _WorkersWithoutSigint(build_eval_loader(val_set, cfg.KNN.BATCH_SIZE, workers, pin))
    trainer.knn_num_classes = num_classes

    def evaluate():
        done = trainer.completed_iters
        res = knn_evaluate(
            trainer.encoder,
            train_loader,
            val_loader,
            num_classes,
            trainer.device,
            k=cfg.KNN.K,
            t=cfg.KNN.T,
            channels_last=cfg.MODEL.CHANNELS_LAST,
            amp=cfg.SOLVER.AMP,
        )
        epoch = (
            done // trainer.iters_per_epoch
            if done % trainer.iters_per_epoch == 0
            else done / trainer.iters_per_epoch
        )
        logger.info(
            "epoch %g: kNN top-1 %.2f%%, top-5 %.2f%% on backbone features (head: top-1 %.2f%%; "
            "chance %.2f%%; %d train / %d val)",
            epoch,
            res["top1"],
            res["top5"],
            res["head_top1"],
            100.0 / num_classes,
            len(train_set),
            len(val_set),
        )
        trainer.knn_history.append({"epoch": epoch, "iteration": done, **res})
        return {f"knn_{k}": v for k, v in res.items()}

    return KNNMonitor(cfg.KNN.PERIOD * trainer.iters_per_epoch, evaluate, cfg.KNN.AT_START)


def build_epoch_hooks(trainer, cfg):
    """The hooks of an epoch-based pretraining run (MoCo or the supervised baseline), in order.

    ``trainer`` provides ``optimizer``, ``scheduler``, ``iters_per_epoch``, ``max_iter``,
    ``save_checkpoint(epoch)``, ``save_stop_checkpoint()`` and what :func:`build_knn_hook` needs.
    """
    ret = [hooks.IterationTimer(), hooks.LRScheduler(trainer.optimizer, trainer.scheduler)]
    knn = build_knn_hook(trainer, cfg)
    if knn is not None:
        ret.append(knn)
    model = getattr(trainer, "moco", None)
    if hasattr(model, "encoder_k") and hasattr(model, "encoder_q"):  # a momentum key encoder
        ret.append(KeyEncoderDrift(model, trainer.iters_per_epoch, cfg.OUTPUT_DIR))
    ret.append(EpochCheckpointer(trainer.iters_per_epoch, cfg.SOLVER.CHECKPOINT_PERIOD))
    if comm.is_main_process():  # writers last: they see this step's kNN / lr scalars
        ret.append(
            hooks.PeriodicWriter(
                build_writers(cfg.OUTPUT_DIR, trainer.max_iter), period=cfg.LOG_PERIOD
            )
        )
    # after the writers: the step that was running when a signal came is logged before the stop
    ret.append(
        SignalStop(
            trainer.save_stop_checkpoint,
            f"rerun the same command with --resume auto (OUTPUT_DIR {cfg.OUTPUT_DIR})",
        )
    )
    return ret
