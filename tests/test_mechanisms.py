"""Contrastive mechanisms: memory bank rule and sampling, end-to-end negatives, NT-Xent by hand,
heads, config checks, training in 1 process (engine, checkpoint/resume of the bank) and in 2 gloo
processes (gradient of the gathered loss, identical banks, the pretraining CLI)."""

import datetime
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from conftest import REPO
from test_engine import tiny_cfg
from torch import nn

from moco.config import get_cfg
from moco.engine.trainer import PretrainTrainer, validate_cfg
from moco.modeling.build import build_contrastive_model
from moco.modeling.end_to_end import EndToEnd
from moco.modeling.heads import attach_head
from moco.modeling.losses import batch_info_nce_logits, info_nce, nt_xent, nt_xent_logits
from moco.modeling.memory_bank import MemoryBank, MemoryBankModel


class LinearEncoder(nn.Module):
    def __init__(self, num_classes, in_dim=5):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes, bias=False)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------- memory bank


def test_memory_bank_update_is_momentum_half_then_renormalised():
    bank = MemoryBank(size=5, dim=3)
    assert bank.momentum == 0.5
    torch.testing.assert_close(bank.bank.norm(dim=1), torch.ones(5))
    with torch.no_grad():
        bank.bank.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]]))
    before = bank.bank.clone()
    feats = torch.tensor([[0.0, 0, 1], [0.6, 0.8, 0]])
    bank.update(torch.tensor([1, 3]), feats)
    # entry 1: 0.5*(0,1,0) + 0.5*(0,0,1) = (0, .5, .5) -> (0, 1, 1)/sqrt2
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(bank.bank[1], torch.tensor([0.0, s, s]))
    # entry 3: 0.5*(1,0,0) + 0.5*(.6,.8,0) = (.8, .4, 0) -> normalised
    torch.testing.assert_close(bank.bank[3], F.normalize(torch.tensor([0.8, 0.4, 0.0]), dim=0))
    for i in (0, 2, 4):
        assert torch.equal(bank.bank[i], before[i])
    with pytest.raises(ValueError, match=r"index out of range \[0, 5\)"):
        bank.update(torch.tensor([5]), feats[:1])


def test_memory_bank_sampling_is_uniform_with_replacement():
    bank = MemoryBank(size=8, dim=4)
    entries, idx = bank.sample(40000, generator=torch.Generator().manual_seed(0))
    assert entries.shape == (4, 40000) and idx.shape == (40000,)
    torch.testing.assert_close(entries, bank.bank[idx].t())
    counts = torch.bincount(idx, minlength=8).float()
    # 5000 expected per entry, binomial std ~66: within 5% everywhere
    assert (counts - 5000).abs().max() < 250, counts
    assert bank.sample(3)[0].shape == (4, 3)
    with pytest.raises(ValueError, match="momentum must be in"):
        MemoryBank(4, 2, momentum=1.0)


def test_memory_bank_model_positive_is_the_entry_before_its_update():
    torch.manual_seed(0)
    model = MemoryBankModel(LinearEncoder, size=10, dim=4, K=7, T=0.5, shuffle_bn="off")
    index = torch.tensor([2, 5, 9])
    before = model.memory_bank.bank.clone()
    im_q = torch.randn(3, 5)
    logits, labels = model(im_q, torch.randn(3, 5), index)
    assert logits.shape == (3, 1 + 7) and labels.tolist() == [0, 0, 0]
    q = F.normalize(model.encoder_q(im_q), dim=1)
    torch.testing.assert_close(logits[:, 0], (q * before[index]).sum(1) / 0.5)
    expected = F.normalize(0.5 * before[index] + 0.5 * q.detach(), dim=1)
    torch.testing.assert_close(model.memory_bank.bank[index], expected)
    untouched = [i for i in range(10) if i not in index.tolist()]
    assert torch.equal(model.memory_bank.bank[untouched], before[untouched])
    # every negative column is a bank entry (the bank as it was during the forward)
    negs = logits[:, 1:] * 0.5
    for col in range(7):
        assert any(torch.allclose(negs[:, col], q @ before[j], atol=1e-5) for j in range(10))
    F.cross_entropy(logits, labels).backward()  # the gradient reaches the encoder only
    assert model.encoder_q.fc.weight.grad is not None and model.memory_bank.bank.grad is None


# ---------------------------------------------------------------- losses


