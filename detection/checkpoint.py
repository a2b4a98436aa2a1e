"""Loading detection weights without executing code from the file.

Detectron2's ``DetectionCheckpointer`` unpickles ``.pkl`` weights with plain ``pickle.load``, which
runs whatever callable the pickle names. Weights come from outside (model zoo, converters, other
people), so this module treats them as untrusted:

* ``.pkl``: :class:`RestrictedUnpickler` admits only what a Detectron2/Caffe2 weights pickle holds
  (numpy arrays, numpy dtypes and scalars, plain containers); anything else raises
  ``pickle.UnpicklingError`` naming the file and the refused global.
* ``.pth`` / ``.pyth``: ``torch.load(weights_only=True)`` (:func:`load_weights_only`).

:class:`SafeDetectionCheckpointer` plugs both into Detectron2's checkpointer by overriding only the
file-reading hooks, so URL handling, ndarray->tensor conversion, name-matching heuristics
(``align_and_update_state_dicts``) and resume stay Detectron2's own. Its writes (``model_*.pth``,
``last_checkpoint``) go through :mod:`moco.file_io`'s atomic write: fvcore writes in place, and a
SIGTERM mid-save left a 0-byte ``model_*.pth`` under its final name.
"""

import _codecs
import collections
import logging
import os
import pickle

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from moco.file_io import atomic_save, atomic_write_text

__all__ = [
    "RestrictedUnpickler",
    "safe_load_pickle",
    "load_weights_only",
    "SafeDetectionCheckpointer",
]

logger = logging.getLogger(__name__)


def _numpy_internal(name):
    # numpy 2 moved numpy.core to numpy._core; pickles written by either name the module they were
    # written with, so both spellings map to the object of the installed numpy.
    core = getattr(np, "_core", None) or np.core
    module_name, attr = name.split(".")
    return getattr(getattr(core, module_name), attr)


def _build_allow_list():
    reconstruct = _numpy_internal("multiarray._reconstruct")
    scalar = _numpy_internal("multiarray.scalar")
    frombuffer = _numpy_internal("numeric._frombuffer")  # protocol-5 ndarray pickles
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # protocol-2 pickles of bytes (numpy array payloads) go through _codecs.encode(str, latin1)
        ("_codecs", "encode"): _codecs.encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(core + ".multiarray", "_reconstruct")] = reconstruct
        allowed[(core + ".multiarray", "scalar")] = scalar
        allowed[(core + ".numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED_GLOBALS = _build_allow_list()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (numpy arrays/dtypes/scalars, containers).

    ``source`` names the file in error messages.
    """

    def __init__(self, file, *, source="<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._source}: refusing to unpickle global '{module}.{name}': Detectron2 weights "
                "may hold only numpy arrays, numpy dtypes/scalars and plain containers "
                "(the file is not a weights pickle, or it carries code)"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(
            f"{self._source}: refusing persistent id {pid!r}: not a Detectron2 weights pickle "
            "(a torch.save file must be named .pth)"
        )


def safe_load_pickle(path):
    """Unpickle a Detectron2 / Caffe2 ``.pkl`` weights file through :class:`RestrictedUnpickler`."""
    with PathManager.open(path, "rb") as f:
        # latin1: Caffe2/Detectron1 weights are Python 2 pickles of numpy arrays
        return RestrictedUnpickler(f, source=str(path), encoding="latin1").load()


def load_weights_only(path):
    """``torch.load(path, weights_only=True)`` on CPU; a file that needs more raises a clear error.

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the file needs arbitrary unpickling (message names the file and
            the global torch refused).
    """
    if isinstance(path, str) and not PathManager.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        if isinstance(path, str):
            with PathManager.open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long and suggests weights_only=False; keep only the refused global.
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        detail = lines[0] if lines else str(e).splitlines()[0]
        raise pickle.UnpicklingError(
            f"{path}: refusing to load: it holds more than tensors and plain containers "
            f"({detail}); only weights files are accepted (torch.load weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated / not a torch.save file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: not a readable torch checkpoint ({reason})") from None


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose file reading never executes code from the file."""

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = safe_load_pickle(filename)
            if not isinstance(data, dict):
                raise ValueError(f"{filename}: expected a dict of weights, found {type(data).__name__}")
            # Same interpretation of the unpickled dict as DetectionCheckpointer._load_file
            # (which cannot be reused: it unpickles and interprets in one step).
            if "model" in data and "__author__" in data:
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            data = load_weights_only(filename)
            if "model_state" not in data:
                raise ValueError(f"{filename}: pycls checkpoints must contain 'model_state'")
            model_state = {
                k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        # everything else (.pth, resume checkpoints): Detectron2's path, reading via _torch_load
        return super()._load_file(filename)

    def _torch_load(self, f):
        return load_weights_only(f)

    def save(self, name, **kwargs):
        """fvcore's ``Checkpointer.save`` (same payload and name), written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        atomic_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
