"""MoCo v1 / v2 augmentation of a whole batch on the training device (``INPUT.BATCH_AUGMENT``).

The loader then only decodes each image to a fixed square of ``INPUT.BATCH_AUGMENT_SIZE`` pixels
(:func:`batch_source_transform`); :class:`BatchAugment` draws both crops of every image here, with
its own random draws per sample, as :mod:`moco.data.augment` does per image:

* RandomResizedCrop (area in ``[min_scale, 1]``, aspect in ``[3/4, 4/3]``, torchvision's ten tries
  and centre-crop fallback) as one ``torchvision.ops.roi_align`` over the batch;
* ColorJitter (brightness, contrast, saturation, hue; torchvision's formulas and its random order of
  the four per image), with p 0.8 in v2; RandomGrayscale p 0.2; v2's Gaussian blur with p 0.5 and
  sigma in ``[0.1, 2]`` (a per-sample separable kernel, reflect padding, as torchvision's tensor
  blur); horizontal flip; ImageNet normalisation.

Why: on a 2-core CPU the per-image PIL path costs about as much as the width-16 network's step and
needs a loader process of its own (docs/RESULTS.md); batched, the same augmentation takes a small
fraction of the step in the training process. kornia's batched augmentations were measured at
~200 ms per 128 images on one CPU thread here, slower than PIL, so this module stays with torch and
torchvision ops. On GPUs it moves the augmentation off the data workers, as GPU pipelines do.
"""

import math

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import rgb_to_grayscale as grayscale
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from moco.data.augment import (
    DEFAULT_MIN_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _check_min_scale,
    _check_size,
    check_blur,
)


def batch_source_transform(size):
    """PIL image -> uint8 CHW tensor of ``size`` x ``size``: shorter side resized, centre square."""
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.PILToTensor()])


def _uniform(n, lo, hi, device):
    return torch.empty(n, device=device).uniform_(lo, hi)


def crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu", tries=10):
    """``(n, 4)`` float boxes ``x0, y0, x1, y1`` drawn as torchvision's RandomResizedCrop does:
    ``tries`` draws of area and log-uniform aspect, the first that fits; else the centre crop of
    the clamped aspect (torchvision's fallback)."""
    area = height * width
    target = area * _uniform(n * tries, *scale, device).view(n, tries)
    log_r = _uniform(n * tries, math.log(ratio[0]), math.log(ratio[1]), device).view(n, tries)
    r = log_r.exp()
    w, h = (target * r).sqrt().round(), (target / r).sqrt().round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    # fallback: the whole image at the nearest allowed aspect, centred
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    idx = first.clamp(min=0).view(n, 1)
    w = torch.where(first >= 0, w.gather(1, idx).squeeze(1), torch.tensor(float(fw), device=device))
    h = torch.where(first >= 0, h.gather(1, idx).squeeze(1), torch.tensor(float(fh), device=device))
    # torchvision draws the corner as an integer in [0, size - crop]
    x0 = torch.floor(torch.rand(n, device=device) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    x0 = torch.where(first >= 0, x0, (width - w) // 2)
    y0 = torch.where(first >= 0, y0, (height - h) // 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def resized_crops(images, boxes, size):
    """Each image's box resampled to ``size`` x ``size``: bilinear, averaging ``ceil(box / size)``
    samples per output pixel and axis (roi_align's adaptive sampling): shrinking does not alias."""
    rois = torch.cat(
        [
            torch.arange(len(images), device=images.device, dtype=images.dtype)[:, None],
            boxes.to(images.dtype),
        ],
        1,
    )
    return roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)


def _blend(x, other, factor):
    return (x * factor + other * (1 - factor)).clamp_(0, 1)


def adjust_brightness(x, factor):
    """torchvision's adjust_brightness with one ``factor`` per sample (``(n, 1, 1, 1)``)."""
    return (x * factor).clamp_(0, 1)  # a blend with black


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """torchvision's adjust_hue (HSV hue rotated by ``shift`` in [-0.5, 0.5]) per sample."""
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(1)
    h = (h + shift.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), 1))


