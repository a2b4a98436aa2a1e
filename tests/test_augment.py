"""MoCo v1 / v2 augmentations, GaussianBlur, TwoCropsTransform, evaluation transform."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from moco.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GaussianBlur,
    TwoCropsTransform,
    eval_transform,
    moco_v1_transform,
    moco_v2_transform,
)


def _image(w=80, h=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def _find(compose, cls):
    return [t for t in compose.transforms if isinstance(t, cls)]


@pytest.mark.parametrize("make", [moco_v1_transform, moco_v2_transform])
def test_two_crops_shapes_and_differ(make):
    torch.manual_seed(0)
    two = TwoCropsTransform(make(crop_size=32))
    q, k = two(_image())
    assert q.shape == k.shape == (3, 32, 32) and q.dtype == torch.float32
    assert not torch.equal(q, k)


def test_v2_is_reproducible_under_torch_seed():
    aug = moco_v2_transform(crop_size=48)
    img = _image(seed=3)
    torch.manual_seed(7)
    first = [aug(img) for _ in range(4)]
    torch.manual_seed(7)
    second = [aug(img) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_v1_matches_spec():
    aug = moco_v1_transform(crop_size=64)
    (crop,) = _find(aug, T.RandomResizedCrop)
    assert crop.size == (64, 64) and crop.scale == (0.2, 1.0)
    (gray,) = _find(aug, T.RandomGrayscale)
    assert gray.p == 0.2
    (jitter,) = _find(aug, T.ColorJitter)  # applied every time in v1
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
    assert jitter.hue == (-0.4, 0.4)
    assert len(_find(aug, T.RandomHorizontalFlip)) == 1
    assert not _find(aug, T.RandomApply)
    (norm,) = _find(aug, T.Normalize)
    assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD


def test_v2_matches_spec_probabilities():
    aug = moco_v2_transform(crop_size=64)
    (crop,) = _find(aug, T.RandomResizedCrop)
    assert crop.size == (64, 64) and crop.scale == (0.2, 1.0)
    applies = _find(aug, T.RandomApply)
    jitter_apply = [a for a in applies if isinstance(a.transforms[0], T.ColorJitter)]
    blur_apply = [a for a in applies if isinstance(a.transforms[0], GaussianBlur)]
    assert len(jitter_apply) == len(blur_apply) == 1
    assert jitter_apply[0].p == 0.8
    jitter = jitter_apply[0].transforms[0]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4)
    assert jitter.hue == (-0.1, 0.1)
    assert blur_apply[0].p == 0.5
    assert blur_apply[0].transforms[0].sigma == (0.1, 2.0)
    assert _find(aug, T.RandomGrayscale)[0].p == 0.2
    assert _find(aug, T.RandomHorizontalFlip)[0].p == 0.5
    (norm,) = _find(aug, T.Normalize)
    assert tuple(norm.mean) == IMAGENET_MEAN and tuple(norm.std) == IMAGENET_STD


def test_gaussian_blur_is_pil_blur_with_sigma_in_range():
    img = _image(64, 64, seed=1)
    fixed = GaussianBlur(sigma=(2.0, 2.0))(img)
    assert np.array_equal(np.asarray(fixed), np.asarray(img.filter(ImageFilter.GaussianBlur(2.0))))
    assert np.asarray(fixed, dtype=np.float64).std() < 0.5 * np.asarray(img, dtype=np.float64).std()
    # a random sigma in [0.1, 2.0] gives a result between no blur and the strongest blur
    torch.manual_seed(0)
    stds = [np.asarray(GaussianBlur()(img), dtype=np.float64).std() for _ in range(20)]
    strongest = np.asarray(img.filter(ImageFilter.GaussianBlur(2.0)), dtype=np.float64).std()
    assert min(stds) >= strongest - 1e-9
    assert max(stds) <= np.asarray(img, dtype=np.float64).std() + 1e-9
    assert len(set(stds)) > 1


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="sigma must be"):
        GaussianBlur(sigma=(2.0, 0.1))
    with pytest.raises(TypeError, match="GaussianBlur expects a PIL image, got Tensor"):
        GaussianBlur()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="crop_size must be a positive integer"):
        moco_v2_transform(crop_size=0)
    with pytest.raises(ValueError, match=r"resize \(32\) must be >= crop \(64\)"):
        eval_transform(resize=32, crop=64)


def test_eval_transform_sizes_and_normalisation():
    default = eval_transform()
    assert _find(default, T.Resize)[0].size == 256
    assert _find(default, T.CenterCrop)[0].size == (224, 224)
    small = eval_transform(crop=64)
    assert _find(small, T.Resize)[0].size == 73  # 64 * 256 / 224, rounded
    color = (200, 100, 30)
    out = small(Image.new("RGB", (100, 90), color))
    assert out.shape == (3, 64, 64)
    expected = (torch.tensor(color) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected.float(), rtol=0, atol=1e-5)
    assert out.std(dim=(1, 2)).max() < 1e-5


def test_the_pil_path_takes_the_blur_settings_and_the_stage_keys_leave_out_their_defaults():
    """INPUT.BLUR_PROB / BLUR_SIGMA reach the per-image aug+ as they reach the batched one; at v2's
    values they are left out of a run's identity (moco.config.identity_dump), so the runs stored
    before the keys existed keep their stage keys."""
    import yaml

    from moco.config import get_cfg, identity_dump
    from moco.data.augment import pretrain_transform

    no_blur = pretrain_transform(32, aug_plus=True, blur=(0.0, (0.5, 1.0)))
    blurs = [t for t in no_blur.base_transform.transforms if "GaussianBlur" in repr(t)]
    assert len(blurs) == 1 and blurs[0].p == 0.0 and blurs[0].transforms[0].sigma == (0.5, 1.0)
    with pytest.raises(ValueError, match="INPUT.BLUR_PROB"):
        pretrain_transform(32, aug_plus=True, blur=(-0.1, (0.1, 2.0)))
    cfg = get_cfg()
    before = yaml.safe_load(cfg.dump())
    del before["INPUT"]["BLUR_PROB"], before["INPUT"]["BLUR_SIGMA"]
    assert yaml.safe_load(identity_dump(cfg)) == before
    cfg.INPUT.BLUR_PROB = 0.0
    assert yaml.safe_load(identity_dump(cfg))["INPUT"]["BLUR_PROB"] == 0.0
    cfg.INPUT.BLUR_PROB, cfg.INPUT.BLUR_SIGMA = 0.5, (0.014, 0.29)
    assert yaml.safe_load(identity_dump(cfg))["INPUT"]["BLUR_SIGMA"] == [0.014, 0.29]
