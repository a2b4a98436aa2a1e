"""Hooks every trainer uses (pretraining and detection alike).

- :class:`SignalStop`: SIGTERM / SIGINT end the run at the next step boundary after a checkpoint.
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


class SignalStop(HookBase):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) stop training at the next step boundary.

    The handler only records the signal; after the step, every process agrees (a signal may reach
    one rank only), ``save()`` writes a checkpoint (collective; returns its path) and
    :class:`moco.utils.cli.Interrupted` ends the run with one line naming it and ``resume_hint``. A second
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