def color_jitter(x, brightness, contrast, saturation, hue):
    """ColorJitter with torchvision's draws per sample: factors uniform in ``[1 - s, 1 + s]``
    (hue in ``[-hue, hue]``) and the four adjustments in a random order of their own. Each
    adjustment runs once per sample, on the samples whose turn it is."""
    n, dev = len(x), x.device
    factors = [
        _uniform(n, max(0.0, 1 - s), 1 + s, dev).view(n, 1, 1, 1)
        for s in (brightness, contrast, saturation)
    ]
    shift = _uniform(n, -hue, hue, dev)
    ops = [
        lambda y, i: adjust_brightness(y, factors[0][i]),
        lambda y, i: adjust_contrast(y, factors[1][i]),
        lambda y, i: adjust_saturation(y, factors[2][i]),
        lambda y, i: adjust_hue(y, shift[i]),
    ]
    order = torch.rand(n, 4, device=dev).argsort(1)
    x = x.clone()
    for position in range(4):
        for op, fn in enumerate(ops):
            i = (order[:, position] == op).nonzero().squeeze(1)
            if len(i):
                x[i] = fn(x[i], i)
    return x


def gaussian_blur(x, sigma):
    """Separable Gaussian blur, one ``sigma`` per sample; kernel radius ``ceil(3 * max sigma)``
    (at most the image's size - 1), reflect padding as torchvision's tensor ``gaussian_blur``."""
    n, c, hgt, wid = x.shape
    radius = min(int(math.ceil(3 * float(sigma.max()))), hgt - 1, wid - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, k)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.view(n, c, hgt, wid)


def _where(p, n, device, new, old):
    chosen = (torch.rand(n, device=device) < p).view(n, 1, 1, 1)
    return torch.where(chosen, new, old)


class BatchAugment(torch.nn.Module):
    """One augmented crop per image of a uint8 ``(n, 3, h, w)`` batch, normalised float output.

    ``aug_plus`` False: MoCo v1 / InstDisc (crop, grayscale 0.2, jitter 0.4 each, flip);
    True: MoCo v2 (crop, jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, blur with p
    ``blur_prob`` and sigma in ``blur_sigma``, v2's 0.5 and (0.1, 2.0), flip).
    ``color=False``: crop and flip only (CMC and CPC, as moco.data.augment.pretrain_transform).
    """

    def __init__(
        self,
        crop_size,
        aug_plus=False,
        min_scale=DEFAULT_MIN_SCALE,
        color=True,
        blur_prob=0.5,
        blur_sigma=(0.1, 2.0),
    ):
        super().__init__()
        _check_size("INPUT.CROP_SIZE", crop_size)
        _check_min_scale(min_scale)
        self.blur_prob, self.blur_sigma = check_blur(blur_prob, blur_sigma)
        self.crop_size, self.aug_plus, self.color = int(crop_size), bool(aug_plus), bool(color)
        self.scale = (float(min_scale), 1.0)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"BatchAugment expects uint8 (n, 3, h, w) images, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        n, _, hgt, wid = images.shape
        dev = images.device
        x = images.float().div_(255)
        x = resized_crops(x, crop_boxes(n, hgt, wid, self.scale, device=dev), self.crop_size)
        x = x.clamp_(0, 1)
        if self.color and self.aug_plus:
            x = _where(0.8, n, dev, color_jitter(x, 0.4, 0.4, 0.4, 0.1), x)
            x = _where(0.2, n, dev, grayscale(x).expand_as(x), x)
            if self.blur_prob > 0:
                sigma = _uniform(n, *self.blur_sigma, dev)
                x = _where(self.blur_prob, n, dev, gaussian_blur(x, sigma), x)
        elif self.color:
            x = _where(0.2, n, dev, grayscale(x).expand_as(x), x)
            x = color_jitter(x, 0.4, 0.4, 0.4, 0.4)
        x = _where(0.5, n, dev, x.flip(3), x)
        return (x - self.mean) / self.std

    def extra_repr(self):
        return (
            f"crop_size={self.crop_size}, aug_plus={self.aug_plus}, scale={self.scale}, "
            f"color={self.color}, blur_prob={self.blur_prob}, blur_sigma={self.blur_sigma}"
        )
