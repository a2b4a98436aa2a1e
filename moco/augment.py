"""MoCo v1 and v2 ("aug+") augmentations, as in facebookresearch/moco main_moco.py.

All transforms take PIL images. Random draws use torch's RNG (torchvision's transforms do too),
so ``torch.manual_seed`` and DataLoader worker seeding make a pipeline reproducible.
"""

import torch
import torchvision.transforms as T
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


def moco_v1_transform(crop_size=224):
    """MoCo v1 / InstDisc augmentation."""
    _check_size("crop_size", crop_size)
    return T.Compose([
        T.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
        T.RandomGrayscale(p=0.2),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        imagenet_normalize(),
    ])


def moco_v2_transform(crop_size=224):
    """MoCo v2 "aug+": v1 plus jitter with p 0.8 (hue 0.1) and Gaussian blur with p 0.5."""
    _check_size("crop_size", crop_size)
    return T.Compose([
        T.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur(sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        imagenet_normalize(),
    ])


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
