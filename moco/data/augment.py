"""MoCo v1 and v2 ("aug+") augmentations, as in facebookresearch/moco main_moco.py.

All transforms take PIL images. Random draws use torch's RNG (torchvision's transforms do too),
so ``torch.manual_seed`` and DataLoader worker seeding make a pipeline reproducible.

``fast=True`` (``moco_v1_transform(..., fast=True)``, ``moco_v2_transform(..., fast=True)``) keeps
the same transforms, order, parameters and random draws (same seed -> same crop, jitter factors,
blur sigma) and swaps the three slow implementations measured in torchvision's PIL path: the hue
shift (OpenCV's HSV conversion instead of PIL's), the Gaussian blur (OpenCV's Gaussian kernel
instead of PIL's box-filter approximation, same sigma) and ToTensor + Normalize (one step).
:class:`JpegDraftLoader` decodes JPEGs at a reduced DCT scale only when every crop that
RandomResizedCrop can draw still has at least ``crop_size`` pixels per side.
"""

import math
import os

import cv2
import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize():
    return T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _check_size(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from ``sigma`` (SimCLR / MoCo v2)."""

    def __init__(self, sigma=(0.1, 2.0)):
        lo, hi = (float(s) for s in sigma)
        if not 0.0 < lo <= hi:
            raise ValueError(
                f"GaussianBlur: sigma must be (min, max) with 0 < min <= max, got {sigma!r}"
            )
        self.sigma = (lo, hi)

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            raise TypeError(f"GaussianBlur expects a PIL image, got {type(img).__name__}")
        sigma = torch.empty(()).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))  # PIL's radius is the std dev

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


_cv2_pid = None


def _cv2_one_thread():
    """One OpenCV thread in the process running the fast transforms (once per process).

    A data worker augments one small image at a time; OpenCV's default thread pool then only
    competes with the training threads for the same cores.
    """
    global _cv2_pid
    if _cv2_pid != os.getpid():
        cv2.setNumThreads(1)
        _cv2_pid = os.getpid()


class FastGaussianBlur(GaussianBlur):
    """:class:`GaussianBlur` (same sigma draw) with OpenCV's Gaussian kernel (3 sigma support).

    PIL's GaussianBlur approximates the Gaussian by three box blurs; OpenCV convolves with the
    sampled Gaussian itself, about 4x faster at 224 px. Edges are replicated as in PIL.
    """

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            raise TypeError(f"GaussianBlur expects a PIL image, got {type(img).__name__}")
        sigma = torch.empty(()).uniform_(*self.sigma).item()
        if img.mode not in ("RGB", "L"):
            return img.filter(ImageFilter.GaussianBlur(radius=sigma))
        _cv2_one_thread()
        out = cv2.GaussianBlur(np.asarray(img), (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        return Image.fromarray(out, img.mode)


def adjust_hue_fast(img, hue_factor):
    """torchvision's PIL ``adjust_hue`` (hue as a byte, shifted modulo 256) on OpenCV's HSV.

    Same shift of the same 8-bit hue; OpenCV's RGB<->HSV rounding differs from PIL's by a few
    grey levels at most, about 8x faster. Non-RGB images go to torchvision.
    """
    if not isinstance(img, Image.Image) or img.mode != "RGB":
        return TF.adjust_hue(img, hue_factor)
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    _cv2_one_thread()
    hsv = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2HSV_FULL)  # hue in 0..255 for 0..360 deg
    shift = int(np.int8(hue_factor * 255).astype(np.uint8))  # torchvision's byte shift
    hsv[..., 0] += np.uint8(shift)  # uint8 arithmetic wraps modulo 256, as torchvision's
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL), "RGB")


class FastColorJitter(T.ColorJitter):
    """torchvision's ColorJitter (same draws, same random order) with :func:`adjust_hue_fast`."""

    def forward(self, img):
        fn_idx, b, c, s, h = self.get_params(
            self.brightness, self.contrast, self.saturation, self.hue
        )
        for fn_id in fn_idx:
            if fn_id == 0 and b is not None:
                img = TF.adjust_brightness(img, b)
            elif fn_id == 1 and c is not None:
                img = TF.adjust_contrast(img, c)
            elif fn_id == 2 and s is not None:
                img = TF.adjust_saturation(img, s)
            elif fn_id == 3 and h is not None:
                img = adjust_hue_fast(img, h)
        return img


class ToNormalizedTensor:
    """ToTensor + Normalize(mean, std) in one step: uint8 HWC PIL image -> float CHW tensor."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # (x / 255 - mean) / std == x * scale + shift
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(-1, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(-1, 1, 1)

    def __call__(self, img):
        if not isinstance(img, Image.Image):
            raise TypeError(f"ToNormalizedTensor expects a PIL image, got {type(img).__name__}")
        x = TF.pil_to_tensor(img.convert("RGB") if img.mode != "RGB" else img).contiguous()
        return torch.addcmul(self._shift, x.float(), self._scale)

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _to_tensor(fast):
    return [ToNormalizedTensor()] if fast else [T.ToTensor(), imagenet_normalize()]


DEFAULT_MIN_SCALE = 0.2  # RandomResizedCrop's smallest crop area, as official


def _check_min_scale(min_scale):
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"INPUT.MIN_SCALE must be in (0, 1], got {min_scale!r}")


def check_blur(prob, sigma):
    """aug+'s blur settings as (probability, (min, max) sigma); one-line errors naming the keys."""
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"INPUT.BLUR_PROB must be a probability in [0, 1], got {prob!r}")
    try:
        lo, hi = (float(s) for s in sigma)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 < lo <= hi:
        raise ValueError(f"INPUT.BLUR_SIGMA must be (min, max) with 0 < min <= max, got {sigma!r}")
    return float(prob), (lo, hi)


