"""MoCo builder: logits formula, queue FIFO, momentum update, gradients, official state_dict format."""

import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from moco.modeling.moco import MoCo
from moco.modeling.resnet import resnet_encoder


class LinearEncoder(nn.Module):
    """Tiny encoder q = W x (flattened input) so keys and logits can be worked out by hand."""

    def __init__(self, num_classes, in_dim=3, bias=False):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes, bias=bias)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _r18_moco(**kw):
    kw = {"dim": 16, "K": 32, "m": 0.99, "T": 0.2, "shuffle_bn": "off", **kw}
    return MoCo(torchvision.models.resnet18, **kw)


def test_logits_labels_loss_and_queue_match_hand_computation():
    model = MoCo(LinearEncoder, dim=3, K=4, m=0.5, T=0.5, shuffle_bn="off")
    with torch.no_grad():
        model.encoder_q.fc.weight.copy_(torch.eye(3))
        model.encoder_k.fc.weight.copy_(torch.diag(torch.tensor([3.0, 1.0, 1.0])))
        # columns e1, e2, e3, -e1
        model.queue.copy_(torch.tensor([[1.0, 0, 0, -1], [0, 1, 0, 0], [0, 0, 1, 0]]))
    queue_before = model.queue.clone()
    im_q = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])  # q = (.6, .8, 0), (0, 0, 1)
    # key encoder after the momentum update: 0.5 * diag(3,1,1) + 0.5 * I = diag(2,1,1)
    im_k = torch.tensor([[1.5, 4.0, 0.0], [0.0, 3.0, 4.0]])  # k = (.6, .8, 0), (0, .6, .8)

    logits, labels = model(im_q, im_k)

    # l_pos = (1, .8); l_neg rows (.6, .8, 0, -.6) and (0, 0, 1, 0); everything / T = 0.5
    expected = torch.tensor([[2.0, 1.2, 1.6, 0.0, -1.2], [1.6, 0.0, 0.0, 2.0, 0.0]])
    torch.testing.assert_close(logits, expected)
    assert labels.dtype == torch.long and labels.tolist() == [0, 0]
    assert labels.device == logits.device
    loss = F.cross_entropy(logits, labels)
    by_hand = (torch.logsumexp(expected, dim=1) - expected[:, 0]).mean()
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(model.encoder_k.fc.weight, torch.diag(torch.tensor([2.0, 1.0, 1.0])))
    # enqueued keys at [0, 2), the rest untouched, pointer advanced
    torch.testing.assert_close(
        model.queue[:, :2], torch.tensor([[0.6, 0.0], [0.8, 0.6], [0.0, 0.8]])
    )
    torch.testing.assert_close(model.queue[:, 2:], queue_before[:, 2:])
    assert model.queue_ptr.tolist() == [2]

    # The gradient must use the negatives as they were at forward time (before the enqueue).
    loss.backward()
    w = torch.eye(3, requires_grad=True)
    q = F.normalize(im_q @ w.T, dim=1)
    k = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    ref_logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_before], dim=1) / 0.5
    F.cross_entropy(ref_logits, labels).backward()
    torch.testing.assert_close(model.encoder_q.fc.weight.grad, w.grad)


def test_queue_is_fifo_and_wraps_to_zero():
    torch.manual_seed(0)
    model = MoCo(functools.partial(LinearEncoder, in_dim=5), dim=4, K=12, m=0.0, shuffle_bn="off")
    init = model.queue.clone()
    keys = []
    for step in range(4):
        im_k = torch.randn(4, 5)
        with torch.no_grad():
            model(torch.randn(4, 5), im_k)
            keys.append(F.normalize(model.encoder_k(im_k), dim=1).T)  # m=0: encoder_k == encoder_q
        assert model.queue_ptr.item() == (4 * (step + 1)) % 12
        if step == 0:
            torch.testing.assert_close(model.queue[:, 0:4], keys[0])
            torch.testing.assert_close(model.queue[:, 4:], init[:, 4:])
    # after K/N = 3 steps the pointer wrapped; step 4 overwrote the oldest keys (step 1's)
    torch.testing.assert_close(model.queue[:, 0:4], keys[3])
    torch.testing.assert_close(model.queue[:, 4:8], keys[1])
    torch.testing.assert_close(model.queue[:, 8:12], keys[2])


def test_queue_size_must_be_multiple_of_batch_and_nothing_changes_on_error():
    model = MoCo(LinearEncoder, dim=3, K=10, shuffle_bn="off")
    with torch.no_grad():
        model.encoder_q.fc.weight.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"K=10 is not a multiple of the global batch 4"):
        model(torch.randn(4, 3), torch.randn(4, 3))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="im_q has 4 samples but im_k has 2"):
        MoCo(LinearEncoder, dim=3, K=8, shuffle_bn="off")(torch.randn(4, 3), torch.randn(2, 3))


def test_queue_initialised_l2_normalised_and_key_encoder_is_a_frozen_copy():
    model = _r18_moco()
    assert model.queue.shape == (16, 32) and model.queue.dtype == torch.float32
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(32))
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == (1,)
    sd_q, sd_k = model.encoder_q.state_dict(), model.encoder_k.state_dict()
    assert sd_q.keys() == sd_k.keys()
    assert all(torch.equal(sd_q[k], sd_k[k]) for k in sd_q)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.requires_grad for p in model.encoder_q.parameters())


