"""Pretraining hooks on Detectron2's hook system: per-epoch LR, epoch checkpoints, kNN monitor.

- LR: the official ``adjust_learning_rate`` multiplier of every epoch (step: x GAMMA at each epoch
  in STEPS; cosine: ``0.5 * (1 + cos(pi * epoch / EPOCHS))``), held constant within the epoch, as
  an fvcore ``MultiStepParamScheduler`` driven by Detectron2's ``LRMultiplier`` /
  ``hooks.LRScheduler``.
- :class:`EpochCheckpointer`: Detectron2's ``PeriodicCheckpointer`` writes its own format
  non-atomically, so checkpoints in the official format go through this hook.
- kNN monitor: Detectron2's ``EvalHook`` running :func:`moco.knn.knn_evaluate`; the results are
  the scalars ``knn_top1`` / ``knn_top5`` (backbone features) and ``knn_head_top1`` /
  ``knn_head_top5`` of the event storage (metrics.json, TensorBoard).
- :class:`SignalStop`: SIGTERM / SIGINT end the run at the next step boundary after a checkpoint
  (pretraining and detection alike); :class:`AtomicJSONWriter`: metrics.json written atomically.
"""

import logging
import math
import os
import signal
import threading

from detectron2.engine import hooks
from detectron2.engine.hooks import EvalHook, HookBase
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from fvcore.common.param_scheduler import MultiStepParamScheduler

from moco.cli import Interrupted
from moco.data import build_eval_loader, build_labeled_datasets, folder_checks, knn_bank
from moco.file_io import AtomicAppendFile
from moco.knn import knn_evaluate

logger = logging.getLogger(__name__)


def epoch_lr_factors(epochs, steps=(), gamma=0.1, cos=False):
    """Multiplier of the base LR for each epoch 0..epochs-1 (official main_moco.py formula)."""
    if cos:
        return [0.5 * (1.0 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    return [gamma ** sum(e >= s for s in steps) for e in range(epochs)]


class _EpochMultiStep(MultiStepParamScheduler):
    # fvcore adds 1e-6 to the training fraction before picking the epoch; with ~1e6 iterations
    # (200 ImageNet epochs) that moves each epoch boundary one iteration early. 1e-9 keeps float
    # rounding covered without shifting boundaries for any realistic iteration count.
    WHERE_EPSILON = 1e-9


def build_lr_multiplier(cfg):
    """fvcore ParamScheduler over the training fraction, constant within each epoch."""
    s = cfg.SOLVER
    factors = epoch_lr_factors(s.EPOCHS, tuple(s.STEPS), s.GAMMA, s.COS)
    milestones = [e for e in range(1, s.EPOCHS) if factors[e] != factors[e - 1]]
    values = [factors[0]] + [factors[e] for e in milestones]
    return _EpochMultiStep(values, num_updates=s.EPOCHS, milestones=milestones)


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


class SignalStop(HookBase):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) stop training at the next step boundary.

    The handler only records the signal; after the step, every process agrees (a signal may reach
    one rank only), ``save()`` writes a checkpoint (collective; returns its path) and
    :class:`moco.cli.Interrupted` ends the run with one line naming it and ``resume_hint``. A second
    SIGINT while waiting for the step stops at once. Handlers can only be set in the main thread;
    elsewhere the hook does nothing. The previous handlers are restored after training.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, save, resume_hint):
        self._save, self._hint = save, resume_hint
        self._received, self._previous = None, {}

    def _handle(self, signum, frame):
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = signum
        logger.warning(
            "%s received: stopping after this step, with a checkpoint", signal.Signals(signum).name
        )

    def before_train(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def after_step(self):
        received = self._received or 0
        if comm.get_world_size() > 1:
            received = max(comm.all_gather(received))
        if not received:
            return
        path = self._save()
        raise Interrupted(
            f"stopped by {signal.Signals(received).name} after iteration "
            f"{self.trainer.iter + 1}; checkpoint {path}; to continue, {self._hint}",
            received,
        )

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class AtomicJSONWriter(JSONWriter):
    """Detectron2's ``JSONWriter`` (same lines, same resume behaviour: it appends) whose file is
    replaced atomically on each write, so a signal or a full disk never leaves a torn line."""

    def __init__(self, json_file, window_size=20):
        super().__init__(json_file, window_size)
        self._file_handle.close()  # the append-mode handle JSONWriter opened
        self._file_handle = AtomicAppendFile(json_file)


class KNNMonitor(EvalHook):
    """Detectron2's EvalHook, plus an optional measurement before the first step (epoch 0)."""

    def __init__(self, eval_period, eval_function, at_start=False):
        super().__init__(eval_period, eval_function)
        self._at_start = at_start

    def before_train(self):
        if self._at_start and self.trainer.iter == 0:
            self._do_eval()


def build_knn_hook(trainer, cfg):
    """kNN monitor every KNN.PERIOD epochs and after the last (and at start with KNN.AT_START).

    ``trainer`` provides ``encoder`` (the network scored), ``device``, ``iters_per_epoch``,
    ``completed_iters`` and ``knn_history`` (list the results are appended to). None when off.
    """
    if not cfg.KNN.DATA or cfg.KNN.PERIOD <= 0:
        return None
    train_set, val_set = build_labeled_datasets(
        cfg.KNN.DATA, cfg.INPUT.CROP_SIZE, "KNN.DATA (--knn-data)", **folder_checks(cfg)
    )
    num_classes = len(train_set.classes)
    train_set = knn_bank(train_set, cfg.KNN.BANK_SIZE)
    pin = trainer.device.type == "cuda"
    workers = cfg.DATALOADER.NUM_WORKERS
    train_loader = build_eval_loader(train_set, cfg.KNN.BATCH_SIZE, workers, pin)
    val_loader = build_eval_loader(val_set, cfg.KNN.BATCH_SIZE, workers, pin)
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


def build_writers(output_dir, max_iter):
    """Detectron2's writers; metrics.json and TensorBoard get each logged iteration's own values.

    Their default is the median of the last 20 iterations, which a resumed run cannot reproduce
    (its window starts empty), so a resumed run's metrics.json would differ from an uninterrupted
    run's. The console printer keeps the medians.
    """
    os.makedirs(output_dir, exist_ok=True)
    return [
        CommonMetricPrinter(max_iter),
        AtomicJSONWriter(os.path.join(output_dir, "metrics.json"), window_size=1),
        TensorboardXWriter(output_dir, window_size=1),
    ]
