"""The fast path changes speed, not results: copy-free queue, channels_last split BN, bf16 autocast,
fused SGD, fast augmentation; each against the official-algorithm / fp32 / torchvision reference."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torchvision.models.resnet import BasicBlock, ResNet

from experiments.benchmark.official import OfficialMoCo
from experiments.benchmark.undo_log import UndoLogMoCo
from moco import fast
from moco.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FastColorJitter,
    FastGaussianBlur,
    JpegDraftLoader,
    ToNormalizedTensor,
    adjust_hue_fast,
    imagenet_normalize,
    moco_v1_transform,
    moco_v2_transform,
    pretrain_transform,
)
from moco.modeling.moco import MoCo
from moco.modeling.shuffle_bn import SplitBatchNorm, blocked_order, blocked_split_batchnorm

# A 4-stage ResNet with one BasicBlock per stage: every layer type of ResNet-50's path, small.
resnet10 = functools.partial(ResNet, BasicBlock, [1, 1, 1, 1])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _pair(shuffle_bn="split", groups=2, mlp=True, K=32, seed=0, m=0.9, cls=MoCo):
    """(OfficialMoCo, ``cls``: MoCo or the benchmark's UndoLogMoCo) with identical weights and queue."""
    torch.manual_seed(seed)
    ref = OfficialMoCo(
        resnet10,
        dim=16,
        K=K,
        m=m,
        T=0.2,
        mlp=mlp,
        split_bn_groups=groups if shuffle_bn == "split" else 1,
    )
    model = cls(
        resnet10, dim=16, K=K, m=m, T=0.2, mlp=mlp, shuffle_bn=shuffle_bn, split_bn_groups=groups
    )
    model.load_state_dict(ref.state_dict())
    return ref, model


def _batches(n, size=32, count=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g))
        for _ in range(count)
    ]


def _grads(model):
    return [p.grad.clone() for p in model.encoder_q.parameters()]


# ------------------------------------------------------------------ the queue's negatives
# MoCo reads them from queue.clone() as official; the benchmark's UndoLogMoCo (the alternative
# measured in docs/RESULTS.md) without a copy. Both must give the official gradients.