@pytest.mark.parametrize("m", [0.5, 0.999])
def test_momentum_update_value(m):
    torch.manual_seed(0)
    model = MoCo(
        functools.partial(LinearEncoder, in_dim=6, bias=True), dim=4, K=8, m=m, shuffle_bn="off"
    )
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    model(torch.randn(2, 6), torch.randn(2, 6))
    for pq, pk, new in zip(q_before, k_before, model.encoder_k.parameters()):
        expected = pk * m + pq * (1.0 - m)
        assert not torch.equal(new, pk)
        if m == 0.5:  # halving is exact in binary: the fused update must match bit for bit
            assert torch.equal(new, expected)
        else:
            torch.testing.assert_close(new, expected, rtol=0, atol=1e-7)


def test_m0_copies_parameters_but_not_buffers():
    model = _r18_moco(m=0.0).eval()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.mul_(0.5)
        for name, buf in model.encoder_q.named_buffers():
            if name.endswith("running_mean"):
                buf.fill_(5.0)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk)
    # BN running stats of the key encoder come from its own forward, never from encoder_q
    k_bufs = dict(model.encoder_k.named_buffers())
    means = [name for name in k_bufs if name.endswith("running_mean")]
    assert means and all(torch.equal(k_bufs[n], torch.zeros_like(k_bufs[n])) for n in means)


def test_no_gradient_reaches_key_encoder_and_resnet_forward_shapes():
    torch.manual_seed(0)
    model = _r18_moco(mlp=True)
    logits, labels = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 1 + 32) and logits.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.long and not labels.any()
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    grads = [p.grad for p in model.encoder_q.parameters()]
    assert all(g is not None for g in grads)
    assert model.encoder_q.conv1.weight.grad.abs().sum() > 0
    assert model.encoder_q.fc[0].weight.grad.abs().sum() > 0


def test_logits_stay_float32_under_bf16_autocast():
    model = MoCo(functools.partial(LinearEncoder, in_dim=8), dim=4, K=8, shuffle_bn="off")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randn(2, 8), torch.randn(2, 8))
    assert logits.dtype == torch.float32 and model.queue.dtype == torch.float32
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(8), atol=1e-5, rtol=0)


def test_mlp_head_shapes_and_keys_resnet50():
    model = MoCo(torchvision.models.resnet50, dim=128, K=256, mlp=True, shuffle_bn="off")
    sd = model.state_dict()
    for enc in ("encoder_q", "encoder_k"):
        assert sd[f"{enc}.fc.0.weight"].shape == (2048, 2048)
        assert sd[f"{enc}.fc.0.bias"].shape == (2048,)
        assert sd[f"{enc}.fc.2.weight"].shape == (128, 2048)
        assert sd[f"{enc}.fc.2.bias"].shape == (128,)
        assert not any(k.startswith(f"{enc}.fc.1") for k in sd)
        assert f"{enc}.fc.weight" not in sd
    assert isinstance(model.encoder_q.fc[1], nn.ReLU)


def test_mlp_needs_linear_fc():
    with pytest.raises(ValueError, match="mlp=True needs an encoder whose head is an nn.Linear"):
        MoCo(lambda num_classes: nn.Conv2d(3, num_classes, 1), dim=8, K=8, mlp=True)


@pytest.mark.parametrize("mlp", [False, True])
def test_official_checkpoint_state_dict_round_trip(tmp_path, mlp):
    torch.manual_seed(0)
    src = _r18_moco(dim=128, K=256, mlp=mlp)
    with torch.no_grad():  # make encoder_q / encoder_k / buffers distinguishable
        for p in src.encoder_q.parameters():
            p.add_(1.0)
        src.queue_ptr.fill_(64)
    # The official key layout: torchvision keys under encoder_q/encoder_k, queue, queue_ptr.
    tv_keys = set(torchvision.models.resnet18(num_classes=128).state_dict())
    if mlp:
        tv_keys = {k for k in tv_keys if not k.startswith("fc.")}
        tv_keys |= {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}
    expected_keys = {f"{e}.{k}" for e in ("encoder_q", "encoder_k") for k in tv_keys}
    assert set(src.state_dict()) == expected_keys | {"queue", "queue_ptr"}

    ckpt = {
        "epoch": 3,
        "arch": "resnet18",
        "state_dict": {"module." + k: v for k, v in src.state_dict().items()},
        "optimizer": {},
    }
    path = tmp_path / "checkpoint_0002.pth.tar"
    torch.save(ckpt, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k[len("module.") :]: v for k, v in loaded["state_dict"].items()}
    for mode in ("off", "split", "sync"):
        dst = _r18_moco(dim=128, K=256, mlp=mlp, shuffle_bn=mode)
        result = dst.load_state_dict(sd, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for key, value in dst.state_dict().items():
            assert torch.equal(value, sd[key]), (mode, key)


def test_shuffle_bn_mode_validation():
    with pytest.raises(ValueError, match="unknown shuffle_bn mode 'bogus'.*ddp, split, sync, off"):
        MoCo(LinearEncoder, dim=3, K=4, shuffle_bn="bogus")
    assert MoCo(LinearEncoder, dim=3, K=4, shuffle_bn="auto").shuffle_bn == "split"
    model = MoCo(LinearEncoder, dim=3, K=4, shuffle_bn="ddp")
    with pytest.raises(ValueError, match="shuffle_bn='ddp' needs an initialised torch.distributed"):
        model(torch.randn(2, 3), torch.randn(2, 3))


def test_resnet_encoder_names():
    assert resnet_encoder("resnet50") is torchvision.models.resnet50
    assert resnet_encoder("resnext50_32x4d") is torchvision.models.resnext50_32x4d
    assert resnet_encoder("wide_resnet101_2") is torchvision.models.wide_resnet101_2
    msg = r"unknown ResNet arch 'vgg16'; choose one of: resnet18, .*resnet152"
    with pytest.raises(ValueError, match=msg):
        resnet_encoder("vgg16")
