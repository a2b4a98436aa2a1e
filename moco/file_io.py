"""File I/O: atomic writes (a temporary file beside the target, fsync, ``os.replace``).

A reader sees either the old file or the complete new one, never a torn write; an ``OSError``
(e.g. a full disk) names the file and says the previous one is unchanged. Used for checkpoints,
summaries, configs, reports and converted weights alike.
"""

import json
import os
import tempfile

import torch


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


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then ``os.replace`` it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):  # e.g. ENOSPC: say which file, and that the old one is intact
            raise OSError(e.errno, f"could not write {path}: {e.strerror or e}; the previous "
                          "file there (if any) is unchanged") from e  # fmt: skip
        raise
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


def atomic_save(obj, path):
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one."""

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