def test_end_to_end_has_batch_minus_one_negatives():
    torch.manual_seed(0)
    model = EndToEnd(LinearEncoder, dim=4, T=0.2, shuffle_bn="off")
    im_q, im_k = torch.randn(6, 5), torch.randn(6, 5)
    logits, labels = model(im_q, im_k)
    assert logits.shape == (6, 6) and labels.tolist() == list(range(6))  # 1 positive + 5 negatives
    q = F.normalize(model.encoder_q(im_q), dim=1)
    k = F.normalize(model.encoder_q(im_k), dim=1)
    torch.testing.assert_close(logits, q @ k.t() / 0.2)
    F.cross_entropy(logits, labels).backward()
    # keys carry gradient (no momentum encoder): zeroing q's path leaves a non-zero gradient
    model.zero_grad()
    logits, labels = batch_info_nce_logits(
        q.detach(), F.normalize(model.encoder_q(im_k), dim=1), 0.2
    )
    F.cross_entropy(logits, labels).backward()
    assert model.encoder_q.fc.weight.grad.abs().sum() > 0


def test_end_to_end_split_bn_shuffles_keys_but_returns_them_in_order():
    torch.manual_seed(0)
    model = EndToEnd(
        torchvision.models.resnet18, dim=8, T=0.2, shuffle_bn="split", split_bn_groups=2
    )
    im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    logits, labels = model(im_q, im_k)
    assert logits.shape == (4, 4) and labels.tolist() == [0, 1, 2, 3]
    assert torch.isfinite(logits).all()


def test_nt_xent_matches_hand_computation():
    T = 0.5
    z1, z2 = _unit(3, 4, seed=1), _unit(3, 4, seed=2)
    z = [z1[0], z2[0], z1[1], z2[1], z1[2], z2[2]]  # SimCLR's order: 2k-1, 2k are a pair

    def loss(i, j):  # SimCLR paper: -log exp(s_ij/T) / sum_{k != i} exp(s_ik/T)
        den = sum(math.exp(float(z[i] @ z[k]) / T) for k in range(6) if k != i)
        return -math.log(math.exp(float(z[i] @ z[j]) / T) / den)

    by_hand = sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(3)) / 6
    assert nt_xent(z1, z2, T).item() == pytest.approx(by_hand, rel=1e-5)
    logits, labels = nt_xent_logits(z1, z2, T)
    assert logits.shape == (6, 5)  # each anchor: 1 positive + 2N - 2 = 4 negatives
    # symmetric in the views
    assert nt_xent(z2, z1, T).item() == pytest.approx(by_hand, rel=1e-5)


def test_info_nce_matches_hand_computation():
    q, k, neg = _unit(2, 3, seed=3), _unit(2, 3, seed=4), _unit(5, 3, seed=5).t()
    T = 0.07
    by_hand = 0.0
    for i in range(2):
        pos = math.exp(float(q[i] @ k[i]) / T)
        by_hand -= math.log(
            pos / (pos + sum(math.exp(float(q[i] @ neg[:, j]) / T) for j in range(5)))
        )
    assert info_nce(q, k, neg, T).item() == pytest.approx(by_hand / 2, rel=1e-5)


# ---------------------------------------------------------------- heads and config


def test_heads_keep_fc_keys_and_output_dim():
    x = torch.randn(4, 3, 32, 32)
    for head, keys in [
        ("linear", {"fc.weight", "fc.bias"}),
        ("mlp", {"fc.0.weight", "fc.2.weight"}),
        ("simclr_v2", {"fc.0.weight", "fc.1.weight", "fc.3.weight", "fc.6.weight", "fc.7.weight"}),
    ]:
        enc = attach_head(torchvision.models.resnet18(num_classes=16), head)
        assert keys <= set(enc.state_dict()), head
        assert enc(x).shape == (4, 16)
    enc = attach_head(torchvision.models.resnet18(num_classes=16), "simclr_v2")
    linears = [m for m in enc.fc if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(512, 512), (512, 512), (16, 512)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in enc.fc) == 3
    with pytest.raises(ValueError, match="unknown head 'mlp3'"):
        attach_head(torchvision.models.resnet18(), "mlp3")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"MODEL.LOSS": "nt_xent"},
            "MODEL.LOSS nt_xent .* needs MODEL.MECHANISM end_to_end, not moco",
        ),
        ({"MODEL.MECHANISM": "bank"}, "unknown MODEL.MECHANISM 'bank'"),
        (
            {"MODEL.HEAD": "simclr_v2"},
            "MODEL.MLP \\(--mlp\\) selects the 'mlp' head but MODEL.HEAD is",
        ),
        ({"MODEL.MECHANISM": "memory_bank", "MODEL.K": 0}, "MODEL.K \\(negatives drawn"),
        (
            {"MODEL.MECHANISM": "memory_bank", "MODEL.MEMORY_BANK_MOMENTUM": 1.0},
            "MEMORY_BANK_MOMENTUM",
        ),
    ],
)
def test_incompatible_settings_are_one_line_errors(synthetic_root, tmp_path, overrides, message):
    cfg = tiny_cfg(synthetic_root, tmp_path, **overrides)  # tiny_cfg has MODEL.MLP True
    with pytest.raises(ValueError, match=message):
        validate_cfg(cfg, 1)


