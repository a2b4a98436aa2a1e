"""CMC: the Lab split against textbook values and OpenCV, both loss directions and the dictionary
updates by hand (memory bank and MoCo queue), kNN on the concatenated views, training with the
engine (checkpoint with both encoders and dictionaries, exact resume, crafted pointer refused),
and the same gradients, banks and queues in 1 process and in 2 gloo processes."""

import datetime
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_engine import tiny_cfg
from test_mechanisms import _free_port, pretrain_in_two_processes
from torch import nn

from moco.checkpoint import load_checkpoint
from moco.data.augment import IMAGENET_MEAN, IMAGENET_STD
from moco.engine.trainer import PretrainTrainer, validate_cfg
from moco.evaluation.knn import extract_features
from moco.modeling.cmc import CMC
from moco.modeling.lab import LAB_MEAN, LAB_STD, LabSplit, rgb_to_lab

_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _normalized(rgb):
    return (rgb - _MEAN) / _STD


def _rows(logits, n):
    return logits[:n], logits[n:]


# ---------------------------------------------------------------- Lab split


def test_rgb_to_lab_gives_the_textbook_values_and_agrees_with_opencv():
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]]).view(1, 5, 3)
    lab = rgb_to_lab(colours.permute(2, 0, 1).unsqueeze(0).double())[0].permute(1, 2, 0)[0]
    # CIE L*a*b* of the sRGB primaries, white and black (D65)
    expected = torch.tensor(
        [
            [53.2408, 80.0925, 67.2032],
            [87.7347, -86.1827, 83.1793],
            [32.2970, 79.1875, -107.8602],
            [100, 0, 0],
            [0, 0, 0],
        ],
        dtype=torch.double,
    )
    torch.testing.assert_close(lab, expected, atol=2e-3, rtol=0)
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = rgb_to_lab(rgb).permute(0, 2, 3, 1).numpy()
    ref = np.stack(
        [
            cv2.cvtColor(np.ascontiguousarray(im.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2Lab)
            for im in rgb
        ]
    )
    # OpenCV's float path is fixed point (a, b in steps of 1/64): agreement within half a unit
    assert np.abs(ours - ref).max() < 0.5


def test_lab_split_undoes_the_loader_normalisation_and_scales_each_view():
    rgb = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    l_view, ab_view = LabSplit()(_normalized(rgb))
    assert l_view.shape == (3, 1, 8, 8) and ab_view.shape == (3, 2, 8, 8)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(l_view[:, 0], (lab[:, 0] - 50.0) / 50.0, atol=1e-4, rtol=0)
    for c in (1, 2):
        expected = (lab[:, c] - LAB_MEAN[c]) / LAB_STD[c]
        torch.testing.assert_close(ab_view[:, c - 1], expected, atol=1e-4, rtol=0)
    # grey pixels have no colour: ab is the normalised zero
    grey = torch.full((1, 3, 2, 2), 0.5)
    _, ab = LabSplit()(_normalized(grey))
    zero_ab = torch.tensor([-LAB_MEAN[1] / LAB_STD[1], -LAB_MEAN[2] / LAB_STD[2]])
    torch.testing.assert_close(ab[0, :, 0, 0], zero_ab, atol=1e-4, rtol=0)
    assert LabSplit().state_dict() == {}  # constants, not checkpoint content


# ---------------------------------------------------------------- both directions by hand

N, DIM, K, T = 4, 8, 6, 0.2


def _images(seed=0, n=N):
    return _normalized(torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))


def _features(model, view, x, encoder="encoder_q"):
    with torch.no_grad():
        l_view, ab_view = model.lab(x)
        return F.normalize(
            getattr(getattr(model, view), encoder)(l_view if view == "l" else ab_view), dim=1
        )


def _info_nce_by_hand(q, pos, negs, t):
    """Mean over rows of -log(exp(q.pos/t) / (exp(q.pos/t) + sum_j exp(q.neg_j/t)))."""
    total = 0.0
    for i in range(q.shape[0]):
        p = math.exp(float(q[i] @ pos[i]) / t)
        n = sum(math.exp(float(q[i] @ negs[:, j]) / t) for j in range(negs.shape[1]))
        total -= math.log(p / (p + n))
    return total / q.shape[0]