def moco_v1_transform(crop_size=224, fast=False, min_scale=DEFAULT_MIN_SCALE):
    """MoCo v1 / InstDisc augmentation (``fast``: same augmentation, faster implementations).

    ``min_scale``: the smallest crop's area fraction (official 0.2; milder crops help small
    networks, Tan et al. 2023, and measurably so at this toolkit's CPU scale)."""
    _check_size("crop_size", crop_size)
    _check_min_scale(min_scale)
    jitter = FastColorJitter if fast else T.ColorJitter
    return T.Compose(
        [
            T.RandomResizedCrop(crop_size, scale=(min_scale, 1.0)),
            T.RandomGrayscale(p=0.2),
            jitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
            *_to_tensor(fast),
        ]
    )


def moco_v2_transform(
    crop_size=224, fast=False, min_scale=DEFAULT_MIN_SCALE, blur_prob=0.5, blur_sigma=(0.1, 2.0)
):
    """MoCo v2 "aug+": v1 plus jitter with p 0.8 (hue 0.1) and Gaussian blur with p ``blur_prob``
    (v2: 0.5), sigma in ``blur_sigma`` pixels (v2: (0.1, 2.0))."""
    _check_size("crop_size", crop_size)
    _check_min_scale(min_scale)
    blur_prob, blur_sigma = check_blur(blur_prob, blur_sigma)
    jitter = FastColorJitter if fast else T.ColorJitter
    blur = FastGaussianBlur if fast else GaussianBlur
    return T.Compose(
        [
            T.RandomResizedCrop(crop_size, scale=(min_scale, 1.0)),
            T.RandomApply([jitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([blur(sigma=blur_sigma)], p=blur_prob),
            T.RandomHorizontalFlip(),
            *_to_tensor(fast),
        ]
    )


class JpegDraftLoader:
    """ImageFolder ``loader``: RGB PIL image; JPEGs decoded at 1/2, 1/4 or 1/8 scale when allowed.

    The reduction is the largest one for which the smallest crop RandomResizedCrop can draw
    (area ``min_scale``, aspect ``min_ratio``) still has ``crop_size`` pixels on its shorter side,
    so no crop is upsampled more than from the full-size image. Crop geometry is relative (area
    fraction, aspect), so the crop distribution is unchanged. Other formats load as usual.
    """

    def __init__(self, crop_size, min_scale=DEFAULT_MIN_SCALE, min_ratio=3.0 / 4.0):
        _check_size("crop_size", crop_size)
        self.crop_size = crop_size
        self.min_scale, self.min_ratio = float(min_scale), float(min_ratio)

    def reduction(self, width, height):
        """DCT scale denominator (1, 2, 4 or 8) used for a ``width`` x ``height`` JPEG."""
        smallest_side = math.sqrt(self.min_scale * self.min_ratio * width * height)
        d = 1
        while d < 8 and smallest_side / (2 * d) >= self.crop_size:
            d *= 2
        return d

    def __call__(self, path):
        with open(path, "rb") as f:
            return self.from_image(Image.open(f))

    def from_image(self, img):
        """The RGB image of ``img``, opened (header read) and not yet decoded: a caller that read
        the header already (moco.data.checks.PixelLimitLoader) decodes it without a second open."""
        if img.format == "JPEG":
            d = self.reduction(*img.size)
            if d > 1:
                img.draft("RGB", (img.size[0] // d, img.size[1] // d))
        return img.convert("RGB")

    def __repr__(self):
        return f"{type(self).__name__}(crop_size={self.crop_size})"


def crop_flip_transform(crop_size=224, fast=False, min_scale=DEFAULT_MIN_SCALE):
    """CMC's augmentation: random resized crop and horizontal flip, colours untouched (jitter and
    grayscale would change the ab view that CMC's L view learns to predict)."""
    _check_size("crop_size", crop_size)
    _check_min_scale(min_scale)
    return T.Compose(
        [
            T.RandomResizedCrop(crop_size, scale=(min_scale, 1.0)),
            T.RandomHorizontalFlip(),
            *_to_tensor(fast),
        ]
    )


def pretrain_transform(
    crop_size=224, aug_plus=False, fast=False, min_scale=DEFAULT_MIN_SCALE, color=True, blur=None
):
    """Two crops of the MoCo v1 (``aug_plus=False``) or v2 augmentation; ``color=False``: of
    :func:`crop_flip_transform` (CMC). ``blur``: v2's (probability, sigma range), if not v2's."""
    if aug_plus and color:
        extra = dict(zip(("blur_prob", "blur_sigma"), blur)) if blur is not None else {}
        return TwoCropsTransform(
            moco_v2_transform(crop_size, fast=fast, min_scale=min_scale, **extra)
        )
    make = moco_v1_transform if color else crop_flip_transform
    return TwoCropsTransform(make(crop_size, fast=fast, min_scale=min_scale))


class TwoCropsTransform:
    """Two independent augmentations of one image: ``[query, key]``."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform(x)]

    def __repr__(self):
        return f"{type(self).__name__}({self.base_transform!r})"


def eval_transform(resize=None, crop=224):
    """Resize + CenterCrop + normalise for kNN / linear evaluation.

    ``resize`` defaults to crop * 256 / 224 (256 for the standard 224 crop).
    """
    _check_size("crop", crop)
    if resize is None:
        resize = int(round(crop * 256 / 224))
    _check_size("resize", resize)
    if resize < crop:
        raise ValueError(f"eval_transform: resize ({resize}) must be >= crop ({crop})")
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), imagenet_normalize()])
