"""Pretrained ResNet checkpoints -> Detectron2 weights pickle, by the official MoCo key rule.

Accepted inputs (read with ``torch.load(weights_only=True)`` only):

* ``moco``: official MoCo v1/v2 checkpoints and this toolkit's (``state_dict`` with
  ``module.encoder_q.<torchvision key>``; ``encoder_k``, queue and the fc / MLP head are dropped);
* ``mocov3``: MoCo v3 ResNet checkpoints (``module.base_encoder.*``; momentum encoder, predictor
  and the projector in ``fc`` are dropped);
* ``torchvision``: a supervised torchvision ResNet state dict, plain or under ``state_dict`` /
  ``model`` (an optional DDP ``module.`` prefix is removed);
* ``cmc``: this toolkit's CMC checkpoints (``module.l.encoder_q.*`` and ``module.ab.encoder_q.*``,
  moco.modeling.cmc): both views' query encoders, written as ``l.<Detectron2 key>`` and
  ``ab.<Detectron2 key>`` for ``build_lab_resnet_fpn_backbone`` (detection.backbone), which runs
  both halves on the Lab split of the input; the dictionaries and heads are dropped.

Key rule (official ``convert-pretrain-to-detectron2.py``): keys without ``layer`` get ``stem.``;
``layer1..4`` -> ``res2..5``; ``bn1..3`` -> ``conv1..3.norm``; ``downsample.0`` -> ``shortcut``;
``downsample.1`` -> ``shortcut.norm``. Detectron2 then matches these names into any ResNet
backbone (C4 with res5 in the ROI head, or FPN) by its matching heuristics. BasicBlock (R18/34)
and Bottleneck (R50+) ResNets both follow this rule.

Backbone tensors holding NaN or inf are refused (one line naming the file and the first tensor):
Detectron2 would load them and fail only at the first fine-tuning iteration.

Output: ``{"model": {name: numpy array}, "__author__": "moco-det", "matching_heuristics": True}``,
pickled atomically (temp file in the target folder, fsync, ``os.replace``).
"""

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from detection.checkpoint import load_weights_only
from moco.utils.file_io import atomic_write

__all__ = [
    "FORMATS",
    "ConversionResult",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_format",
    "extract_backbone",
    "load_source_state_dict",
    "rename_key",
    "save_d2_weights",
]

AUTHOR = "moco-det"

# format -> prefixes under which the backbone (a torchvision ResNet) is stored, most specific first
_BACKBONE_PREFIXES = {
    "moco": ("module.encoder_q.", "encoder_q."),
    "mocov3": ("module.base_encoder.", "base_encoder."),
    "torchvision": ("module.", ""),
}
# CMC (moco.modeling.cmc): one ResNet per view, written under the view's name
_CMC_VIEW_PREFIXES = {
    view: (f"module.{view}.encoder_q.", f"{view}.encoder_q.") for view in ("l", "ab")
}
FORMATS = (*_BACKBONE_PREFIXES, "cmc")

# blocks per stage -> depth, for a readable summary and a hint on MODEL.RESNETS settings
_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}


@dataclass
class ConversionResult:
    format: str
    converted: int
    dropped: int
    block: str  # "basic" or "bottleneck"
    blocks_per_stage: tuple
    depth: int | None  # None for a non-standard layout
    dropped_examples: list = field(default_factory=list)
    width: int = 64  # base width: channels of the stem (64 for torchvision's ResNets)

    def summary(self, src, dst):
        cmc = self.format == "cmc"
        w = self.width // 2 if cmc else self.width  # CMC: each view's ResNet has half the width
        arch = (
            f"ResNet-{self.depth}"
            if self.depth
            else f"ResNet ({self.block}, {self.blocks_per_stage})"
        )
        arch += f", base width {w}"
        if cmc:
            arch = (
                f"two {arch}s (L and ab views; fine-tune with MODEL.BACKBONE.NAME "
                f"build_lab_resnet_fpn_backbone and MODEL.RESNETS.STEM_OUT_CHANNELS / "
                f"RES2_OUT_CHANNELS {self.width})"
            )
        elif w != 64 and self.block == "basic":  # Detectron2's R18/R34 builder asserts width 64
            arch += (
                f" (fine-tune with MODEL.BACKBONE.NAME build_basic_resnet_fpn_backbone and "
                f"MODEL.RESNETS.STEM_OUT_CHANNELS / RES2_OUT_CHANNELS {w})"
            )
        elif w != 64:
            arch += (
                f" (fine-tune with MODEL.RESNETS.STEM_OUT_CHANNELS {w}, WIDTH_PER_GROUP {w}, "
                f"RES2_OUT_CHANNELS {4 * w})"
            )
        return (
            f"{src}: {self.format} checkpoint, {arch}; converted {self.converted} tensors, "
            f"dropped {self.dropped} (non-backbone: momentum encoder, queue, fc/MLP head) -> {dst}"
        )


def load_source_state_dict(path):
    """Read a checkpoint with ``torch.load(weights_only=True)`` and return its state dict."""
    try:
        obj = load_weights_only(path)
    except pickle.UnpicklingError as e:
        if os.fspath(path).endswith(".pkl"):
            raise pickle.UnpicklingError(
                f"{e}; a .pkl is usually Detectron2 weights already: pass it as MODEL.WEIGHTS"
            ) from None
        raise
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return dict(inner)
    return dict(obj)