def test_k_need_not_divide_the_batch_outside_moco(synthetic_root, tmp_path):
    for mech in ("end_to_end", "memory_bank"):
        validate_cfg(
            tiny_cfg(synthetic_root, tmp_path, **{"MODEL.MECHANISM": mech, "MODEL.K": 20}), 1
        )
    cfg = get_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.MLP, cfg.MODEL.HEAD = "resnet18", False, "simclr_v2"
    cfg.MODEL.MECHANISM, cfg.MODEL.LOSS = "end_to_end", "nt_xent"
    model = build_contrastive_model(cfg, 1)
    assert isinstance(model, EndToEnd) and model.loss == "nt_xent" and len(model.encoder_q.fc) == 8
    cfg.MODEL.MECHANISM, cfg.MODEL.LOSS = "memory_bank", "info_nce"
    with pytest.raises(ValueError, match="dataset size"):
        build_contrastive_model(cfg, 1)


# ---------------------------------------------------------------- training, 1 process


@pytest.mark.parametrize(
    "mechanism, extra",
    [
        ("end_to_end", {}),
        ("end_to_end", {"MODEL.LOSS": "nt_xent", "MODEL.MLP": False, "MODEL.HEAD": "simclr_v2"}),
        ("memory_bank", {}),
    ],
)
def test_mechanism_trains_with_the_engine(synthetic_root, tmp_path, one_thread, mechanism, extra):
    cfg = tiny_cfg(
        synthetic_root,
        tmp_path,
        **{"MODEL.MECHANISM": mechanism, "SOLVER.EPOCHS": 1, "KNN.AT_START": False, **extra},
    )
    summary = PretrainTrainer(cfg).train()
    assert summary["mechanism"] == mechanism and summary["max_iter"] == 3
    assert summary["shuffle_bn"] == "split" and len(summary["knn"]) == 1
    with open(tmp_path / "metrics.json") as f:
        rows = [json.loads(line) for line in f if "total_loss" in line]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["total_loss"]) for r in rows)
    ckpt = torch.load(tmp_path / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert "module.encoder_q.conv1.weight" in keys and not any("encoder_k" in k for k in keys)
    assert ("module.memory_bank.bank" in keys) == (mechanism == "memory_bank")


def test_memory_bank_is_saved_and_restored_on_resume(synthetic_root, tmp_path, one_thread):
    cfg = tiny_cfg(
        synthetic_root,
        tmp_path / "a",
        **{"MODEL.MECHANISM": "memory_bank", "KNN.PERIOD": 0, "MODEL.K": 50},
    )
    PretrainTrainer(cfg).train()  # 2 epochs
    first = torch.load(
        tmp_path / "a" / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True
    )
    last = torch.load(
        tmp_path / "a" / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True
    )
    bank0, bank1 = (
        first["state_dict"]["module.memory_bank.bank"],
        last["state_dict"]["module.memory_bank.bank"],
    )
    assert bank0.shape == (30, 32)
    # one epoch visits 3 x 8 = 24 of 30 samples: those entries moved, the bank stays unit-norm
    assert 0 < (bank0 != bank1).any(dim=1).sum() <= 24 + 24
    torch.testing.assert_close(bank1.norm(dim=1), torch.ones(30))
    cfg_b = tiny_cfg(
        synthetic_root,
        tmp_path / "b",
        **{"MODEL.MECHANISM": "memory_bank", "KNN.PERIOD": 0, "MODEL.K": 50},
    )
    trainer = PretrainTrainer(cfg_b, resume=str(tmp_path / "a" / "checkpoint_0000.pth.tar"))
    assert torch.equal(trainer.moco.memory_bank.bank, bank0)
    trainer.train()
    resumed = torch.load(
        tmp_path / "b" / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True
    )
    # same sampler seed, RNG streams and bank: the resumed run ends with the same bank
    torch.testing.assert_close(resumed["state_dict"]["module.memory_bank.bank"], bank1)


# ---------------------------------------------------------------- 2 gloo processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_loss_worker(rank, world, port):
    """The DDP gradient of the gathered end-to-end / NT-Xent loss equals the 1-process gradient
    on the whole batch; the memory bank stays identical on both ranks."""
    torch.set_num_threads(1)
    n = 4
    g = torch.Generator().manual_seed(0)
    im_q, im_k = torch.randn(world * n, 5, generator=g), torch.randn(world * n, 5, generator=g)
    mine = slice(rank * n, (rank + 1) * n)
    ref_grads = {}
    for loss in ("info_nce", "nt_xent"):  # before the process group exists: one process, B = 8
        torch.manual_seed(1)
        ref = EndToEnd(LinearEncoder, dim=4, T=0.3, shuffle_bn="off", loss=loss)
        F.cross_entropy(*ref(im_q, im_k)).backward()
        ref_grads[loss] = ref.encoder_q.fc.weight.grad
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for loss in ("info_nce", "nt_xent"):
            torch.manual_seed(1)
            model = EndToEnd(LinearEncoder, dim=4, T=0.3, shuffle_bn="off", loss=loss)
            ddp = nn.parallel.DistributedDataParallel(model)
            logits, labels = ddp(im_q[mine], im_k[mine])
            expected_width = world * n if loss == "info_nce" else 2 * world * n - 1
            assert logits.shape[1] == expected_width
            F.cross_entropy(logits, labels).backward()  # DDP averages the ranks' gradients
            torch.testing.assert_close(model.encoder_q.fc.weight.grad, ref_grads[loss])

        # ddp Shuffle BN for the end-to-end keys: shuffled across ranks, gathered back in order
        torch.manual_seed(2)
        model = EndToEnd(LinearEncoder, dim=4, T=0.3, shuffle_bn="ddp")
        logits, labels = model(im_q[mine], im_k[mine])
        with torch.no_grad():
            k_all = F.normalize(model.encoder_q(im_k), dim=1)
            q = F.normalize(model.encoder_q(im_q[mine]), dim=1)
        torch.testing.assert_close(logits, q @ k_all.t() / 0.3)
        assert labels.tolist() == list(range(rank * n, (rank + 1) * n))

        torch.manual_seed(10 + rank)  # different initial banks: the first forward syncs rank 0's
        mb = MemoryBankModel(LinearEncoder, size=12, dim=4, K=5, shuffle_bn="off")
        ddp = nn.parallel.DistributedDataParallel(mb)
        rank0_bank = mb.memory_bank.bank.clone()
        dist.broadcast(rank0_bank, src=0)
        index = torch.tensor([0, 3, 6, 9]) + rank  # rank 0: 0 3 6 9, rank 1: 1 4 7 10
        ddp(im_q[mine], im_k[mine], index)[0].sum().backward()
        banks = [torch.empty_like(mb.memory_bank.bank) for _ in range(world)]
        dist.all_gather(banks, mb.memory_bank.bank)
        assert torch.equal(banks[0], banks[1])
        changed = (banks[0] != rank0_bank).any(dim=1)
        assert changed.nonzero().flatten().tolist() == [
            0,
            1,
            3,
            4,
            6,
            7,
            9,
            10,
        ]  # both ranks' samples
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_gathered_losses_and_bank_in_two_gloo_processes():
    mp.spawn(_gathered_loss_worker, args=(2, _free_port()), nprocs=2, join=True)


def pretrain_in_two_processes(synthetic_root, out, opts):
    """tools/pretrain.py in 2 CPU processes (gloo), 1 epoch of 32-px crops; returns the summary."""
    data = os.path.join(synthetic_root, "imagefolder")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "pretrain.py"),
            "--config-file",
            os.path.join(REPO, "configs", "pretrain", "moco_v2_R18_cpu.yaml"),
            "--num-gpus",
            "2",
            "-b",
            "8",
            "--epochs",
            "1",
            "-j",
            "0",
            "--output-dir",
            str(out),
            data,
            "INPUT.CROP_SIZE",
            "32",
            "MODEL.DIM",
            "16",
            "KNN.PERIOD",
            "0",
            *opts,
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "pretrain_summary.json") as f:
        return json.load(f)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "mechanism, extra",
    [
        ("end_to_end", []),
        ("memory_bank", ["MODEL.K", "40"]),
    ],
)
def test_mechanism_trains_in_two_processes_via_cli(synthetic_root, tmp_path, mechanism, extra):
    s = pretrain_in_two_processes(
        synthetic_root, tmp_path / mechanism, ["MODEL.MECHANISM", mechanism, *extra]
    )
    assert s["world_size"] == 2 and s["mechanism"] == mechanism and s["shuffle_bn"] == "ddp"
    digests = s["queue_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical banks on both ranks