def test_memory_bank_cmc_both_directions_and_bank_updates_by_hand():
    torch.manual_seed(0)
    model = CMC("resnet18_w8", "memory_bank", size=10, dim=DIM, K=K, T=T, shuffle_bn="off").eval()
    x, index = _images(), torch.tensor([1, 4, 7, 8])
    bank_l, bank_ab = model.l.memory_bank.bank.clone(), model.ab.memory_bank.bank.clone()
    torch.manual_seed(5)
    logits, labels = model(x, None, index)
    torch.manual_seed(5)  # the negatives: K from ab's bank (L -> ab), then K from L's (ab -> L)
    neg_ab, neg_l = torch.randint(10, (K,)), torch.randint(10, (K,))
    q_l, q_ab = _features(model, "l", x), _features(model, "ab", x)
    assert logits.shape == (2 * N, 1 + K) and labels.tolist() == [0] * (2 * N)
    l_to_ab, ab_to_l = _rows(logits, N)
    torch.testing.assert_close(
        l_to_ab,
        torch.cat([(q_l * bank_ab[index]).sum(1, keepdim=True), q_l @ bank_ab[neg_ab].t()], 1) / T,
    )
    torch.testing.assert_close(
        ab_to_l,
        torch.cat([(q_ab * bank_l[index]).sum(1, keepdim=True), q_ab @ bank_l[neg_l].t()], 1) / T,
    )
    by_hand = (
        _info_nce_by_hand(q_l, bank_ab[index], bank_ab[neg_ab].t(), T)
        + _info_nce_by_hand(q_ab, bank_l[index], bank_l[neg_l].t(), T)
    ) / 2
    loss = F.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    # each view's bank: its own features, momentum 0.5, renormalised; other entries untouched
    for bank, old, q in (
        (model.l.memory_bank.bank, bank_l, q_l),
        (model.ab.memory_bank.bank, bank_ab, q_ab),
    ):
        torch.testing.assert_close(bank[index], F.normalize(0.5 * old[index] + 0.5 * q, dim=1))
    rest = [i for i in range(10) if i not in index.tolist()]
    assert torch.equal(model.l.memory_bank.bank[rest], bank_l[rest])
    assert torch.equal(model.ab.memory_bank.bank[rest], bank_ab[rest])
    loss.backward()  # both encoders learn; the banks are no parameters
    for view in (model.l, model.ab):
        assert view.encoder_q.conv1.weight.grad.abs().sum() > 0
    assert (
        model.l.encoder_q.conv1.weight.shape[1] == 1
        and model.ab.encoder_q.conv1.weight.shape[1] == 2
    )
    assert model.l.encoder_q.conv1.weight.shape[0] == 4  # half of base width 8


def test_queue_cmc_both_directions_momentum_and_enqueue_by_hand():
    torch.manual_seed(0)
    m = 0.9
    model = CMC("resnet18_w8", "moco", dim=DIM, K=8, m=m, T=T, shuffle_bn="off").eval()
    with torch.no_grad():  # key encoders apart from the query encoders, so the update shows
        for view in (model.l, model.ab):
            for p in view.encoder_k.parameters():
                p.add_(0.01)
    before = {v: [p.clone() for p in getattr(model, v).encoder_k.parameters()] for v in ("l", "ab")}
    queue_l, queue_ab = model.l.queue.clone(), model.ab.queue.clone()
    x = _images()
    logits, labels = model(x)
    for v in ("l", "ab"):
        view = getattr(model, v)
        for pk, p0, pq in zip(view.encoder_k.parameters(), before[v], view.encoder_q.parameters()):
            torch.testing.assert_close(pk, m * p0 + (1 - m) * pq)
    q_l, q_ab = _features(model, "l", x), _features(model, "ab", x)
    k_l, k_ab = _features(model, "l", x, "encoder_k"), _features(model, "ab", x, "encoder_k")
    l_to_ab, ab_to_l = _rows(logits, N)
    # L -> ab: L's query, ab's momentum key of the same crop, ab's queue; ab -> L the other way
    for rows, q, k, queue in ((l_to_ab, q_l, k_ab, queue_ab), (ab_to_l, q_ab, k_l, queue_l)):
        torch.testing.assert_close(
            rows, torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / T
        )
    by_hand = (
        _info_nce_by_hand(q_l, k_ab, queue_ab, T) + _info_nce_by_hand(q_ab, k_l, queue_l, T)
    ) / 2
    assert F.cross_entropy(logits, labels).item() == pytest.approx(by_hand, rel=1e-5)
    # each view enqueues its own keys at its pointer
    torch.testing.assert_close(model.l.queue[:, :N], k_l.t())
    torch.testing.assert_close(model.ab.queue[:, :N], k_ab.t())
    assert torch.equal(model.l.queue[:, N:], queue_l[:, N:])
    assert torch.equal(model.ab.queue[:, N:], queue_ab[:, N:])
    assert model.l.queue_ptr.item() == N == model.ab.queue_ptr.item()
    F.cross_entropy(logits, labels).backward()  # the gradient uses the forward-time queues
    for view in (model.l, model.ab):
        assert view.encoder_q.conv1.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in view.encoder_k.parameters())


