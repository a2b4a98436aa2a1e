"""File I/O: atomic writes (a temporary file beside the target, fsync, ``os.replace``; a set of
files that belong together all written before any is renamed: :func:`atomic_write_files`), and
the run folder's lock.

A reader sees either the old file or the complete new one, never a torn write; an ``OSError``
(e.g. a full disk) names the file and says the previous one is unchanged. Used for checkpoints,
summaries, configs, reports, converted weights and metrics.json (:class:`AtomicAppendFile`) alike.
A temporary file left by a killed writer is removed by :func:`remove_stale_temp_files`.

:func:`run_folder_lock`: one run per output folder (``fcntl.flock`` on ``OUTPUT_DIR/.lock``, held
for the run; the kernel drops it when the holder dies, so a killed run never leaves it stuck).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile

from moco.utils.run_files import CONFIG_FILE, METRICS_FILE

_TMP_SUFFIX = ".tmp"
# what atomic_write's mkstemp names look like: ".<target>.<8 random characters>.tmp"
_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
LOCK_FILE = ".lock"
# a run folder holding any of these holds a run that started (a checkpoint pointer, logged steps)
STARTED_FILES = ("last_checkpoint", METRICS_FILE)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem: the replace is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path, write):
    """A complete, fsync'ed temporary file beside ``path`` holding what ``write(f)`` wrote; its
    name. On failure the temporary file is removed and an OSError names ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared
    except BaseException as e:
        _remove(tmp)
        _name_the_file(e, path)
        raise
    return tmp


def _remove(tmp):
    try:
        os.remove(tmp)
    except FileNotFoundError:
        pass


def _name_the_file(e, path):
    if isinstance(e, OSError):  # e.g. ENOSPC: say which file, and that the old one is intact
        raise OSError(
            e.errno,
            f"could not write {path}: {e.strerror or e}; the previous file there (if any) is "
            "unchanged",
        ) from e


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then ``os.replace`` it into place."""
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        _name_the_file(e, path)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_files(contents):
    """Write ``{path: bytes}`` as one set: every file is first written whole to a temporary file,
    and only then are they renamed into place. A failure while writing (a full disk) replaces
    none of them, so a set of files that belong together (a report's Markdown, CSV and figure)
    is never half old, half new; the OSError names the file."""
    temps = []
    try:
        for path, data in contents.items():
            temps.append((_write_temp(path, lambda f, data=data: f.write(data)), path))
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except BaseException as e:
                _name_the_file(e, path)
                raise
    finally:
        for tmp, _ in temps:
            _remove(tmp)  # only those not renamed are still there
    for folder in {os.path.dirname(os.path.abspath(p)) for p in contents}:
        _fsync_dir(folder)


class _KeepWriteError:
    """File wrapper that remembers the OSError of a failed write: torch.save turns it into an
    opaque RuntimeError ("unexpected pos ...")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def file_sha256(path):
    """A file's content hash (hex): stage keys, runs and reports name weights by what they hold,
    since a file rewritten in place keeps its path (and often its size)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_save(obj, path):
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one."""
    import torch  # here: the text and JSON writers serve tools that start without torch

    def save(f):
        out = _KeepWriteError(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise

    atomic_write(path, save)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class AtomicAppendFile:
    """A text file that is only ever appended to, each ``flush()`` one ``write(2)`` of whole lines.

    For Detectron2's ``JSONWriter`` (metrics.json), which appends lines to an open file and flushes
    after each event: its buffered file object could be cut mid-line by a signal. Here what was
    written since the last flush goes out in a single ``os.write`` on an ``O_APPEND`` descriptor (a
    regular-file write is not split by a signal), and a torn last line left by a crash elsewhere
    (power loss) is cut off when the file is opened again. Appending, unlike rewriting the whole
    file, keeps a write's cost independent of the run's length.
    """

    def __init__(self, path):
        self.path, self._pending = path, []
        try:
            with open(path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        except FileNotFoundError:
            pass
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text):
        self._pending.append(text)

    def flush(self):
        if self._pending:
            data = "".join(self._pending).encode("utf-8")
            self._pending = []
            while data:  # a regular file takes it whole; loop only for the rare short write
                data = data[os.write(self._fd, data) :]

    def close(self):
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None


def remove_stale_temp_files(folder):
    """Remove temporary files of atomic writes that a killed process left in ``folder``; returns
    their names. Call only while holding the folder's lock: no other writer is then running."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(n for n in os.listdir(folder) if _TMP_NAME.match(n))
    for name in stale:
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass
    return stale


def check_output_dir(folder, what="OUTPUT_DIR"):
    """One-line NotADirectoryError when ``folder`` exists but is not a folder (e.g. a log file)."""
    if not folder:
        raise ValueError(f"{what} is empty: give the run's output folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{what} {folder} is a file, not a folder; give a folder path")


class FolderInUse(ValueError):
    """Another live process holds the output folder's lock."""


@contextlib.contextmanager
def run_folder_lock(folder, what="OUTPUT_DIR"):
    """Hold an exclusive lock on ``folder`` (created if needed) for the ``with`` block.

    A second holder, in this process or another, gets :class:`FolderInUse` naming the folder and
    the holder's pid. The lock file stays (removing it would race with a new holder); the lock
    itself ends with the block or the process.
    """
    check_output_dir(folder, what)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise FolderInUse(
                f"{what} {folder} is in use by another run (pid {holder}); wait for "
                "it to end or give another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def check_folder_config(folder, config_text, resume_hint):
    """A folder that holds another configuration's run (its ``config.yaml`` differs from
    ``config_text``) is refused: starting afresh there would mix two runs' checkpoints and logs.
    Resuming is the caller's decision and skips this check."""
    saved = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(saved):
        return
    with open(saved, encoding="utf-8") as f:
        if f.read() == config_text:
            return
    raise ValueError(
        f"OUTPUT_DIR {folder} holds a run of another configuration ({saved} differs); "
        f"give another folder, or {resume_hint} to continue that run"
    )


@contextlib.contextmanager
def locked_new_run(folder, what="OUTPUT_DIR", started=STARTED_FILES):
    """:func:`run_folder_lock`, and a start that fails leaves nothing behind: when the block raises
    (an error, Ctrl-C) before ``folder`` holds any of ``started`` (non-empty: the writers open
    metrics.json before the first step), what the block created there
    (config.yaml, log.txt, TensorBoard events) is removed, and the folder if it was new. Otherwise
    the next run there, with the mistake fixed, would be refused as "a run of another
    configuration". Removed while the lock is held, so no other run's files are touched."""
    existed = os.path.isdir(folder)
    before = set(os.listdir(folder)) if existed else set()
    with run_folder_lock(folder, what) as lock:
        try:
            yield lock
        except BaseException:
            if not any(_non_empty(os.path.join(folder, n)) for n in started):
                for name in set(os.listdir(folder)) - before:
                    path = os.path.join(folder, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(path)
                if not existed:
                    with contextlib.suppress(OSError):  # a file appeared meanwhile: keep it
                        os.rmdir(folder)
            raise


def _non_empty(path):
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False
