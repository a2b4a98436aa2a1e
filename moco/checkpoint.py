"""MoCo pretraining checkpoints: the official format, atomic writes, weights_only loads.

A file is ``{"epoch", "arch", "state_dict", "optimizer"}`` exactly as facebookresearch/moco writes
it (state_dict keys ``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue``,
``module.queue_ptr``: always with the DDP ``module.`` prefix, also from a one-process run), plus what
an exact resume needs: ``iteration``, ``scheduler`` (LRMultiplier state), ``sampler_seed``,
``rng_states`` (torch / CUDA / numpy / python RNG of every rank, as tensors and plain types) and
``config`` (YAML text). Everything is tensors, numbers, strings and containers, so the file loads
with ``torch.load(weights_only=True)``; nothing is ever loaded otherwise (pickles run code).

Files are named ``checkpoint_{epoch:04d}.pth.tar`` with the official 0-based index of the last
finished epoch (``checkpoint_0199.pth.tar`` after 200 epochs holds ``"epoch": 200``); a run stopped
by a signal mid-epoch writes ``checkpoint_interrupted.pth.tar`` (its ``iteration`` says where); the file
``last_checkpoint`` in the same folder names the newest one. Both are written to a temporary file in
the same folder, flushed, fsync'ed and moved into place with ``os.replace`` (moco.utils.file_io).
"""

import logging
import math
import os
import pickle
import pickletools
import random
import re
import zipfile

import numpy as np
import torch

from moco.utils.file_io import atomic_save, atomic_write_text

logger = logging.getLogger(__name__)

OFFICIAL_KEYS = ("epoch", "arch", "state_dict", "optimizer")
DDP_PREFIX = "module."
LAST_CHECKPOINT = "last_checkpoint"


class UnsafeCheckpointError(ValueError):
    """The file needs unpickling of arbitrary objects (code); it was not loaded."""


def checkpoint_filename(epoch):
    """Official name for the state after ``epoch`` finished epochs (1-based count)."""
    if epoch < 1:
        raise ValueError(f"checkpoint epoch must be >= 1 (finished epochs), got {epoch}")
    return f"checkpoint_{epoch - 1:04d}.pth.tar"


def write_last_checkpoint(folder, filename):
    atomic_write_text(os.path.join(folder, LAST_CHECKPOINT), filename)


def read_last_checkpoint(folder):
    """Path named by ``folder/last_checkpoint``, or None when there is no pointer."""
    pointer = os.path.join(folder, LAST_CHECKPOINT)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    if not name:
        raise ValueError(f"{pointer} is empty; delete it or pass --resume PATH")
    return name if os.path.isabs(name) else os.path.join(folder, name)


def resolve_resume(resume, output_dir):
    """``--resume`` value -> checkpoint path or None (start fresh).

    "" / None: no resume. "auto": the last checkpoint of ``output_dir`` if there is one.
    A folder: its last checkpoint (error if none). A file: itself (error if missing).
    """
    if not resume:
        return None
    if resume == "auto":
        return read_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if os.path.isdir(resume):
        path = read_last_checkpoint(resume)
        if path is None:
            raise FileNotFoundError(f"--resume {resume}: folder has no {LAST_CHECKPOINT} file")
        return path
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return resume


# ------------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    A file that holds anything but tensors and plain containers (e.g. a pickled object whose
    unpickling would run code) raises :class:`UnsafeCheckpointError`; the payload is never run.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    check_torch_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        operand = re.search(r"Unsupported operand \S+", str(e))
        if found is None and (operand or "Weights only load failed" not in str(e)):
            # not a pickle stream torch understands: corrupt or not a checkpoint at all
            reason = operand.group(0) if operand else _first_line(e)
            raise ValueError(f"{path} is not a readable torch checkpoint ({reason})") from None
        what = f"it references {found.group(1)}" if found else "non-tensor objects"
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs unsafe unpickling ({what}); only tensors and plain "
            "containers are accepted (torch.load weights_only=True). Re-save a trusted file's "
            "tensors as a plain dict to use it"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({_first_line(e)})") from None


