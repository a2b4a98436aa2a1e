"""A trainer class in every process: :func:`launch_training` (the run folder's lock, config check
and stale-file clean-up first) and the per-process :func:`train_worker`.
"""

import functools
import logging
import os
import signal

from moco.utils import file_io
from moco.utils.cli import Interrupted
from moco.utils.launch import launch_processes, setup_process, signals_to_children

logger = logging.getLogger(__name__)


def launch_training(trainer_cls, cfg, spec, resume=None):
    """``trainer_cls(cfg, resume).train()`` in every process of ``spec``; returns its summary when
    in-process. ``trainer_cls.check_launch(cfg, world_size)`` runs first, before any process starts.

    The first process of the run (this one on machine 0; rank 0 under torchrun) holds OUTPUT_DIR's
    lock for the whole run (moco.utils.file_io.locked_new_run: a failed start leaves nothing), refuses
    a folder of another config unless resuming, and removes temporary files a killed run left there.
    """
    trainer_cls.check_launch(cfg, spec.world_size)
    start = functools.partial(
        launch_processes,
        train_worker,
        spec,
        (trainer_cls, cfg, resume),
        timeout_minutes=cfg.DIST.TIMEOUT_MINUTES,
    )
    file_io.check_output_dir(cfg.OUTPUT_DIR)
    first = os.environ.get("RANK", "0") == "0" if spec.from_env else spec.machine_rank == 0
    if not first:
        return start()
    with file_io.locked_new_run(cfg.OUTPUT_DIR):  # a failed start leaves no folder
        if not resume:
            file_io.check_folder_config(cfg.OUTPUT_DIR, cfg.dump(), "pass --resume auto")
            _check_no_earlier_run(cfg.OUTPUT_DIR)
        for name in file_io.remove_stale_temp_files(cfg.OUTPUT_DIR):
            logger.warning("removed %s: a partial write of an earlier, killed run", name)
        if spec.from_env or spec.world_size == 1:  # training runs here: its SignalStop hook
            return start()
        received = []
        with signals_to_children(received):
            start()
        if received:  # the workers stopped with a checkpoint (their KeyboardInterrupt ends quietly)
            from moco.checkpoint import read_last_checkpoint

            raise Interrupted(
                f"stopped by {signal.Signals(received[0]).name}; checkpoint "
                f"{read_last_checkpoint(cfg.OUTPUT_DIR)}; to continue, rerun the same "
                "command with --resume auto",
                received[0],
            )
        return None


def _check_no_earlier_run(folder):
    """A fresh start never writes over a finished or interrupted run of the same configuration
    (its checkpoints, metrics.json, TensorBoard events)."""
    from moco.checkpoint import read_last_checkpoint

    last = read_last_checkpoint(folder)
    if last is not None:
        raise ValueError(
            f"OUTPUT_DIR {folder} holds a run (last checkpoint {last}); continue it "
            "with --resume auto, or give another --output-dir"
        )


def train_worker(trainer_cls, cfg, resume=None):
    """Per-process entry point: set up logging and seeds, build the trainer, train."""
    setup_process(cfg)
    trainer = trainer_cls(cfg, resume=resume)
    return trainer.train()
