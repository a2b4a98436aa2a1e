"""Batched MoCo augmentation (moco.data.batch_augment) against torchvision's per-image functions, and a
pretraining run that uses it."""

import json
import math
import os

import pytest
import torch
import torchvision.transforms.functional as TF
from detectron2.utils.env import seed_all_rng

from moco.data import batch_augment as B
from moco.engine.trainer import PretrainTrainer
from tests.test_engine import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _images(n=6, size=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_crop_boxes_follow_random_resized_crop_rules():
    torch.manual_seed(0)
    boxes = B.crop_boxes(2000, 30, 40, scale=(0.3, 1.0))
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 40).all() and (y1 <= 30).all()
    assert torch.equal(boxes, boxes.round())  # integer pixels, as torchvision
    area = w * h / (30 * 40)
    assert area.min() >= 0.28 and area.max() <= 1.0  # scale range (up to rounding)
    ratio = w / h
    assert ratio.min() >= 0.7 and ratio.max() <= 1.45
    assert area.std() > 0.1 and x0.std() > 1  # drawn per sample


def test_crop_boxes_fall_back_to_the_centre_crop():
    # an aspect range no 10x10 crop of at least 99% can have: every sample falls back
    boxes = B.crop_boxes(5, 10, 20, scale=(0.99, 1.0), ratio=(1.0, 1.0))
    assert boxes.tolist() == [[5.0, 0.0, 15.0, 10.0]] * 5


def test_full_box_at_the_same_size_is_the_image():
    x = _images()
    full = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(len(x), 4)
    assert torch.allclose(B.resized_crops(x, full, 20), x, atol=1e-6)


def test_colour_adjustments_equal_torchvision_per_sample():
    x = _images()
    f = torch.tensor([0.6, 0.9, 1.0, 1.1, 1.3, 1.4])
    shift = torch.tensor([-0.4, -0.1, 0.0, 0.05, 0.2, 0.5])
    for ours, theirs in (
        (B.adjust_brightness, TF.adjust_brightness),
        (B.adjust_contrast, TF.adjust_contrast),
        (B.adjust_saturation, TF.adjust_saturation),
    ):
        out = ours(x, f.view(-1, 1, 1, 1))
        for i in range(len(x)):
            assert torch.allclose(out[i], theirs(x[i], f[i].item()), atol=1e-6), ours.__name__
    out = B.adjust_hue(x, shift)
    for i in range(len(x)):
        assert torch.allclose(out[i], TF.adjust_hue(x[i], shift[i].item()), atol=1e-5)


def test_color_jitter_draws_and_order_match_torchvision_formulas():
    x = _images()
    n = len(x)
    torch.manual_seed(3)
    out = B.color_jitter(x, 0.4, 0.3, 0.2, 0.1)
    torch.manual_seed(3)  # the same draws, in B.color_jitter's order
    factors = [torch.empty(n).uniform_(1 - s, 1 + s) for s in (0.4, 0.3, 0.2)]
    shift = torch.empty(n).uniform_(-0.1, 0.1)
    order = torch.rand(n, 4).argsort(1)
    fns = [
        lambda im, i: TF.adjust_brightness(im, factors[0][i].item()),
        lambda im, i: TF.adjust_contrast(im, factors[1][i].item()),
        lambda im, i: TF.adjust_saturation(im, factors[2][i].item()),
        lambda im, i: TF.adjust_hue(im, shift[i].item()),
    ]
    assert len({tuple(o) for o in order.tolist()}) > 1  # samples differ in order
    for i in range(n):
        ref = x[i]
        for op in order[i].tolist():
            ref = fns[op](ref, i)
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_gaussian_blur_equals_torchvision_per_sample():
    x = _images(size=24)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 1.9, 2.0])
    out = B.gaussian_blur(x, sigma)
    k = 2 * math.ceil(3 * 2.0) + 1
    for i in range(len(x)):
        ref = TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2)
        assert torch.allclose(out[i], ref, atol=1e-5)