def detect_format(state_dict, source="<checkpoint>"):
    """Return one of :data:`FORMATS` by the key prefixes present."""
    keys = list(state_dict)
    if any(k.startswith(p) for p in _CMC_VIEW_PREFIXES["l"] for k in keys):
        return "cmc"
    for fmt in ("moco", "mocov3"):
        if any(k.startswith(p) for p in _BACKBONE_PREFIXES[fmt] for k in keys):
            return fmt
    if any(k in ("conv1.weight", "module.conv1.weight") for k in keys):
        return "torchvision"
    sample = ", ".join(keys[:5]) or "no keys"
    raise ValueError(
        f"{source}: found no ResNet backbone (no encoder_q./base_encoder. keys and no conv1.weight; "
        f"first keys: {sample}); pass --format if the layout is known"
    )


def extract_backbone(state_dict, fmt, source="<checkpoint>", view=None):
    """Return ``(backbone, dropped)``: torchvision-named backbone tensors, and dropped key names
    (``view``: CMC's ``l`` or ``ab``)."""
    if fmt == "cmc" and view in _CMC_VIEW_PREFIXES:
        prefixes = _CMC_VIEW_PREFIXES[view]
    elif fmt in _BACKBONE_PREFIXES and view is None:
        prefixes = _BACKBONE_PREFIXES[fmt]
    else:
        raise ValueError(
            f"unknown format {fmt!r} / view {view!r}; expected one of {', '.join(FORMATS)}"
        )
    # the first prefix any key carries wins, so "module.encoder_q." is never read as "encoder_q."
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in state_dict)), None)
    if fmt == "torchvision" and prefix == "module." and "conv1.weight" in state_dict:
        prefix = ""
    backbone, dropped = OrderedDict(), []
    for key, value in state_dict.items():
        if prefix is None or not key.startswith(prefix):
            dropped.append(key)
            continue
        name = key[len(prefix) :]
        if (
            name.startswith("fc.") or name == "fc"
        ):  # classifier (supervised) / projection head (MoCo)
            dropped.append(key)
            continue
        if not torch.is_tensor(value):
            raise ValueError(
                f"{source}: backbone entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        backbone[name] = value
    _check_resnet(backbone, fmt if view is None else f"{fmt} {view}", source)
    _check_finite(backbone, prefix or "", source)
    return backbone, dropped


def _check_finite(backbone, prefix, source):
    """Refuse NaN/inf weights here: Detectron2 would load them and fail only at iteration 0."""
    bad = [
        name
        for name, t in backbone.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise ValueError(
            f"{source}: {len(bad)} backbone "
            f"{'tensors hold' if len(bad) > 1 else 'tensor holds'} NaN or inf "
            f"(first: {prefix + bad[0]!r}); the pretraining diverged or the file is damaged: "
            "convert an earlier checkpoint"
        )


def _check_resnet(backbone, fmt, source):
    missing = [k for k in ("conv1.weight", "bn1.weight") if k not in backbone]
    missing += [
        f"layer{i}.*" for i in range(1, 5) if not any(k.startswith(f"layer{i}.") for k in backbone)
    ]
    if missing:
        raise ValueError(
            f"{source}: no ResNet backbone in the {fmt} layout (missing {', '.join(missing)}); "
            "check the file, or force the layout with --format"
        )


def rename_key(key):
    """Official MoCo rule: torchvision ResNet key -> Detectron2 ResNet key."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    return key.replace("downsample.1", "shortcut.norm")


def _architecture(backbone):
    blocks = []
    for stage in range(1, 5):
        ids = {int(m.group(1)) for k in backbone if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(len(ids))
    block = "bottleneck" if "layer1.0.conv3.weight" in backbone else "basic"
    return block, tuple(blocks), _DEPTHS.get((block, tuple(blocks)))


def _to_numpy(t):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def convert_state_dict(state_dict, fmt=None, source="<checkpoint>"):
    """Convert a loaded state dict. Returns ``(model, result)``: D2-named numpy arrays and a summary."""
    fmt = fmt or detect_format(state_dict, source)
    views = tuple(_CMC_VIEW_PREFIXES) if fmt == "cmc" else (None,)
    model, dropped, width = OrderedDict(), None, 0
    for view in views:
        backbone, not_this_view = extract_backbone(state_dict, fmt, source, view)
        elsewhere = set(not_this_view)
        dropped = not_this_view if dropped is None else [k for k in dropped if k in elsewhere]
        prefix = "" if view is None else f"{view}."
        for key, value in backbone.items():
            new_key = prefix + rename_key(key)
            if new_key in model:  # cannot happen for a torchvision ResNet; guards odd inputs
                raise ValueError(f"{source}: keys collide after renaming at {new_key!r}")
            model[new_key] = _to_numpy(value)
        width += int(backbone["conv1.weight"].shape[0])  # the stem's output channels
    block, blocks, depth = _architecture(backbone)  # CMC: the views share the architecture
    result = ConversionResult(
        fmt, len(model), len(dropped), block, blocks, depth, dropped[:10], width
    )
    return model, result


def save_d2_weights(model, path):
    """Write ``{"model": model, "__author__": ..., "matching_heuristics": True}`` atomically."""
    path = os.fspath(path)
    if not path.endswith(".pkl"):
        # Detectron2 reads a file as a weights pickle only by this extension
        raise ValueError(
            f"{path}: the output must end with .pkl (Detectron2 picks the reader by extension)"
        )
    payload = {"model": model, "__author__": AUTHOR, "matching_heuristics": True}
    atomic_write(path, lambda f: pickle.dump(payload, f, protocol=4))


def convert_checkpoint(src, dst, fmt=None):
    """Read ``src`` (weights only), convert, write ``dst`` atomically; return :class:`ConversionResult`."""
    src, dst = os.fspath(src), os.fspath(dst)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"{dst}: output would overwrite the input checkpoint; choose another path")
    state_dict = load_source_state_dict(src)
    model, result = convert_state_dict(state_dict, fmt, source=src)
    save_d2_weights(model, dst)
    return result
