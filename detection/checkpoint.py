"""Loading detection weights without executing code from the file.

Detectron2's ``DetectionCheckpointer`` unpickles ``.pkl`` weights with plain ``pickle.load``, which
runs whatever callable the pickle names. Weights come from outside (model zoo, converters, other
people), so this module treats them as untrusted:

* ``.pkl``: :class:`RestrictedUnpickler` admits only what a Detectron2/Caffe2 weights pickle holds
  (numpy arrays, numpy dtypes and scalars, plain containers); anything else raises
  ``pickle.UnpicklingError`` naming the file and the refused global. Each array's state is checked
  before numpy sees it: its data must be exactly shape x itemsize bytes of the file (no size the file
  does not hold is allocated) and object dtypes are refused (numpy's ``__setstate__`` segfaults on
  a crafted object array).
* ``.pth`` / ``.pyth``: ``torch.load(weights_only=True)`` (:func:`load_weights_only`).

:class:`SafeDetectionCheckpointer` plugs both into Detectron2's checkpointer by overriding only the
file-reading hooks, so URL handling, ndarray->tensor conversion, name-matching heuristics
(``align_and_update_state_dicts``) and resume stay Detectron2's own. Its writes (``model_*.pth``,
``last_checkpoint``) go through :mod:`moco.utils.file_io`'s atomic write: fvcore writes in place, and a
SIGTERM mid-save left a 0-byte ``model_*.pth`` under its final name.
"""

import _codecs
import collections
import logging
import math
import os
import pickle

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from moco.checkpoint import check_torch_file
from moco.utils.file_io import atomic_save, atomic_write_text

__all__ = [
    "RestrictedUnpickler",
    "SafeDetectionCheckpointer",
    "backbone_keys",
    "load_weights_only",
    "safe_load_pickle",
]

logger = logging.getLogger(__name__)