@pytest.mark.parametrize("cls", [MoCo, UndoLogMoCo])
def test_queue_negatives_match_official_clone_over_sgd_steps(cls):
    # m = 0.5: the loop and the foreach momentum update are then bit-identical, so what is
    # compared over the steps is the queue handling (a tiny split-BN net amplifies any rounding)
    ref, model = _pair(m=0.5, cls=cls)
    opt_ref = torch.optim.SGD(ref.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    for step, (im_q, im_k) in enumerate(_batches(8, count=4)):
        out = []
        for m, opt_ in ((ref, opt_ref), (model, opt)):
            torch.manual_seed(100 + step)  # same key shuffle
            logits, labels = m(im_q, im_k)
            loss = F.cross_entropy(logits, labels)
            opt_.zero_grad()
            loss.backward()
            out.append((logits.detach(), loss.detach(), _grads(m)))
            opt_.step()
        (l_ref, loss_ref, g_ref), (l_new, loss_new, g_new) = out
        torch.testing.assert_close(l_new, l_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loss_new, loss_ref, rtol=1e-5, atol=1e-5)
        assert max(_rel(a, b) for a, b in zip(g_new, g_ref)) < 1e-3, step
    # four steps of 8 keys: the pointer wrapped (K = 32) and both queues hold the same keys
    assert model.queue_ptr.item() == ref.queue_ptr.item() == 0
    torch.testing.assert_close(model.queue, ref.queue, rtol=1e-4, atol=1e-5)
    for a, b in zip(model.encoder_k.parameters(), ref.encoder_k.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_undo_log_makes_no_queue_copy(monkeypatch):
    _, model = _pair(shuffle_bn="off", cls=UndoLogMoCo)
    ((im_q, im_k),) = _batches(8, count=1)
    clones = []
    real_clone = torch.Tensor.clone

    def spy(self, *a, **kw):
        if self.shape == model.queue.shape:
            clones.append(self.shape)
        return real_clone(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "clone", spy)
    logits, labels = model(im_q, im_k)
    F.cross_entropy(logits, labels).backward()
    assert clones == []


@pytest.mark.parametrize("cls", [MoCo, UndoLogMoCo])
def test_gradient_uses_forward_time_negatives_with_accumulation_and_retain_graph(cls):
    """Patterns where the enqueue of a later forward lands before an earlier backward."""
    ref, model = _pair(shuffle_bn="off", mlp=False, K=16, m=0.5, cls=cls)
    (q1, k1), (q2, k2) = _batches(8, count=2)
    # two forwards, one backward of the summed losses (gradient accumulation)
    grads = []
    for m in (ref, model):
        m.zero_grad()
        la, lb = m(q1, k1)
        lc, ld = m(q2, k2)  # its enqueue overwrites 8 of the 16 negatives of the first forward
        (F.cross_entropy(la, lb) + F.cross_entropy(lc, ld)).backward()
        grads.append(_grads(m))
    assert max(_rel(a, b) for a, b in zip(*grads)) < 1e-4
    # retain_graph: the second backward of the same graph still sees the old negatives
    grads = []
    for m in (ref, model):
        m.zero_grad()
        logits, labels = m(q1, k1)
        loss = F.cross_entropy(logits, labels)
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append(_grads(m))
    assert max(_rel(a, b) for a, b in zip(*grads)) < 1e-4
    torch.testing.assert_close(model.queue, ref.queue, rtol=1e-5, atol=1e-6)


def test_undo_log_raises_on_a_foreign_in_place_change_of_the_queue_before_backward():
    _, model = _pair(shuffle_bn="off", cls=UndoLogMoCo)
    ((im_q, im_k),) = _batches(8, count=1)
    logits, labels = model(im_q, im_k)
    with torch.no_grad():
        model.queue.mul_(2.0)
    with pytest.raises(RuntimeError, match="queue was modified in place between forward and back"):
        F.cross_entropy(logits, labels).backward()


# ------------------------------------------------------------------ channels_last + split BN


def test_blocked_order_maps_strided_sub_batches_to_blocks():
    x = torch.arange(12)
    order = blocked_order(12, 3)
    assert torch.equal(x[order].view(3, 4), torch.stack([x[j::3] for j in range(3)]))
    with pytest.raises(ValueError, match="batch size 10 is not divisible by num_splits=4"):
        blocked_order(10, 4)


def test_blocked_split_bn_equals_strided_split_bn_on_permuted_input():
    torch.manual_seed(0)
    bn_a, bn_b = SplitBatchNorm(5, 4), SplitBatchNorm(5, 4)
    x = (torch.randn(8, 5, 3, 3) * torch.arange(1, 9.0).view(8, 1, 1, 1)).requires_grad_(True)
    out_a = bn_a(x)
    order = blocked_order(8, 4)
    xb = x.detach()[order].contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with blocked_split_batchnorm(bn_b):
        out_b = bn_b(xb)
    assert not bn_b.blocked  # restored on exit
    assert out_b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_b[torch.argsort(order)], out_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_b.running_mean, bn_a.running_mean)
    torch.testing.assert_close(bn_b.running_var, bn_a.running_var)
    g = torch.randn(8, 5, 3, 3)
    (out_a * g).sum().backward()
    (out_b * g[order]).sum().backward()
    torch.testing.assert_close(xb.grad[torch.argsort(order)], x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shuffle_bn", ["split", "off"])
def test_channels_last_does_not_change_results(shuffle_bn):
    _, nchw = _pair(shuffle_bn=shuffle_bn, groups=2)
    _, cl = _pair(shuffle_bn=shuffle_bn, groups=2)
    cl = fast.prepare_model(cl, channels_last=True)
    assert cl.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    blocked_seen = []
    for m in cl.encoder_q.modules():
        if isinstance(m, SplitBatchNorm):
            m.register_forward_hook(lambda mod, i, o: blocked_seen.append(mod.blocked))
    ((im_q, im_k),) = _batches(8, count=1)
    results = []
    for m, channels_last in ((nchw, False), (cl, True)):
        torch.manual_seed(5)
        logits, labels = m(
            fast.to_device(im_q, "cpu", channels_last), fast.to_device(im_k, "cpu", channels_last)
        )
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        results.append((logits.detach(), loss.detach(), _grads(m), m.queue.clone()))
    (l_a, loss_a, g_a, q_a), (l_b, loss_b, g_b, q_b) = results
    if shuffle_bn == "split":
        assert blocked_seen and all(blocked_seen)  # the channels_last path was taken
    torch.testing.assert_close(l_b, l_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_b, q_a, rtol=1e-4, atol=1e-5)
    assert max(_rel(a, b) for a, b in zip(g_b, g_a)) < 1e-3


# ------------------------------------------------------------------ bf16 autocast


def test_bf16_autocast_fast_path_matches_fp32_within_bf16_tolerance():
    """bf16 autocast + channels_last against the fp32 NCHW model on one fixed batch.

    Bounds for bf16 (8-bit mantissa: relative rounding 2^-9 per op, through ~10 conv/BN layers,
    then logits / T): measured here logits ~2.5%, loss ~0.5%, gradient cosine ~0.965-0.98; the
    gradient of another batch has a far lower cosine, so the bound still separates.
    """
    _, ref = _pair(shuffle_bn="split", groups=2)
    _, model = _pair(shuffle_bn="split", groups=2)
    model = fast.prepare_model(model, channels_last=True)
    ((im_q, im_k),) = _batches(16, count=1)
    results = []
    for m, amp, channels_last in ((ref, False, False), (model, True, True)):
        torch.manual_seed(9)
        with fast.autocast_context("cpu", amp):
            logits, labels = m(
                fast.to_device(im_q, "cpu", channels_last),
                fast.to_device(im_k, "cpu", channels_last),
            )
        assert logits.dtype == torch.float32  # logits and loss stay fp32 under autocast
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        results.append((logits.detach(), loss.detach(), _grads(m)))
    (l_ref, loss_ref, g_ref), (l_bf, loss_bf, g_bf) = results
    assert _rel(l_bf, l_ref) < 5e-2
    assert abs(loss_bf.item() - loss_ref.item()) / loss_ref.item() < 2e-2
    flat_ref = torch.cat([g.flatten() for g in g_ref])
    flat_bf = torch.cat([g.flatten() for g in g_bf])
    assert F.cosine_similarity(flat_bf, flat_ref, dim=0) > 0.95
    assert _rel(flat_bf, flat_ref) < 0.35
    # the bounds are not vacuous: another batch gives clearly different logits and gradients
    ref.zero_grad()
    logits, labels = ref(*_batches(16, count=1, seed=7)[0])
    F.cross_entropy(logits, labels).backward()
    assert _rel(l_bf, logits.detach()) > 0.2
    flat_other = torch.cat([g.flatten() for g in _grads(ref)])
    assert F.cosine_similarity(flat_other, flat_ref, dim=0) < 0.9


def test_amp_and_channels_last_settings_resolve_per_device():
    assert fast.resolve_amp(False, "cpu") is False and fast.resolve_amp("on", "cpu") is True
    assert fast.resolve_amp("auto", "cpu") == fast.cpu_has_native_bf16()
    assert fast.bf16_is_fast("cpu") == fast.cpu_has_native_bf16()
    assert fast.resolve_channels_last("auto", "cpu") is True
    assert fast.resolve_channels_last("auto", "cpu", image_size=96) is True
    assert fast.resolve_channels_last("auto", "cpu", image_size=32) is False  # measured slower
    assert fast.resolve_channels_last(True, "cpu", image_size=32) is True
    assert fast.resolve_channels_last("false", "cpu") is False
    msg = r"SOLVER.AMP \(bf16 autocast\) must be true, false or auto, got 'fp8'"
    with pytest.raises(ValueError, match=msg):
        fast.resolve_amp("fp8", "cpu")
    with pytest.raises(ValueError, match="MODEL.CHANNELS_LAST must be true, false or auto"):
        fast.resolve_channels_last(3, "cpu")
    path = fast.FastPath.resolve("cpu", amp=False, channels_last=True)
    assert path.describe() == {
        "device": "cpu",
        "bf16_autocast": False,
        "channels_last": True,
        "fused_sgd": fast.fused_sgd_available("cpu"),
        "compile": False,
        "pin_memory": False,
    }


def test_fused_sgd_matches_default_sgd_and_compile_keeps_official_keys():
    torch.manual_seed(0)
    a = torch.nn.Linear(7, 5)
    b = torch.nn.Linear(7, 5)
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    opt_b = fast.sgd(b.parameters(), 0.1, 0.9, 1e-4, "cpu")
    assert opt_b.defaults.get("fused") == fast.fused_sgd_available("cpu")
    for _ in range(3):
        x = torch.randn(4, 7)
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    _, model = _pair()
    keys = list(model.state_dict())
    # Module.compile is lazy (compiles at the first call) and keeps the module's keys
    model = fast.prepare_model(model, channels_last=True, compile_encoders=True)
    assert list(model.state_dict()) == keys


def test_moco_train_step_updates_queue_and_encoder():
    _, model = _pair()
    opt = fast.sgd(model.parameters(), 0.1, 0.9, 0.0, "cpu")
    ((im_q, im_k),) = _batches(8, count=1)
    before = model.encoder_q.conv1.weight.detach().clone()
    loss = fast.moco_train_step(model, opt, im_q, im_k, amp=False, device="cpu")
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.queue_ptr.item() == 8
    assert not torch.equal(model.encoder_q.conv1.weight, before)


# ------------------------------------------------------------------ fast augmentation


def _photo(w=96, h=80, seed=0):
    """Smooth colour gradients plus texture: hue/saturation vary, unlike flat noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 9 + seed),
            128 + 100 * np.cos(yy / 7),
            128 + 90 * np.sin((xx + yy) / 11),
        ],
        axis=-1,
    )
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("make", [moco_v1_transform, moco_v2_transform])
def test_fast_augmentation_same_draws_shapes_dtype_and_close_values(make):
    ref, quick = make(48), make(48, fast=True)
    diffs = []
    for seed in range(12):
        img = _photo(seed=seed)
        torch.manual_seed(seed)
        a = ref(img)
        state_ref = torch.get_rng_state()
        torch.manual_seed(seed)
        b = quick(img)
        # the same random draws were consumed: crop, jitter order/factors, gray, blur sigma, flip
        assert torch.equal(torch.get_rng_state(), state_ref)
        assert a.shape == b.shape == (3, 48, 48) and a.dtype == b.dtype == torch.float32
        assert b.is_contiguous()
        diffs.append((a - b).abs().mean().item())
    # mean |difference| in normalised units (1 grey level ~ 0.017): rounding of the HSV round
    # trip and blur kernels only, never a different crop or jitter
    assert np.mean(diffs) < 0.03 and max(diffs) < 0.08


def test_to_normalized_tensor_equals_totensor_normalize():
    img = _photo(seed=3)
    expected = imagenet_normalize()(T.ToTensor()(img))
    out = ToNormalizedTensor()(img)
    assert out.dtype == torch.float32 and out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    gray = ToNormalizedTensor()(img.convert("L"))
    assert gray.shape == expected.shape
    with pytest.raises(TypeError, match="ToNormalizedTensor expects a PIL image, got Tensor"):
        ToNormalizedTensor()(torch.zeros(3, 4, 4))
    assert ToNormalizedTensor().mean == IMAGENET_MEAN and ToNormalizedTensor().std == IMAGENET_STD


def _exact_hue_shift(img, factor):
    """Hue rotation in float (torchvision's tensor version): what both byte versions approximate."""
    t = T.functional.pil_to_tensor(img).float() / 255.0
    return (T.functional.adjust_hue(t, factor) * 255.0).numpy().transpose(1, 2, 0)


def test_fast_hue_is_as_close_to_exact_hue_rotation_as_pil():
    """Both quantise hue to a byte; measured mean errors 0.3-1.5 grey levels for either."""
    img = _photo(seed=4)
    err_pil, err_fast = [], []
    for factor in np.linspace(-0.4, 0.4, 9):
        exact = _exact_hue_shift(img, float(factor))
        pil = np.asarray(T.functional.adjust_hue(img, float(factor)), dtype=np.float64)
        quick = np.asarray(adjust_hue_fast(img, float(factor)), dtype=np.float64)
        err_pil.append(np.abs(pil - exact).mean())
        err_fast.append(np.abs(quick - exact).mean())
    assert np.mean(err_fast) <= 1.5 * np.mean(err_pil) and max(err_fast) < 2.0
    # not vacuous: a shift the other way is far off
    assert np.abs(
        np.asarray(adjust_hue_fast(img, -0.2), dtype=np.float64) - _exact_hue_shift(img, 0.2)
    ).mean() > 10 * max(err_fast)
    assert adjust_hue_fast(img.convert("L"), 0.1).mode == "L"  # no hue: unchanged, as torchvision
    with pytest.raises(ValueError, match="hue_factor"):
        adjust_hue_fast(img, 0.7)


def test_fast_blur_and_jitter_keep_the_reference_parameters():
    blur = FastGaussianBlur()
    assert blur.sigma == (0.1, 2.0)
    img = _photo(seed=5)
    out = blur(img)
    assert out.size == img.size and out.mode == "RGB"
    assert np.asarray(out, dtype=np.float64).std() <= np.asarray(img, dtype=np.float64).std()
    with pytest.raises(TypeError, match="GaussianBlur expects a PIL image"):
        blur(torch.zeros(3, 4, 4))
    jitter = FastColorJitter(0.4, 0.4, 0.4, 0.1)
    assert isinstance(jitter, T.ColorJitter) and jitter.hue == (-0.1, 0.1)
    v2 = moco_v2_transform(64, fast=True)
    names = [type(t).__name__ for t in v2.transforms]
    assert names == [
        "RandomResizedCrop",
        "RandomApply",
        "RandomGrayscale",
        "RandomApply",
        "RandomHorizontalFlip",
        "ToNormalizedTensor",
    ]
    assert isinstance(v2.transforms[1].transforms[0], FastColorJitter) and v2.transforms[1].p == 0.8
    assert isinstance(v2.transforms[3].transforms[0], FastGaussianBlur)
    assert v2.transforms[3].p == 0.5
    q, k = pretrain_transform(32, aug_plus=True, fast=True)(img)
    assert q.shape == k.shape == (3, 32, 32) and not torch.equal(q, k)


def test_jpeg_draft_loader_reduces_only_when_every_crop_keeps_its_resolution(tmp_path):
    loader = JpegDraftLoader(crop_size=32)
    # smallest crop side of a WxH image: sqrt(0.2 * 3/4 * W * H); reduce by d while it / d >= 32
    assert loader.reduction(160, 120) == 1  # 53.7 px: halving would leave 26.8 < 32
    assert loader.reduction(200, 150) == 2  # 67.1 -> 33.5 at 1/2, 16.8 at 1/4
    assert loader.reduction(400, 300) == 4  # 134.2 -> 33.5 at 1/4
    assert loader.reduction(800, 600) == 8
    assert loader.reduction(4000, 3000) == 8  # JPEG's DCT scaling stops at 1/8
    big = _photo(w=400, h=300, seed=6)
    path = tmp_path / "big.jpg"
    big.save(path, quality=95)
    img = loader(str(path))
    assert img.mode == "RGB" and img.size == (100, 75)
    png = tmp_path / "big.png"
    big.save(png)
    assert loader(str(png)).size == (400, 300)  # not a JPEG: full size
    # the reduced decode looks like the full-size image downscaled (same content, same geometry)
    full = np.asarray(big.resize((100, 75), Image.BOX), dtype=np.float64)
    assert np.abs(np.asarray(img, dtype=np.float64) - full).mean() < 12.0


def test_moco_with_undo_logs_pickles_and_deep_copies(tmp_path):
    import copy

    _, model = _pair(shuffle_bn="off", cls=UndoLogMoCo)
    ((im_q, im_k),) = _batches(8, count=1)
    logits, _ = model(im_q, im_k)  # a live undo log
    path = tmp_path / "moco.pt"
    torch.save(model, path)  # whole module: the transient logs are not pickled
    for clone in (torch.load(path, weights_only=False), copy.deepcopy(model)):
        assert torch.equal(clone.queue, model.queue) and len(clone._undo_logs) == 0
        out, labels = clone(im_q, im_k)
        F.cross_entropy(out, labels).backward()
        assert clone.queue_ptr.item() == 16