def test_knn_reads_the_two_views_pooled_features_concatenated():
    torch.manual_seed(0)
    model = CMC("resnet18_w8", "moco", dim=DIM, K=8, shuffle_bn="off").eval()
    x = _images()
    feats, _ = extract_features(
        model.encoder_q, [(x, torch.zeros(N, dtype=torch.long))], torch.device("cpu")
    )
    pooled = []
    with torch.no_grad():
        for enc, v in zip((model.l.encoder_q, model.ab.encoder_q), model.lab(x)):
            enc.fc, fc = nn.Identity(), enc.fc
            pooled.append(enc(v))
            enc.fc = fc
    assert feats["backbone"].shape == (N, 2 * 32)  # 8 x base width 4, per view
    torch.testing.assert_close(feats["backbone"], F.normalize(torch.cat(pooled, 1), dim=1))
    torch.testing.assert_close(feats["head"], F.normalize(model.encoder_q(x), dim=1))


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("dictionary", ["memory_bank", "moco"])
def test_cmc_trains_and_resumes_exactly_with_the_engine(
    synthetic_root, tmp_path, one_thread, dictionary
):
    opts = {
        "MODEL.MECHANISM": "cmc",
        "MODEL.CMC_DICTIONARY": dictionary,
        "MODEL.ARCH": "resnet18_w16",
        "KNN.AT_START": False,
    }
    summary = PretrainTrainer(tiny_cfg(synthetic_root, tmp_path / "a", **opts)).train()  # 2 epochs
    assert summary["mechanism"] == "cmc" and summary["max_iter"] == 6 and len(summary["knn"]) == 2
    with open(tmp_path / "a" / "metrics.json") as f:
        assert all(
            math.isfinite(json.loads(line)["total_loss"]) for line in f if "total_loss" in line
        )
    last = load_checkpoint(str(tmp_path / "a" / "checkpoint_0001.pth.tar"))
    keys = set(last["state_dict"])
    dictionaries = (
        {"memory_bank.bank"}
        if dictionary == "memory_bank"
        else {"queue", "queue_ptr", "encoder_k.conv1.weight"}
    )
    for view in ("l", "ab"):
        assert f"module.{view}.encoder_q.conv1.weight" in keys
        assert {f"module.{view}.{k}" for k in dictionaries} <= keys
    assert last["state_dict"]["module.l.encoder_q.conv1.weight"].shape == (8, 1, 7, 7)
    assert last["state_dict"]["module.ab.encoder_q.conv1.weight"].shape == (8, 2, 7, 7)
    assert_resumes_exactly(tiny_cfg(synthetic_root, tmp_path / "b", **opts), tmp_path / "a")


def assert_resumes_exactly(cfg, finished):
    """A run of ``cfg`` resumed from the first epoch's checkpoint of the 2-epoch run in folder
    ``finished`` starts from that state and ends with every tensor of its last checkpoint."""
    first = load_checkpoint(str(finished / "checkpoint_0000.pth.tar"))
    last = load_checkpoint(str(finished / "checkpoint_0001.pth.tar"))
    trainer = PretrainTrainer(cfg, resume=str(finished / "checkpoint_0000.pth.tar"))
    for name, value in trainer.moco.state_dict().items():
        assert torch.equal(value, first["state_dict"]["module." + name]), name
    trainer.train()
    resumed = load_checkpoint(os.path.join(cfg.OUTPUT_DIR, "checkpoint_0001.pth.tar"))
    assert resumed["state_dict"].keys() == last["state_dict"].keys()
    for name, value in last["state_dict"].items():  # every tensor, dictionaries included
        assert torch.equal(resumed["state_dict"][name], value), name


