"""Run folders, shared by the pipeline's stages and the ablation runs.

- a folder's *key*: a short hash of what decides its result (:func:`stage_key`), so a changed
  input gets a new folder;
- *finished* markers: a JSON file written last (the pipeline's ``stage.json``, an ablation run's
  ``pretrain_summary.json``); :func:`read_marker` reads one, None while the run is unfinished;
- reuse and resume: a finished folder is reused, an unfinished one resumes from its last
  checkpoint (:class:`Stages`); a folder made by another configuration is an error
  (:func:`check_same_config`);
- parallel stages: :meth:`Stages.run_many` runs independent stages side by side, each in its own
  process with its own share of the CPU threads (on a 2-core CPU two single-thread processes do
  more work than one two-thread process: measured, docs/RESULTS.md);
- :func:`fresh_loggers`: Detectron2's ``setup_logger`` caches its handlers and log streams per
  output folder; in several runs of one process they would pile up (every line printed once more
  per run, later runs' lines copied into earlier runs' log.txt): each run's are dropped after it.
"""

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import time

from moco.config import load_cfg
from moco.utils.cli import RunFailed
from moco.utils.file_io import atomic_write_json
from moco.utils.run_files import CONFIG_FILE, STAGE_FILE

_LOGGERS = ("moco", "experiments", "detectron2", "fvcore", "d2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO_MARK = "$REPO/"


def portable(obj, root=REPO_ROOT):
    """``obj`` (JSON-serialisable) with every path under ``root`` written ``$REPO/...``, so a
    repository copied or moved elsewhere keeps its stage keys and reuses its finished stages."""
    prefix = json.dumps(root.rstrip(os.sep) + os.sep)[1:-1]  # as it appears inside JSON strings
    return json.loads(json.dumps(obj, sort_keys=True, default=str).replace(prefix, _REPO_MARK))


def localize(obj, root=REPO_ROOT):
    """The inverse of :func:`portable`: ``$REPO/...`` paths under this copy's ``root``."""
    prefix = json.dumps(root.rstrip(os.sep) + os.sep)[1:-1]
    return json.loads(json.dumps(obj).replace(_REPO_MARK, prefix))


def stage_key(material, root=REPO_ROOT):
    """Short hash of what decides a stage's result (JSON-serialisable), paths under ``root``
    taken relative to it."""
    blob = json.dumps(portable(material, root), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def listing_fingerprint(folder):
    """sha256 of the files under ``folder`` by relative path and size: a user image folder's
    identity in stage keys. Reading every image would cost as much as a start-up scan; a set
    regenerated or edited in place changes names or sizes. Relative paths: a copied folder keeps
    its fingerprint. Hidden files (the scan cache, locks, temporary files) are not data."""
    from moco.data.checks import walk_inside

    entries = []
    for dirpath, dirnames, filenames in walk_inside(folder, folder, set()):
        dirnames.sort()
        for name in filenames:
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            try:
                size = os.path.getsize(path)
            except OSError:  # a dangling link: listed, so its repair changes the fingerprint
                size = -1
            entries.append((os.path.relpath(path, folder), size))
    blob = json.dumps(sorted(entries)).encode()
    return {"files": len(entries), "sha256": hashlib.sha256(blob).hexdigest()}


def resolve_jobs(jobs, what="JOBS"):
    """Lanes of :meth:`Stages.run_many`: ``jobs`` if >= 1, 0 ("auto") = one per available core."""
    if jobs == 0:
        from moco.utils.launch import available_cores  # torch: not at import (tools' --help)

        return available_cores()
    if jobs < 0:
        raise ValueError(f"{what} must be >= 1, or 0 for auto (one per available core), got {jobs}")
    return int(jobs)


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
    saved = os.path.join(out, CONFIG_FILE)
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


def last_line(error, default):
    """The last non-empty line of ``error``'s message (a job's traceback ends with its cause)."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else default


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


@contextlib.contextmanager
def _console_to(path):
    """Send this process's stdout and stderr (file descriptors too) to ``path`` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _die_with_parent(parent):
    """Linux: this process gets SIGTERM when ``parent`` dies. A killed (SIGTERM, SIGKILL) sweep or
    pipeline otherwise leaves its lanes training on, orphaned, in run folders that the next start
    resumes in a lane of its own: two writers of one checkpoint."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if not _parent_alive(parent):  # it died before the line above
        os._exit(1)


def _parent_alive(parent):
    """Whether ``parent`` still runs this lane's sweep. The kernel sends PR_SET_PDEATHSIG when
    the parent's main thread exits, before the whole process has (getppid() still names it while
    its other threads end); its main thread is then a zombie in /proc."""
    if os.getppid() != parent:
        return False
    try:
        with open(f"/proc/{parent}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:  # gone, or no /proc (not Linux: getppid() is the whole check)
        return not sys.platform.startswith("linux")


def _next_task(tasks, parent):
    """The lane's next task, or None. PR_SET_PDEATHSIG's SIGTERM ends a training stage gracefully
    (SignalStop: a checkpoint, then a normal return), and a dead parent's queue may block
    forever: an orphaned lane must neither start the next queued stage nor wait on."""
    while True:
        if not _parent_alive(parent):
            os._exit(1)
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            continue


def _lane(tasks, results, threads, parent):
    """A worker process of :meth:`Stages.run_many`: runs stages from ``tasks`` until None.

    One process runs several stages, so Python, torch and Detectron2 are imported once per lane.
    """
    import traceback

    _die_with_parent(parent)
    import torch

    torch.set_num_threads(threads)
    for i, fn, out, resume, log in iter(functools.partial(_next_task, tasks, parent), None):
        results.put((i, "started", None))
        try:
            with _console_to(log), fresh_loggers():
                outputs = fn(out, resume)
        except BaseException as e:  # reported to the parent, which stops the run
            with open(log, "a") as f:
                traceback.print_exc(file=f)
            results.put((i, "failed", f"{type(e).__name__}: {' '.join(str(e).split())}"))
            return
        results.put((i, "finished", outputs))


class StageFailed(RunFailed):
    """A stage run by :meth:`Stages.run_many` failed; the message names it and its console log
    (the tools print it as one line, exit code 1)."""


class Stages:
    """Runs named stages under ``run_dir``, reusing finished ones, and prints progress."""

    def __init__(self, run_dir, total, root=REPO_ROOT):
        self.run_dir, self.total, self.done = run_dir, total, 0
        self.root = root  # paths under it are keyed and recorded relative to it (portable)
        self.records = []

    def _start(self, name, material):
        """(head, out, resume, record): record is the finished marker's, else None."""
        key = stage_key(material, self.root)
        out = os.path.join(self.run_dir, f"{name}-{key}")
        self.done += 1
        head = f"[{self.done}/{self.total}] {name}"
        if os.path.lexists(out) and not os.path.isdir(out):
            raise NotADirectoryError(
                f"{out} is a file where the folder of stage {name} belongs; move or remove it"
            )
        record = self._record(os.path.join(out, STAGE_FILE), name, key)
        if record is not None:
            print(f"{head}: done earlier, reusing {out}", flush=True)
            record = localize(record, self.root)
            record["reused"], record["folder"] = True, out
            self.records.append(record)
        return head, out, os.path.isdir(out), key, record

    @staticmethod
    def _record(path, name, key):
        """The stage's finished record at ``path``, None when there is none; a record that is
        not this stage's (another folder's ``stage.json`` copied here, a hand-edited one) would
        put another stage's results in this one's place: one ValueError naming the file."""
        if not os.path.lexists(path):
            return None
        record = read_marker(path)
        if not isinstance(record, dict):
            why = "not valid JSON" if record is None else f"a {type(record).__name__}, not a record"
        elif record.get("name") != name or record.get("key") != key:
            why = (
                f"the record of stage {record.get('name')!r} key {record.get('key')!r}, not of "
                f"{name!r} key {key!r}"
            )
        elif not isinstance(record.get("outputs"), dict):
            why = f"its outputs are {json.dumps(record.get('outputs'))[:40]}, not a record"
        else:
            return record
        raise ValueError(f"{path}: {why}; remove {os.path.dirname(path)} to run stage {name} again")

    def _finish(self, head, name, key, material, out, outputs, seconds):
        record = {
            "name": name,
            "key": key,
            "material": material,
            "outputs": outputs,
            "seconds": round(seconds, 1),
        }
        atomic_write_json(os.path.join(out, STAGE_FILE), portable(record, self.root))
        print(f"{head}: finished in {record['seconds']:.0f} s", flush=True)
        record["reused"], record["folder"] = False, out
        self.records.append(record)
        return outputs

    def finished(self, name, material):
        """The stage's finished record (added to ``records``), None when it has not finished;
        runs nothing (a report of a running or stopped sweep)."""
        key = stage_key(material, self.root)
        out = os.path.join(self.run_dir, f"{name}-{key}")
        record = self._record(os.path.join(out, STAGE_FILE), name, key)
        if record is not None:
            record = localize(record, self.root)
            record["reused"], record["folder"] = True, out
            self.records.append(record)
        return record

    def run(self, name, material, fn):
        """``fn(out_dir, resume) -> outputs`` unless ``<name>-<key>/stage.json`` exists."""
        head, out, resume, key, record = self._start(name, material)
        if record is not None:
            return record["outputs"]
        print(f"{head}: {'resuming' if resume else 'running'} in {out}", flush=True)
        os.makedirs(out, exist_ok=True)
        start = time.perf_counter()
        with fresh_loggers():
            outputs = fn(out, resume)
        return self._finish(head, name, key, material, out, outputs, time.perf_counter() - start)

    def _enqueue(self, stages, results, new, then, dispatch):
        """Append ``new`` stages to ``stages``. A finished one is reused at once (its ``then`` may
        add more); each other one gets its folder and goes to ``dispatch(i, head, out, resume,
        key)``: a lane's task queue or a submitted job."""
        while new:
            i = len(stages)
            stages.append(new.pop(0))
            name, material, _ = stages[i]
            head, out, resume, key, record = self._start(name, material)
            if record is not None:
                results[i] = record["outputs"]
                new += then(i, results[i])
                continue
            os.makedirs(out, exist_ok=True)
            dispatch(i, head, out, resume, key)

    def run_many(self, stages, jobs=1, threads=None, then=None, submit=None):
        """Run ``[(name, material, fn), ...]`` (independent stages), ``jobs`` at a time.

        ``then(i, outputs)``, if given, is called in this process when stage ``i`` finishes (or is
        reused) and returns the stages that depended on it, which join the queue at once: a lane
        never waits for an unrelated stage. Stages are numbered in the order they are added.

        ``jobs == 1``: one after the other in this process, as :meth:`run`. Otherwise ``jobs``
        worker processes (spawned) take the unfinished stages in queue order, each with ``threads``
        torch threads (default: cores // jobs) and each stage's console in
        ``<stage folder>/console.log``; ``fn`` must then be picklable (a module-level function or
        a ``functools.partial`` of one). If a stage fails, the workers are stopped (finished
        stages are kept, an interrupted one resumes on the next run) and :class:`StageFailed`
        names it. Returns the outputs of every stage, added ones included, in order.

        ``submit(name, fn, out, resume) -> job`` (a submitit job; ``jobs`` and ``threads`` unused):
        each unfinished stage is submitted as a job as soon as the stages it depends on have
        finished (their ``then``), and recorded when its job finishes; see :meth:`_submitted`.
        """
        then = then or (lambda i, outputs: [])
        if submit is not None:
            return self._submitted(list(stages), then, submit)
        if jobs <= 1:
            stages, results = list(stages), []
            while len(results) < len(stages):
                results.append(self.run(*stages[len(results)]))
                stages += then(len(results) - 1, results[-1])
            return results
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        initial, stages = list(stages), []
        results, pending, started = {}, {}, {}
        ctx = multiprocessing.get_context("spawn")
        tasks, messages = ctx.Queue(), ctx.Queue()
        lanes = []

        def dispatch(i, head, out, resume, key):
            name, material, fn = stages[i]
            pending[i] = (name, material, fn, head, out, resume, key)
            tasks.put((i, fn, out, resume, os.path.join(out, "console.log")))
            if len(lanes) < jobs:
                lane = ctx.Process(
                    target=_lane,
                    args=(tasks, messages, threads, os.getpid()),
                    name=f"lane{len(lanes)}",
                )
                lanes.append(lane)
                lane.start()

        def add(new):
            self._enqueue(stages, results, new, then, dispatch)

        try:
            add(initial)
            while len(results) < len(stages):
                try:
                    i, event, payload = messages.get(timeout=5)
                except queue.Empty:
                    dead = [p for p in lanes if not p.is_alive() and p.exitcode != 0]
                    if dead:
                        running = ", ".join(pending[i][0] for i in started) or "no stage"
                        raise StageFailed(
                            f"a worker process died (exit code {dead[0].exitcode}) "
                            f"while running {running}"
                        ) from None
                    continue
                name, material, fn, head, out, resume, key = pending[i]
                log = os.path.join(out, "console.log")
                if event == "started":
                    started[i] = time.perf_counter()
                    print(
                        f"{head}: {'resuming' if resume else 'running'} in {out} (worker "
                        f"process, {threads} thread(s); console: {log})",
                        flush=True,
                    )
                elif event == "failed":
                    raise StageFailed(f"stage {name} failed: {payload} (see {log})")
                else:
                    seconds = time.perf_counter() - started.pop(i)
                    results[i] = self._finish(head, name, key, material, out, payload, seconds)
                    add(then(i, results[i]))
        finally:
            for _ in lanes:
                tasks.put(None)
            for lane in lanes:
                if lane.is_alive() and len(results) < len(stages):
                    lane.terminate()
                lane.join()
        return [results[i] for i in range(len(stages))]

    def _submitted(self, initial, then, submit, poll=2.0):
        """:meth:`run_many` with each unfinished stage a job of ``submit``. A dependent stage is
        submitted when its dependency's job has finished: its key hashes that job's outputs. If a
        job fails, the others are cancelled (finished stages are kept, an interrupted one resumes
        on the next run) and :class:`StageFailed` names its log."""
        stages, results, running = [], {}, {}

        def dispatch(i, head, out, resume, key):
            name, _, fn = stages[i]
            job = submit(name, fn, out, resume)
            print(
                f"{head}: submitted job {job.job_id} ({'resuming' if resume else 'running'} "
                f"in {out}; log: {job.paths.stdout})",
                flush=True,
            )
            running[i] = (job, head, key, out, time.perf_counter())

        def add(new):
            self._enqueue(stages, results, new, then, dispatch)

        try:
            add(initial)
            while running:
                done = [i for i, (job, *_) in running.items() if job.done()]
                if not done:
                    time.sleep(poll)
                for i in done:
                    job, head, key, out, start = running.pop(i)
                    name, material, _ = stages[i]
                    try:
                        outputs = job.result()
                    except Exception as e:
                        raise StageFailed(
                            f"stage {name} failed in job {job.job_id}: "
                            f"{last_line(e, type(e).__name__)} (see {job.paths.stderr})"
                        ) from None
                    seconds = time.perf_counter() - start
                    results[i] = self._finish(head, name, key, material, out, outputs, seconds)
                    add(then(i, results[i]))
        finally:
            for job, *_ in running.values():
                job.cancel(check=False)
        return [results[i] for i in range(len(stages))]
