"""Run folders, shared by the pipeline's stages and the ablation runs.

- a folder's *key*: a short hash of what decides its result (:func:`stage_key`), so a changed
  input gets a new folder;
- *finished* markers: a JSON file written last (the pipeline's ``stage.json``, an ablation run's
  ``pretrain_summary.json``); :func:`read_marker` reads one, None while the run is unfinished;
- reuse and resume: a finished folder is reused, an unfinished one resumes from its last
  checkpoint (:class:`Stages`); a folder made by another configuration is an error
  (:func:`check_same_config`);
- :func:`fresh_loggers`: Detectron2's ``setup_logger`` caches its handlers and log streams per
  output folder; in several runs of one process they would pile up (every line printed once more
  per run, later runs' lines copied into earlier runs' log.txt): each run's are dropped after it.
"""

import contextlib
import hashlib
import json
import logging
import os
import time

from moco.config import load_cfg
from moco.file_io import atomic_write_json

STAGE_FILE = "stage.json"
_LOGGERS = ("moco", "detectron2", "fvcore", "d2")


def stage_key(material):
    """Short hash of what decides a stage's result (JSON-serialisable)."""
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def read_marker(path):
    """The JSON of a finished-marker file, or None when it is missing or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def check_same_config(cfg, out):
    """A run folder is reused or resumed only by the configuration that made it."""
    saved = os.path.join(out, "config.yaml")
    if not os.path.isfile(saved):
        return
    try:
        same = load_cfg(saved).dump() == cfg.dump()
    except ValueError:
        same = False
    if not same:
        raise ValueError(
            f"{out} holds a run of another configuration ({saved} differs from this "
            "sweep's); use another OUTPUT_DIR (--output-dir) or remove that folder"
        )


@contextlib.contextmanager
def fresh_loggers():
    """Drop the handlers (and Detectron2's cached handlers and streams) a run added to the
    toolkit's loggers, when it ends."""
    from detectron2.utils.logger import _cached_log_stream, setup_logger

    before = {n: list(logging.getLogger(n).handlers) for n in _LOGGERS}
    try:
        yield
    finally:
        for n in _LOGGERS:
            lg = logging.getLogger(n)
            for h in [h for h in lg.handlers if h not in before[n]]:
                lg.removeHandler(h)
                h.close()
        setup_logger.cache_clear()
        _cached_log_stream.cache_clear()  # its streams were closed with the handlers


class Stages:
    """Runs named stages under ``run_dir``, reusing finished ones, and prints progress."""

    def __init__(self, run_dir, total):
        self.run_dir, self.total, self.done = run_dir, total, 0
        self.records = []

    def run(self, name, material, fn):
        """``fn(out_dir, resume) -> outputs`` unless ``<name>-<key>/stage.json`` exists."""
        key = stage_key(material)
        out = os.path.join(self.run_dir, f"{name}-{key}")
        marker = os.path.join(out, STAGE_FILE)
        self.done += 1
        head = f"[{self.done}/{self.total}] {name}"
        record = read_marker(marker)
        if record is not None:
            print(f"{head}: done earlier, reusing {out}", flush=True)
            record["reused"] = True
        else:
            resume = os.path.isdir(out)
            print(f"{head}: {'resuming' if resume else 'running'} in {out}", flush=True)
            os.makedirs(out, exist_ok=True)
            start = time.perf_counter()
            with fresh_loggers():
                outputs = fn(out, resume)
            record = {"name": name, "key": key, "material": material, "outputs": outputs,
                      "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
            atomic_write_json(marker, record)
            print(f"{head}: finished in {record['seconds']:.0f} s", flush=True)
            record["reused"] = False
        self.records.append(record)
        return record["outputs"]