def check_torch_file(path):
    """Refuse, before ``torch.load``, what weights_only still lets allocate more than the file holds:
    a compressed zip member (torch.save stores members uncompressed; 4 MB of deflate expands to
    4 GiB) and a ``bytearray(N)`` call (on torch's allow-list: N bytes from a few bytes of file).
    One-line ValueError naming the file."""
    size = os.path.getsize(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = []
                for info in archive.infolist():
                    if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                        raise ValueError(
                            f"{path}: archive member {info.filename} is compressed or "
                            f"larger than the file ({info.file_size} bytes); torch.save "
                            "writes members uncompressed, so this file was crafted"
                        )
                    if info.filename.endswith(".pkl"):
                        pickles.append(archive.read(info))
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(
                f"{path} is not a readable torch checkpoint ({_first_line(e)})"
            ) from None
        for data in pickles:
            _refuse_bytearray(path, [data])
    else:  # legacy torch.save format: magic, protocol, sys_info, object, storage keys pickles
        with open(path, "rb") as f:
            # a pickle of protocol >= 2 starts with PROTO, a (damaged) archive with PK; text never
            head = f.read(2)
            if head[:1] != b"\x80" and head != b"PK":
                raise ValueError(
                    f"{path} is not a readable torch checkpoint (neither a torch.save "
                    "archive nor a pickle); give a .pth / .pth.tar / .pkl weights "
                    "file"
                )
            f.seek(0)
            _refuse_bytearray(path, [f] * 5)


def _refuse_bytearray(path, streams):
    try:
        for stream in streams:
            for _, arg, _ in pickletools.genops(stream):  # reads the opcodes, runs nothing
                if isinstance(arg, str) and arg.split(" ")[-1] == "bytearray":
                    raise ValueError(
                        f"{path}: refusing to load: it calls bytearray, which "
                        "allocates any size it names; weights never need it"
                    )
    except (ValueError, EOFError) as e:
        if str(e).startswith(str(path)):
            raise
        # not a pickle stream (or past the last one): torch.load reports what is wrong


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def strip_prefix(state_dict, prefix):
    """Keys starting with ``prefix``, with it removed (others dropped)."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def model_state_dict(model):
    """Official ``state_dict``: the unwrapped MoCo module's keys with the ``module.`` prefix."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return {DDP_PREFIX + k: v for k, v in model.state_dict().items()}


def load_model_state(model, state_dict, path="<checkpoint>"):
    """Load an official ``state_dict`` (with or without ``module.``) into an unwrapped MoCo, strictly."""
    model = getattr(model, "module", model)
    if all(k.startswith(DDP_PREFIX) for k in state_dict):
        state_dict = strip_prefix(state_dict, DDP_PREFIX)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path}: state_dict does not match the model ({len(missing)} missing, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); check "
            "MODEL.ARCH / MODEL.MLP / MODEL.DIM against the checkpoint"
        )
    shapes = [k for k in own if tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if shapes:
        k = shapes[0]
        raise ValueError(
            f"{path}: {len(shapes)} tensors differ in shape from the model, e.g. {k}: "
            f"{tuple(state_dict[k].shape)} in the file vs {tuple(own[k].shape)}; check MODEL.K / "
            "MODEL.DIM / MODEL.ARCH"
        )
    model.load_state_dict(state_dict, strict=True)


def check_optimizer_state(saved, optimizer, path, field="optimizer"):
    """Check a saved optimizer state against ``optimizer`` before ``load_state_dict``, which checks
    only the group sizes: a crafted state (a momentum_buffer of the wrong shape) reaches the update
    kernel, where fused SGD writes a parameter-sized result into it (SIGSEGV). Every per-parameter
    tensor must be a floating tensor of its parameter's shape; ``step`` one number."""
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("state"), dict)
        or not isinstance(saved.get("param_groups"), list)
    ):
        raise ValueError(f"{path}: {field} is not an optimizer state ('state', 'param_groups')")
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or not all(
        isinstance(g, dict)
        and isinstance(g.get("params"), list)
        and len(g["params"]) == len(own["params"])
        for g, own in zip(saved["param_groups"], groups)
    ):
        raise ValueError(f"{path}: {field}.param_groups do not match the model's parameters")
    params = {}  # the saved ids -> this model's parameters, as load_state_dict maps them
    for g, own in zip(saved["param_groups"], groups):
        params.update(zip(g["params"], own["params"]))
    for pid, state in saved["state"].items():
        if pid not in params or not isinstance(state, dict):
            raise ValueError(f"{path}: {field}.state[{pid!r}] is not the state of a parameter")
        shape = tuple(params[pid].shape)
        for name, value in state.items():
            where = f"{path}: {field}.state[{pid!r}].{name}"
            if name == "step":
                if not (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    or isinstance(value, torch.Tensor)
                    and value.numel() == 1
                ):
                    raise ValueError(f"{where} is not one number")
            elif isinstance(value, torch.Tensor):
                if tuple(value.shape) != shape or not value.is_floating_point():
                    raise ValueError(
                        f"{where} is a {value.dtype} tensor of shape "
                        f"{tuple(value.shape)}; the parameter's shape is {shape}"
                    )
            elif value is not None:
                raise ValueError(f"{where} is a {type(value).__name__}, not a tensor")