def test_a_crafted_view_queue_pointer_is_refused_naming_it(synthetic_root, tmp_path, one_thread):
    opts = {
        "MODEL.MECHANISM": "cmc",
        "MODEL.CMC_DICTIONARY": "moco",
        "MODEL.ARCH": "resnet18_w16",
        "KNN.PERIOD": 0,
        "SOLVER.EPOCHS": 1,
    }
    PretrainTrainer(tiny_cfg(synthetic_root, tmp_path / "a", **opts)).train()
    ckpt = load_checkpoint(str(tmp_path / "a" / "checkpoint_0000.pth.tar"))
    ckpt["state_dict"]["module.ab.queue_ptr"] = torch.tensor([5])
    torch.save(ckpt, tmp_path / "crafted.pth.tar")
    with pytest.raises(
        ValueError, match=r"crafted.pth.tar: ab.queue_ptr 5 is not in \[0, MODEL.K 16\)"
    ):
        PretrainTrainer(
            tiny_cfg(synthetic_root, tmp_path / "b", **opts),
            resume=str(tmp_path / "crafted.pth.tar"),
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"MODEL.CMC_DICTIONARY": "bank"}, "unknown MODEL.CMC_DICTIONARY 'bank'"),
        ({"MODEL.ARCH": "resnet18_w5"}, "base width 5: CMC's two views split it"),
        (
            {"MODEL.CMC_DICTIONARY": "moco", "MODEL.K": 20},
            "MODEL.K \\(--moco-k\\) = 20 is not a multiple",
        ),
    ],
)
def test_cmc_settings_that_cannot_train_are_one_line_errors(
    synthetic_root, tmp_path, overrides, message
):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"MODEL.MECHANISM": "cmc", **overrides})
    with pytest.raises(ValueError, match=message):
        validate_cfg(cfg, 1)


# ---------------------------------------------------------------- 2 gloo processes


def _compare_worker(rank, world, port, run):
    torch.set_num_threads(1)
    expected = run(rank, world, ddp=False)  # one process, the whole batch, before the group exists
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        got = run(rank, world, ddp=True)
        assert set(got) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def same_in_one_and_two_gloo_processes(run):
    """``run(rank, world, ddp)`` -> named tensors: on the whole batch in one process (ddp False)
    they must equal those of the rank's share under DDP in 2 gloo processes (ddp True)."""
    mp.spawn(_compare_worker, args=(2, _free_port(), run), nprocs=2, join=True)


def _cmc_gradients_and_dictionaries(rank, world, ddp):
    """BatchNorm in eval mode, so each image's features do not depend on the batch split."""
    n = 4
    x, index = _images(seed=3, n=world * n), torch.tensor([0, 2, 3, 5, 6, 8, 9, 11])
    if ddp:
        x, index = x[rank * n : (rank + 1) * n], index[rank * n : (rank + 1) * n]
    out = {}
    for dictionary in ("memory_bank", "moco"):
        torch.manual_seed(1)
        model = CMC(
            "resnet18_w8", dictionary, size=12, dim=DIM, K=8, m=0.9, T=T, shuffle_bn="off"
        ).eval()
        net = nn.parallel.DistributedDataParallel(model) if ddp else model
        torch.manual_seed(7)  # the memory bank's negative draws: the same on every rank
        F.cross_entropy(*net(x, x, index)).backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert any(name.startswith("ab.") for name in grads) and any(
            name.startswith("l.") for name in grads
        )
        out.update({f"{dictionary} grad {name}": g for name, g in grads.items()})
        out.update(
            {
                f"{dictionary} {name}": model.get_buffer(name).clone()
                for name in model.dictionary_buffers
            }
        )
    return out


@pytest.mark.timeout(240)
def test_one_process_and_two_gloo_processes_give_the_same_gradients_and_dictionaries():
    same_in_one_and_two_gloo_processes(_cmc_gradients_and_dictionaries)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dictionary", ["memory_bank", "moco"])
def test_cmc_trains_in_two_processes_via_cli(synthetic_root, tmp_path, dictionary):
    s = pretrain_in_two_processes(
        synthetic_root,
        tmp_path / dictionary,
        [
            "MODEL.MECHANISM",
            "cmc",
            "MODEL.CMC_DICTIONARY",
            dictionary,
            "MODEL.ARCH",
            "resnet18_w16",
            "MODEL.K",
            "16",
        ],
    )
    assert s["world_size"] == 2 and s["mechanism"] == "cmc" and s["shuffle_bn"] == "ddp"
    digests = s["queue_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both views' dictionaries, both ranks