@pytest.mark.parametrize("aug_plus", [False, True])
def test_batch_augment_crops_are_normalised_independent_and_seeded(aug_plus):
    images = (_images(n=8, size=30) * 255).to(torch.uint8)
    aug = B.BatchAugment(16, aug_plus=aug_plus, min_scale=0.4)
    torch.manual_seed(0)
    a, b = aug(images), aug(images)
    torch.manual_seed(0)
    assert torch.equal(aug(images), a)
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32
    assert not torch.allclose(a, b)  # two views of one batch differ
    mean = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(B.IMAGENET_STD).view(1, 3, 1, 1)
    pixels = a * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_without_colour_only_crops_and_flips():
    grey = torch.full((4, 3, 30, 30), 128, dtype=torch.uint8)
    grey[:, 0] = 200  # a flat reddish image: crops and flips of it are the image itself
    torch.manual_seed(0)
    out = B.BatchAugment(16, aug_plus=True, color=False)(grey)
    mean = torch.tensor(B.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(B.IMAGENET_STD).view(1, 3, 1, 1)
    expected = (grey[:, :, :16, :16].float() / 255 - mean) / std
    assert torch.allclose(out, expected, atol=1e-5)


def test_batch_augment_refuses_float_images_and_bad_settings():
    with pytest.raises(ValueError, match="uint8"):
        B.BatchAugment(16)(torch.rand(2, 3, 20, 20))
    with pytest.raises(ValueError, match="INPUT.MIN_SCALE"):
        B.BatchAugment(16, min_scale=0.0)
    with pytest.raises(ValueError, match=r"INPUT.BLUR_PROB must be a probability in \[0, 1\]"):
        B.BatchAugment(16, aug_plus=True, blur_prob=1.5)
    with pytest.raises(ValueError, match="INPUT.BLUR_SIGMA must be .min, max. with 0 < min"):
        B.BatchAugment(16, aug_plus=True, blur_sigma=(0.0, 1.0))


def _sharpness(x):
    """Mean absolute difference of horizontally adjacent pixels: what a blur takes away."""
    return (x[..., 1:] - x[..., :-1]).abs().mean().item()


def test_aug_plus_blur_follows_its_probability_and_sigma():
    """INPUT.BLUR_PROB / BLUR_SIGMA: every view blurred at p 1 with sigma 2 px is far smoother
    than with the blur off (p 0), on the same seed; a sigma range read from YAML (a list) draws
    what the default tuple (v2's (0.1, 2.0)) draws."""
    images = (_images(n=32, size=30, seed=1) * 255).to(torch.uint8)
    views = {}
    for name, prob, sigma in (("off", 0.0, (0.1, 2.0)), ("on", 1.0, (2.0, 2.0))):
        torch.manual_seed(0)
        views[name] = B.BatchAugment(16, aug_plus=True, blur_prob=prob, blur_sigma=sigma)(images)
    assert _sharpness(views["on"]) < 0.5 * _sharpness(views["off"])
    torch.manual_seed(0)
    default = B.BatchAugment(16, aug_plus=True)(images)
    torch.manual_seed(0)
    assert torch.equal(B.BatchAugment(16, aug_plus=True, blur_sigma=[0.1, 2.0])(images), default)


def test_pretraining_with_batch_augment_trains_and_saves(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, str(tmp_path))
    cfg.INPUT.BATCH_AUGMENT = True
    cfg.INPUT.BATCH_AUGMENT_SIZE = 40
    trainer = PretrainTrainer(cfg)
    image, _ = trainer.dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 40)  # the loader only decodes
    summary = trainer.train()
    with open(os.path.join(str(tmp_path), "metrics.json")) as f:
        losses = [r["total_loss"] for r in map(json.loads, f) if "total_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert os.path.isfile(summary["last_checkpoint"])


def _losses(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [r["total_loss"] for r in map(json.loads, f) if "total_loss" in r]


def test_decoded_cache_gives_the_same_run_without_loader_workers(synthetic_root, tmp_path):
    runs = {}
    for cache in (False, True):
        cfg = tiny_cfg(synthetic_root, str(tmp_path / str(cache)), **{"KNN.DATA": ""})
        cfg.INPUT.BATCH_AUGMENT, cfg.INPUT.BATCH_AUGMENT_SIZE = True, 40
        cfg.DATA.CACHE_DECODED = cache
        # the cache decodes with the configured worker and then needs none: the same run as
        # decoding in the training process (a persistent worker draws its seed once, not per epoch)
        cfg.DATALOADER.NUM_WORKERS = 1 if cache else 0
        seed_all_rng(0)  # as the launcher does before each run
        trainer = PretrainTrainer(cfg)
        if cache:  # every image decoded once, equal to the folder's item; steps index it in-process
            folder = trainer.dataset.dataset
            assert trainer.dataset.images.shape == (len(folder), 3, 40, 40)
            assert all(
                torch.equal(trainer.dataset[i][0], folder[i][0]) for i in (0, len(folder) - 1)
            )
            assert trainer.data_loader.loader.num_workers == 0
        trainer.train()
        runs[cache] = _losses(str(tmp_path / str(cache)))
    assert runs[True] and runs[True] == runs[False]


def test_decoded_cache_needs_batch_augment(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, str(tmp_path), **{"DATA.CACHE_DECODED": True})
    with pytest.raises(ValueError, match="DATA.CACHE_DECODED needs INPUT.BATCH_AUGMENT"):
        PretrainTrainer(cfg)
