"""The fast path of MoCo pretraining: which speed-ups apply on a device, and how to apply them.

Measured on this project's machines (tools/benchmark.py, docs in its module docstring):

* bf16 autocast: about 2x on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX); on CPUs
  without it (AVX2 only) oneDNN emulates bf16 and a ResNet-50 step is *many times slower*, so
  ``"auto"`` enables it only where the hardware has it. Logits and the loss stay fp32
  (:class:`moco.modeling.moco.MoCo` computes them with autocast disabled).
* channels_last: faster convolutions on CUDA (tensor cores) and CPU (oneDNN); MoCo's split BN runs
  on blocked sub-batches for channels_last input, so results do not change. On CPU it pays off
  from about 64 px crops (measured, one thread: ResNet-50 96 px 1.22x, ResNet-18 64 px 1.15x,
  ResNet-18 32 px 0.75x: layout and per-block overheads dominate tiny maps), so ``"auto"`` turns
  it on for CUDA always and for CPU from :data:`CPU_CHANNELS_LAST_MIN_SIZE` px.
* fused SGD (``torch.optim.SGD(fused=True)``) where torch has the fused kernel for the device.
* ``torch.compile`` of the two encoders: opt-in (no gain measured on CPU, long compile).

The training loop's part is :func:`autocast_context` around the forward, :func:`prepare_model`
after moving the model, :func:`to_device` for the image batches and :func:`sgd` for the optimizer.
"""

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

AUTO = "auto"
CPU_CHANNELS_LAST_MIN_SIZE = 64


def _setting(value, what):
    """True / False / "auto" from a bool or a config string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("auto", "true", "false", "on", "off"):
        v = value.lower()
        return AUTO if v == "auto" else v in ("true", "on")
    raise ValueError(f"{what} must be true, false or auto, got {value!r}")


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), as torch reports it."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def bf16_is_fast(device):
    """Whether bf16 autocast speeds up training on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation flag
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_amp(amp, device):
    """bf16 autocast on or off: ``amp`` True/False, or "auto" = where :func:`bf16_is_fast`."""
    value = _setting(amp, "SOLVER.AMP (bf16 autocast)")
    return bf16_is_fast(device) if value == AUTO else value


def resolve_channels_last(channels_last, device, image_size=None):
    """channels_last on or off: "auto" = on for CUDA, on for CPU with crops of at least
    :data:`CPU_CHANNELS_LAST_MIN_SIZE` px (or an unknown ``image_size``)."""
    value = _setting(channels_last, "MODEL.CHANNELS_LAST")
    if value != AUTO:
        return value
    kind = torch.device(device).type
    if kind == "cpu":
        return image_size is None or image_size >= CPU_CHANNELS_LAST_MIN_SIZE
    return kind == "cuda"


def autocast_context(device, enabled=True, dtype=torch.bfloat16):
    """``torch.autocast`` for ``device`` (a no-op context when disabled)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def prepare_model(model, channels_last=False, compile_encoders=False):
    """Put ``model`` (on its device already) into the fast layout; returns it.

    ``compile_encoders`` compiles ``encoder_q`` and ``encoder_k`` in place (``Module.compile``),
    so state_dict keys stay those of the official checkpoints.
    """
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_encoders:
        for name in ("encoder_q", "encoder_k"):
            getattr(model, name).compile()
    return model


def to_device(batch, device, channels_last=False):
    """An image batch on ``device`` in the model's memory format (non-blocking if pinned).

    The copy keeps the loader's layout and the layout changes on ``device``: a cross-device
    copy into another layout would first permute the batch on the CPU.
    """
    batch = batch.to(device, non_blocking=True)
    return batch.contiguous(memory_format=memory_format(channels_last))


def fused_sgd_available(device):
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False
    return torch.device(device).type in _get_fused_kernels_supported_devices()


def _use_fused(fused, device):
    """True / "auto": the fused kernel where the device has it; False: never."""
    return fused_sgd_available(device) if fused == AUTO or fused is True else False


def sgd(params, lr, momentum, weight_decay, device, fused=AUTO):
    """``torch.optim.SGD`` with the fused kernel where available (same update rule)."""
    kwargs = {"fused": True} if _use_fused(fused, device) else {}
    return torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay, **kwargs)


@dataclasses.dataclass(frozen=True)
class FastPath:
    """Resolved fast-path settings for one device."""

    device: torch.device
    amp: bool
    channels_last: bool
    fused_sgd: bool
    compile: bool = False

    @classmethod
    def resolve(
        cls, device, amp=AUTO, channels_last=AUTO, fused_sgd=AUTO, compile=False, image_size=None
    ):
        device = torch.device(device)
        cl = resolve_channels_last(channels_last, device, image_size)
        return cls(
            device, resolve_amp(amp, device), cl, _use_fused(fused_sgd, device), bool(compile)
        )

    @property
    def pin_memory(self):
        return self.device.type == "cuda"

    def describe(self):
        return {
            "device": str(self.device),
            "bf16_autocast": self.amp,
            "channels_last": self.channels_last,
            "fused_sgd": self.fused_sgd,
            "compile": self.compile,
            "pin_memory": self.pin_memory,
        }


def moco_train_step(model, optimizer, im_q, im_k, amp, device):
    """One MoCo step: forward (bf16 autocast if ``amp``), InfoNCE loss, backward, SGD step.

    The momentum update and the enqueue happen inside ``model``'s forward. Returns the loss.
    """
    with autocast_context(device, amp):
        logits, labels = model(im_q, im_k)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
