"""Shuffle BN modes: SplitBatchNorm statistics, in-batch and cross-process shuffles, sync / off."""

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

from moco.modeling.moco import MoCo
from moco.modeling.shuffle_bn import (
    SplitBatchNorm,
    batch_shuffle_single,
    batch_unshuffle_single,
    convert_split_batchnorm,
    resolve_shuffle_bn,
)
from moco.utils.dist import concat_all_gather


class SmallConvNet(nn.Module):
    """conv-BN-ReLU-pool-fc: the smallest encoder whose keys depend on BN batch statistics."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn1(self.conv1(x))).mean(dim=(2, 3)))


def _record_key_encoder(model):
    """Forward hook on encoder_k: returns the list that receives (input, output) of each call."""
    seen = []
    model.encoder_k.register_forward_hook(
        lambda mod, args, out: seen.append((args[0].detach().clone(), out.detach().clone()))
    )
    return seen


def _positions(shuffled, original):
    """pos[i] = row of ``shuffled`` that equals ``original[i]`` (rows are unique random tensors)."""
    pos = []
    for row in original:
        hits = [p for p in range(shuffled.shape[0]) if torch.equal(shuffled[p], row)]
        assert len(hits) == 1
        pos.append(hits[0])
    return torch.tensor(pos)


# ---------------------------------------------------------------- SplitBatchNorm


def test_split_batchnorm_statistics_are_per_sub_batch():
    torch.manual_seed(0)
    G, C = 4, 3
    bn = SplitBatchNorm(C, num_splits=G)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    # sub-batches with very different statistics, so whole-batch BN would differ clearly
    scale = torch.arange(1, 9.0).view(8, 1, 1, 1)
    x = torch.randn(8, C, 5, 5) * scale + 2 * scale
    x.requires_grad_(True)
    out = bn(x)

    w_ref = bn.weight.detach().clone().requires_grad_(True)
    b_ref = bn.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.empty_like(out)
    ref_parts = [
        F.batch_norm(x_ref[j::G], None, None, w_ref, b_ref, True, 0.1, bn.eps) for j in range(G)
    ]
    for j in range(G):
        ref[j::G] = ref_parts[j]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    whole = F.batch_norm(x.detach(), None, None, w_ref.detach(), b_ref.detach(), True)
    assert not torch.allclose(out, whole, atol=1e-2)

    # gradients equal those of per-sub-batch BN
    g = torch.arange(out.numel()).view_as(out).sin()
    (out * g).sum().backward()
    sum((ref_parts[j] * g[j::G]).sum() for j in range(G)).backward()
    torch.testing.assert_close(bn.weight.grad, w_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)

    # running stats: momentum 0.1 from (0, 1), per sub-batch, folded back as the mean over splits
    xs = x.detach()
    split_means = torch.stack([xs[j::G].mean(dim=(0, 2, 3)) for j in range(G)])
    split_vars = torch.stack([xs[j::G].transpose(0, 1).reshape(C, -1).var(dim=1) for j in range(G)])
    torch.testing.assert_close(bn.running_mean, 0.1 * split_means.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * split_vars.mean(0))
    assert bn.num_batches_tracked.item() == 1


def test_split_batchnorm_eval_is_plain_bn_and_checks_divisibility():
    bn = SplitBatchNorm(3, num_splits=4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    x = torch.randn(6, 3, 4, 4)  # 6 is not divisible by 4: fine in eval
    bn.eval()
    expected = F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps
    )
    torch.testing.assert_close(bn(x), expected)
    bn.train()
    msg = r"batch size 6 is not divisible by num_splits=4 \(MODEL.SPLIT_BN_GROUPS\)"
    with pytest.raises(ValueError, match=msg):
        bn(x)


def test_split_batchnorm_keeps_batchnorm2d_keys_and_convert_keeps_values():
    assert set(SplitBatchNorm(8, 2).state_dict()) == set(nn.BatchNorm2d(8).state_dict())
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    net = convert_split_batchnorm(net, 4)
    split = [m for m in net.modules() if isinstance(m, SplitBatchNorm)]
    assert len(split) == n_bn == 20 and all(m.num_splits == 4 for m in split)
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_resolve_shuffle_bn():
    assert resolve_shuffle_bn("auto") == "split"  # no process group here
    assert resolve_shuffle_bn("auto", world_size=1) == "split"
    assert resolve_shuffle_bn("auto", world_size=4) == "ddp"
    assert [resolve_shuffle_bn(m) for m in ("ddp", "split", "sync", "off")] == [
        "ddp",
        "split",
        "sync",
        "off",
    ]
    with pytest.raises(ValueError, match=r"unknown shuffle_bn mode 'shuffle' \(MODEL.SHUFFLE_BN\)"):
        resolve_shuffle_bn("shuffle")


def test_single_process_shuffle_restores_order():
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    shuffled, idx_unshuffle = batch_shuffle_single(x)
    assert not torch.equal(shuffled, x)
    assert torch.equal(batch_unshuffle_single(shuffled, idx_unshuffle), x)


# ---------------------------------------------------------------- MoCo in split / sync / off


def test_split_mode_shuffles_keys_across_sub_batches_and_restores_order():
    torch.manual_seed(0)
    G, N = 4, 16
    model = MoCo(
        torchvision.models.resnet18,
        dim=16,
        K=32,
        m=0.99,
        T=0.2,
        shuffle_bn="split",
        split_bn_groups=G,
    )
    for enc in (model.encoder_q, model.encoder_k):
        bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) == 20 and all(type(m) is SplitBatchNorm and m.num_splits == G for m in bns)
    seen = _record_key_encoder(model)
    im_q, im_k = torch.randn(N, 3, 32, 32), torch.randn(N, 3, 32, 32)
    logits, _ = model(im_q, im_k)

    enc_in, enc_out = seen[0]
    pos = _positions(enc_in, im_k)
    assert sorted(pos.tolist()) == list(range(N))
    # the query of sample i is normalised in sub-batch i % G, its key in sub-batch pos[i] % G
    moved = (pos % G != torch.arange(N) % G).sum().item()
    assert moved >= N // 2
    # key i is the key encoder's output for im_k[i], back in the original order
    k = F.normalize(enc_out[pos], dim=1)
    torch.testing.assert_close(model.queue[:, :N], k.T)
    # running stats of both encoders were updated by the split forward
    for enc in (model.encoder_q, model.encoder_k):
        assert enc.bn1.num_batches_tracked.item() == 1
        assert enc.bn1.running_mean.abs().sum() > 0
    assert not torch.equal(model.encoder_q.bn1.running_mean, model.encoder_k.bn1.running_mean)


def _logits_for_mode(mode, state, im_q, im_k, **kw):
    model = MoCo(torchvision.models.resnet18, dim=16, K=32, m=0.99, T=0.2, shuffle_bn=mode, **kw)
    model.load_state_dict(state)
    seen = _record_key_encoder(model)
    logits, _ = model(im_q, im_k)
    return model, logits, seen[0][0]


def test_sync_and_off_modes_plain_bn_types_no_shuffle_and_split1_matches_off():
    torch.manual_seed(0)
    state = MoCo(torchvision.models.resnet18, dim=16, K=32, shuffle_bn="off").state_dict()
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)

    off, logits_off, enc_in_off = _logits_for_mode("off", state, im_q, im_k)
    bn_types = {type(m) for m in off.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bn_types == {nn.BatchNorm2d}
    assert torch.equal(enc_in_off, im_k)  # no shuffle

    sync, logits_sync, enc_in_sync = _logits_for_mode("sync", state, im_q, im_k)
    bn_types = {type(m) for m in sync.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bn_types == {nn.SyncBatchNorm}
    assert torch.equal(enc_in_sync, im_k)
    # without a process group SyncBatchNorm is plain BN
    torch.testing.assert_close(logits_sync, logits_off)

    # one split = whole-batch BN; the in-batch shuffle is undone exactly
    split1, logits_split1, enc_in_split1 = _logits_for_mode(
        "split", state, im_q, im_k, split_bn_groups=1
    )
    assert not torch.equal(enc_in_split1, im_k)
    torch.testing.assert_close(logits_split1, logits_off, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split1.queue, off.queue, rtol=1e-5, atol=1e-5)

    # 4 splits: key statistics differ from whole-batch BN
    _, logits_split4, _ = _logits_for_mode("split", state, im_q, im_k, split_bn_groups=4)
    assert not torch.allclose(logits_split4, logits_off, atol=1e-3)


# ---------------------------------------------------------------- ddp across 2 gloo processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port):
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        N, K = 8, 64
        torch.manual_seed(0)
        model = MoCo(SmallConvNet, dim=8, K=K, m=0.9, T=0.2, shuffle_bn="ddp")
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # different data per rank; rank 0's permutation is used
        im_q, im_k = torch.randn(N, 3, 8, 8), torch.randn(N, 3, 8, 8)
        seen = _record_key_encoder(model)
        logits, labels = ddp(im_q, im_k)
        F.cross_entropy(logits, labels).backward()
        assert all(p.grad is None for p in model.encoder_k.parameters())

        enc_in, enc_out = seen[0]
        assert enc_in.shape == im_k.shape
        all_in, all_out = concat_all_gather(enc_in), concat_all_gather(enc_out)
        all_k = concat_all_gather(im_k)
        pos = _positions(all_in, all_k)  # global sample g was encoded at row pos[g]
        encoded_on = pos // N
        owner = torch.arange(world * N) // N
        assert (encoded_on != owner).sum() > 0, "no key was encoded on another process"
        assert (encoded_on == owner).sum() < world * N

        # unshuffle: the queue holds the keys of both ranks in global sample order
        k_all = F.normalize(all_out[pos], dim=1)
        torch.testing.assert_close(model.queue[:, : world * N], k_all.T)
        assert model.queue_ptr.item() == world * N
        # the positive logit pairs q_i with the key of this rank's own im_k[i]
        with torch.no_grad():
            q = F.normalize(model.encoder_q(im_q), dim=1)
        k_mine = k_all[rank * N : (rank + 1) * N]
        torch.testing.assert_close(logits[:, 0] * 0.2, (q * k_mine).sum(1), rtol=1e-4, atol=1e-5)

        def queues_identical():
            queues = concat_all_gather(model.queue[None])
            return all(torch.equal(queues[0], queues[r]) for r in range(world))

        assert queues_identical()
        ddp(torch.randn(N, 3, 8, 8), torch.randn(N, 3, 8, 8))
        identical = queues_identical()
        assert model.queue_ptr.item() == 2 * world * N and identical

        # K must divide the *global* batch (N per rank x world)
        msg = f"global batch {world * N} \\({N} per process x {world} processes\\)"
        with pytest.raises(ValueError, match=msg):
            MoCo(SmallConvNet, dim=8, K=40, shuffle_bn="ddp")(im_q, im_k)
        # torch's SyncBatchNorm refuses CPU tensors under torch.distributed: a clear error instead
        with pytest.raises(ValueError, match="shuffle_bn='sync'.*use 'ddp'"):
            MoCo(SmallConvNet, dim=8, K=K, shuffle_bn="sync")(im_q, im_k)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_ddp_mode_two_gloo_processes_shuffle_across_ranks():
    mp.spawn(_ddp_worker, args=(2, _free_port()), nprocs=2, join=True)
