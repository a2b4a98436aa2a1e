"""Hooks every trainer uses (pretraining and detection alike).

- :class:`SignalStop`: SIGTERM / SIGINT end the run at the next step boundary after a checkpoint
  (at once after the last step); :func:`stop_requested` for long work between boundaries.
- :class:`AtomicJSONWriter` / :func:`build_writers`: metrics.json written atomically, console
  with ETA, TensorBoard.
"""

import logging
import os
import signal
import threading

from detectron2.engine.hooks import HookBase
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from moco.utils.cli import Interrupted
from moco.utils.file_io import AtomicAppendFile
from moco.utils.run_files import METRICS_FILE

logger = logging.getLogger(__name__)


_stop = {"signal": None}  # what the installed SignalStop's handler received, not yet acted on


def stop_requested():
    """The signal (SIGTERM / SIGINT) a :class:`SignalStop` hook of this process received and has
    not acted on yet, else None: work that runs long between step boundaries (the replay of a
    data order on resume, detection.data.order) checks it and stops."""
    return _stop["signal"]


class SignalStop(HookBase):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) stop training at the next step boundary.

    The handler only records the signal; after the step, every process agrees (a signal may reach
    one rank only), ``save()`` writes a checkpoint (collective; returns its path) and
    :class:`moco.utils.cli.Interrupted` ends the run with one line naming it and ``resume_hint``. A second
    SIGINT while waiting for the step stops at once. After the last step (its checkpoint written
    by the hooks before this one, which must be last) no step boundary comes: a signal during the
    final evaluation or the other hooks' ``after_train`` stops the run at once, with the same
    line, so a stage that was stopped never counts as finished. Handlers can only be set in the
    main thread; elsewhere the hook does nothing. The previous handlers are restored after
    training.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, save, resume_hint):
        self._save, self._hint = save, resume_hint
        self._received, self._previous, self._trained = None, {}, False

    def _handle(self, signum, frame):
        if self._trained:  # the final evaluation: no step boundary to wait for
            self._restore()
            raise Interrupted(
                f"stopped by {signal.Signals(signum).name} after the last iteration "
                f"({self.trainer.max_iter}), during the final evaluation; the training's "
                f"checkpoint is complete; to evaluate it, {self._hint}",
                signum,
            )
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._received = _stop["signal"] = signum
        logger.warning(
            "%s received: stopping after this step, with a checkpoint", signal.Signals(signum).name
        )

    def before_train(self):
        # a resume with nothing left to train goes straight to the final evaluation
        self._trained = self.trainer.iter >= self.trainer.max_iter
        self._received, _stop["signal"] = None, None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def after_step(self):
        received = self._received or 0
        if comm.get_world_size() > 1:
            received = max(comm.all_gather(received))
        if not received:
            # the last step: every earlier hook has saved what it saves at the end
            self._trained = self.trainer.iter + 1 >= self.trainer.max_iter
            return
        path = self._save()
        raise Interrupted(
            f"stopped by {signal.Signals(received).name} after iteration "
            f"{self.trainer.iter + 1}; checkpoint {path}; to continue, {self._hint}",
            received,
        )

    def after_train(self):
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous, _stop["signal"] = {}, None


class AtomicJSONWriter(JSONWriter):
    """Detectron2's ``JSONWriter`` (same lines, same resume behaviour: it appends) whose file is
    replaced atomically on each write, so a signal or a full disk never leaves a torn line."""

    def __init__(self, json_file, window_size=20):
        super().__init__(json_file, window_size)
        self._file_handle.close()  # the append-mode handle JSONWriter opened
        self._file_handle = AtomicAppendFile(json_file)


def build_writers(output_dir, max_iter):
    """Detectron2's writers; metrics.json and TensorBoard get each logged iteration's own values.

    Their default is the median of the last 20 iterations, which a resumed run cannot reproduce
    (its window starts empty), so a resumed run's metrics.json would differ from an uninterrupted
    run's. The console printer keeps the medians.
    """
    os.makedirs(output_dir, exist_ok=True)
    return [
        CommonMetricPrinter(max_iter),
        AtomicJSONWriter(os.path.join(output_dir, METRICS_FILE), window_size=1),
        TensorboardXWriter(output_dir, window_size=1),
    ]