def _numpy_internal(name):
    # numpy 2 moved numpy.core to numpy._core; pickles written by either name the module they were
    # written with, so both spellings map to the object of the installed numpy.
    core = getattr(np, "_core", None) or np.core
    module_name, attr = name.split(".")
    return getattr(getattr(core, module_name), attr)


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` builds while unpickling: the pickle's BUILD calls ``__setstate__``,
    which checks the state before numpy allocates anything (turned back into a plain ndarray after
    the load)."""

    def __setstate__(self, state):
        _check_array_state(state, getattr(self, "_source", "<pickle>"))
        super().__setstate__(state)


def _refuse(source, what):
    raise pickle.UnpicklingError(f"{source}: refusing to unpickle {what}: not a weights pickle")


def _check_dtype(dtype, source):
    if not isinstance(dtype, np.dtype):
        _refuse(source, f"an array whose dtype is a {type(dtype).__name__}")
    if dtype.hasobject:  # weights are numbers; object arrays hold pickled objects
        _refuse(source, "an object-dtype array")


def _check_array_state(state, source):
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        _refuse(source, "an array with a malformed state")
    shape, dtype, _, data = state[-4:]
    _check_dtype(dtype, source)
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        _refuse(source, f"an array of shape {shape!r}")
    declared = math.prod(shape) * dtype.itemsize
    if not isinstance(data, (bytes, str)) or len(data) != declared:
        # numpy would allocate the declared size before comparing: bound it by the file's bytes
        held = len(data) if isinstance(data, (bytes, str)) else type(data).__name__
        _refuse(source, f"an array of shape {shape} ({declared} bytes) whose data holds {held}")


def _build_allow_list():
    allowed = {
        ("numpy", "dtype"): np.dtype,
        # protocol-2 pickles of bytes (numpy array payloads) go through _codecs.encode(str, latin1)
        ("_codecs", "encode"): _codecs.encode,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        # no bytearray: weights never need it, and bytearray(N) allocates N bytes from 10 of file
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
    }
    return allowed


_ALLOWED_GLOBALS = _build_allow_list()
_NUMPY_CHECKED = {  # resolved per file by RestrictedUnpickler (checks name the file)
    ("numpy", "ndarray"): "ndarray",
    **{
        (core + ".multiarray", "_reconstruct"): "reconstruct"
        for core in ("numpy.core", "numpy._core")
    },
    **{(core + ".multiarray", "scalar"): "scalar" for core in ("numpy.core", "numpy._core")},
    **{(core + ".numeric", "_frombuffer"): "frombuffer" for core in ("numpy.core", "numpy._core")},
}


def _plain_arrays(obj):
    """The unpickled object with every _CheckedArray as a plain ndarray view (same memory)."""
    if isinstance(obj, _CheckedArray):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return type(obj)((k, _plain_arrays(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain_arrays(v) for v in obj)
    return obj


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals (numpy arrays/dtypes/scalars, containers).

    ``source`` names the file in error messages.
    """

    def __init__(self, file, *, source="<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module, name):
        checked = _NUMPY_CHECKED.get((module, name))
        if checked:
            return getattr(self, "_" + checked)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._source}: refusing to unpickle global '{module}.{name}': Detectron2 weights "
                "may hold only numpy arrays, numpy dtypes/scalars and plain containers "
                "(the file is not a weights pickle, or it carries code)"
            ) from None

    def _ndarray(self, *args, **kwargs):
        # only ever an argument of _reconstruct; called, it would allocate any declared shape
        _refuse(self._source, "a direct numpy.ndarray(...) call")

    def _reconstruct(self, subtype, shape, dtype):
        if subtype != self._ndarray:  # bound methods compare equal, never identical
            _refuse(self._source, f"_reconstruct of {subtype!r}")
        array = np.ndarray.__new__(_CheckedArray, (0,), np.uint8)  # numpy pickles pass (0,)
        array._source = self._source
        return array

    def _scalar(self, dtype, data=None):
        _check_dtype(dtype, self._source)
        if not isinstance(data, (bytes, str)) or len(data) != dtype.itemsize:
            _refuse(self._source, f"a {dtype} scalar without its {dtype.itemsize} bytes")
        return _numpy_internal("multiarray.scalar")(dtype, data)

    def _frombuffer(self, buf, dtype, shape, order):
        _check_dtype(dtype, self._source)
        return _numpy_internal("numeric._frombuffer")(buf, dtype, shape, order)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(
            f"{self._source}: refusing persistent id {pid!r}: not a Detectron2 weights pickle "
            "(a torch.save file must be named .pth)"
        )


def safe_load_pickle(path):
    """Unpickle a Detectron2 / Caffe2 ``.pkl`` weights file through :class:`RestrictedUnpickler`."""
    with PathManager.open(path, "rb") as f:
        # latin1: Caffe2/Detectron1 weights are Python 2 pickles of numpy arrays
        data = RestrictedUnpickler(f, source=str(path), encoding="latin1").load()
    return _plain_arrays(data)


def load_weights_only(path):
    """``torch.load(path, weights_only=True)`` on CPU; a file that needs more raises a clear error.

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the file needs arbitrary unpickling (message names the file and
            the global torch refused).
    """
    if isinstance(path, str) and not PathManager.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if isinstance(path, str) and os.path.isfile(path):
        check_torch_file(path)
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


def backbone_keys(model):
    """State-dict keys of the pretrained part of a detector: the ResNet (``backbone.bottom_up`` under
    an FPN, else ``backbone``) and, in C4 models, the res5 blocks inside the ROI head. The FPN, the
    heads and the extra norm after res5 (``roi_heads.res5.norm``) are new by design."""
    backbone = getattr(model, "backbone", None)
    prefix = "backbone.bottom_up." if hasattr(backbone, "bottom_up") else "backbone."
    keys = []
    for k in model.state_dict():
        if k.endswith("num_batches_tracked"):  # a counter, not a weight; converters drop it
            continue
        if k.startswith(prefix) or k.startswith("roi_heads.res5.") and k.split(".")[2].isdigit():
            keys.append(k)
    return keys


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose file reading never executes code from the file, and which
    refuses weights that leave part of the backbone unloaded: Detectron2 only warns and trains the
    rest from random init, so a "moco" result could be a random-init one. ``weights_load`` records
    ``{"file", "backbone_tensors", "matched", "allow_partial"}`` of the last load
    (``allow_partial_weights``: the expert override, MODEL.ALLOW_PARTIAL_WEIGHTS)."""

    def __init__(self, model, save_dir="", *, allow_partial_weights=False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_partial_weights = bool(allow_partial_weights)
        self.weights_load = None
        self._loading = None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        keys = backbone_keys(self.model)
        lost = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
        unmatched = [k for k in keys if k in lost]
        self.weights_load = {
            "file": self._loading,
            "backbone_tensors": len(keys),
            "matched": len(keys) - len(unmatched),
            "allow_partial": self.allow_partial_weights,
        }
        if unmatched and not self.allow_partial_weights:
            raise ValueError(
                f"{self._loading}: {len(unmatched)} of {len(keys)} backbone tensors did not load "
                f"(missing or of another shape, e.g. {unmatched[0]}); check MODEL.RESNETS (depth, "
                "width) against the weights and convert them with tools/convert_to_d2.py, or set "
                "MODEL.ALLOW_PARTIAL_WEIGHTS True to train anyway (recorded in final_metrics.json)"
            )
        return incompatible

    def _load_file(self, filename):
        self._loading = filename
        if filename.endswith(".pkl"):
            data = safe_load_pickle(filename)
            if not isinstance(data, dict):
                raise ValueError(
                    f"{filename}: expected a dict of weights, found {type(data).__name__}"
                )
            # Same interpretation of the unpickled dict as DetectionCheckpointer._load_file
            # (which cannot be reused: it unpickles and interprets in one step).
            if not isinstance(data.get("model", {}), dict):  # D2 would fail on .items()
                raise ValueError(
                    f"{filename}: 'model' must be a dict of weights, found "
                    f"{type(data['model']).__name__}"
                )
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
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        # everything else (.pth, resume checkpoints): Detectron2's path, reading via _torch_load
        data = super()._load_file(filename)
        raw = data.get("model")
        if isinstance(raw, dict) and "state_dict" in raw and "epoch" in raw:
            # Detectron2 would fail on the first non-tensor ("Unsupported type found in checkpoint")
            raise ValueError(
                f"{filename} is a pretraining checkpoint (MoCo format), not "
                f"Detectron2 weights; convert it first: tools/convert_to_d2.py "
                f"{filename} OUT.pkl, then MODEL.WEIGHTS OUT.pkl"
            )
        return data

    def _torch_load(self, f):
        name = getattr(f, "name", None)
        if isinstance(name, str) and os.path.isfile(name):
            check_torch_file(name)
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
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