def check_count(value, path, field, upper=2**62):
    """An int in [0, upper) (an epoch, iteration, pointer or seed from a file); one-line error."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < upper:
        raise ValueError(f"{path}: {field} {value!r} is not an integer in [0, {upper})")
    return value


# ------------------------------------------------------------------------------------------------
# RNG state as tensors and plain types (weights_only-loadable)


def capture_rng_state():
    """This process's torch, CUDA, numpy and python RNG states."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (
            n["algorithm"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ------------------------------------------------------------------------------------------------
# the payload


def build_checkpoint(model, optimizer, epoch, arch, **resume_state):
    """Official keys first, then the resume state (``iteration``, ``scheduler``, ...)."""
    ckpt = {
        "epoch": int(epoch),
        "arch": str(arch),
        "state_dict": model_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }
    ckpt.update(resume_state)
    return ckpt


INTERRUPTED_CHECKPOINT = "checkpoint_interrupted.pth.tar"


def save_checkpoint(ckpt, output_dir, name=None):
    """Write ``ckpt`` as ``name`` (default ``checkpoint_{epoch-1:04d}.pth.tar``) and point
    ``last_checkpoint`` to it."""
    name = name or checkpoint_filename(ckpt["epoch"])
    path = os.path.join(output_dir, name)
    atomic_save(ckpt, path)
    write_last_checkpoint(output_dir, name)
    return path


# ------------------------------------------------------------------------------------------------
# resume state: every field checked before it is used


def load_resume_state(path, model, optimizer, cfg, iters_per_epoch):
    """Load a pretraining checkpoint into ``model`` and ``optimizer`` for a resume, every field
    checked first (arch, tensors, counters in range, optimizer state against the model, scheduler,
    queue pointers); returns ``{iteration, sampler_seed, rng_states}``. One-line ValueError naming
    the file and the field for anything a crafted or foreign file could get wrong."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
        raise ValueError(
            f"{path}: not a MoCo pretraining checkpoint (needs 'epoch' and 'state_dict')"
        )
    if ckpt.get("arch") not in (None, cfg.MODEL.ARCH):
        raise ValueError(
            f"{path}: checkpoint arch {ckpt['arch']} != MODEL.ARCH (-a) {cfg.MODEL.ARCH}"
        )
    if not isinstance(ckpt["state_dict"], dict) or not all(
        isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()
    ):
        raise ValueError(f"{path}: state_dict is not a dict of tensors")
    epoch = check_count(ckpt["epoch"], path, "epoch")
    load_model_state(model, ckpt["state_dict"], path)
    check_queue_pointers(model, cfg.SOLVER.IMS_PER_BATCH, path)
    if ckpt.get("optimizer"):
        check_optimizer_state(ckpt["optimizer"], optimizer, path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: optimizer state does not fit the model ({e})") from None
        for group in optimizer.param_groups:  # this run's hyper-parameters, as official
            group["momentum"] = cfg.SOLVER.MOMENTUM
            group["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY
    else:
        logger.warning("%s has no optimizer state: SGD momentum restarts from zero", path)
    iteration = check_count(ckpt.get("iteration", epoch * iters_per_epoch), path, "iteration")
    sched = ckpt.get("scheduler") or {}
    if not isinstance(sched, dict):
        raise ValueError(f"{path}: scheduler is a {type(sched).__name__}, not a state dict")
    lrs = sched.get("base_lrs", [cfg.SOLVER.BASE_LR])
    if not isinstance(lrs, list) or not all(
        isinstance(lr, (int, float)) and math.isfinite(lr) for lr in lrs
    ):
        raise ValueError(f"{path}: scheduler.base_lrs {lrs!r} is not a list of finite numbers")
    if (
        sched
        and check_count(sched.get("last_epoch", iteration), path, "scheduler.last_epoch")
        != iteration
    ):
        raise ValueError(
            f"{path}: scheduler is at iteration {sched['last_epoch']} but the "
            f"checkpoint at {iteration}; the file is inconsistent"
        )
    saved_lr = lrs
    if any(abs(lr - cfg.SOLVER.BASE_LR) > 1e-12 for lr in saved_lr):
        logger.warning(
            "base LR %s of %s replaced by SOLVER.BASE_LR %s (official resume uses "
            "the command line's --lr)",
            saved_lr,
            path,
            cfg.SOLVER.BASE_LR,
        )
    logger.info("resuming from %s: epoch %s, iteration %d", path, ckpt["epoch"], iteration)
    seed = ckpt.get("sampler_seed")
    return {
        "iteration": iteration,
        "sampler_seed": None if seed is None else check_count(seed, path, "sampler_seed"),
        "rng_states": ckpt.get("rng_states"),
    }


def check_queue_pointers(model, batch, path):
    """Each MoCo queue pointer must name a slot where a global ``batch`` of keys fits (K % batch
    == 0 is checked at start): out of range, the enqueue writes outside the queue."""
    buffers = dict(model.named_buffers())
    for name, ptr in buffers.items():
        if name.rsplit(".", 1)[-1] != "queue_ptr":
            continue
        k = buffers[name[: -len("_ptr")]].shape[1]  # the queue beside it: dim x K
        value = int(ptr.reshape(-1)[0])
        if not 0 <= value < k or value % batch:
            raise ValueError(
                f"{path}: {name} {value} is not in [0, MODEL.K {k}) in steps of "
                f"the global batch {batch}"
            )
