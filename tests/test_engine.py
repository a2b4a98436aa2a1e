"""PretrainTrainer on the small synthetic image folder: metrics, checkpoints, LR schedule, resume."""

import json
import math
import os

import pytest
import torch
from detectron2.solver.lr_scheduler import LRMultiplier

from moco.config import get_cfg
from moco.engine.trainer import PretrainTrainer, validate_cfg
from moco.solver import build_lr_multiplier, epoch_lr_factors

BATCH, EPOCHS = 8, 2


def tiny_cfg(root, out, **overrides):
    """resnet18 on 32-px crops of the 30-image fixture: 3 iterations per epoch."""
    cfg = get_cfg()
    cfg.MODEL.ARCH = "resnet18"
    cfg.MODEL.DIM = 32
    cfg.MODEL.K = 16
    cfg.MODEL.M = 0.99
    cfg.MODEL.MLP = True
    cfg.MODEL.T = 0.2
    cfg.MODEL.SPLIT_BN_GROUPS = 2
    cfg.INPUT.AUG_PLUS = True
    cfg.INPUT.CROP_SIZE = 32
    cfg.DATA.ROOT = os.path.join(root, "imagefolder")
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = BATCH
    cfg.SOLVER.BASE_LR = 0.06
    cfg.SOLVER.EPOCHS = EPOCHS
    cfg.SOLVER.COS = True
    cfg.SOLVER.CHECKPOINT_PERIOD = 1
    cfg.KNN.DATA = os.path.join(root, "imagefolder")
    cfg.KNN.BATCH_SIZE = 16
    cfg.KNN.AT_START = True
    cfg.LOG_PERIOD = 1
    cfg.SEED = 0
    cfg.OUTPUT_DIR = str(out)
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    cfg = tiny_cfg(synthetic_root, out)
    trainer = PretrainTrainer(cfg)
    summary = trainer.train()
    return cfg, out, summary


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_engine_writes_metrics_checkpoints_and_summary(trained):
    cfg, out, summary = trained
    ipe = 30 // BATCH
    assert summary["iters_per_epoch"] == ipe and summary["max_iter"] == EPOCHS * ipe
    assert summary["shuffle_bn"] == "split" and summary["world_size"] == 1
    assert summary["images_per_sec"] > 0
    rows = _metrics(out)
    train_rows = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in train_rows] == list(range(EPOCHS * ipe))
    for r in train_rows:
        assert math.isfinite(r["total_loss"]) and 0 <= r["acc1"] <= r["acc5"] <= 100
        epoch = r["iteration"] // ipe
        assert r["lr"] == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * epoch / EPOCHS)))
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert len(knn_rows) == EPOCHS + 1
    assert [h["epoch"] for h in summary["knn"]] == [0, 1, 2]
    assert all(0 <= h["top1"] <= 100 for h in summary["knn"])
    assert summary["knn_chance"] == pytest.approx(10.0)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    names = sorted(f for f in os.listdir(out) if f.endswith(".pth.tar"))
    assert names == ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    assert (out / "last_checkpoint").read_text() == "checkpoint_0001.pth.tar"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with open(out / "pretrain_summary.json") as f:
        assert json.load(f)["queue_sha256_per_rank"] == summary["queue_sha256_per_rank"]

    ckpt = torch.load(out / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == EPOCHS * ipe and ckpt["arch"] == "resnet18"
    assert ckpt["scheduler"]["last_epoch"] == EPOCHS * ipe
    # queue pointer advanced by one batch per iteration, modulo K
    assert ckpt["state_dict"]["module.queue_ptr"].item() == (EPOCHS * ipe * BATCH) % cfg.MODEL.K
    assert len(ckpt["rng_states"]) == 1


def test_resume_continues_from_saved_iteration_queue_and_pointer(trained, synthetic_root, tmp_path):
    cfg, out, _ = trained
    first = str(out / "checkpoint_0000.pth.tar")
    saved = torch.load(first, map_location="cpu", weights_only=True)
    trainer = PretrainTrainer(tiny_cfg(synthetic_root, tmp_path), resume=first)
    ipe = trainer.iters_per_epoch
    assert trainer.start_iter == trainer.iter == saved["iteration"] == ipe
    assert torch.equal(trainer.moco.queue, saved["state_dict"]["module.queue"])
    assert torch.equal(trainer.moco.queue_ptr, saved["state_dict"]["module.queue_ptr"])
    assert trainer.moco.queue_ptr.item() == (ipe * BATCH) % 16
    # the LR of the first resumed iteration is epoch 1's
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.06 * 0.5)
    summary = trainer.train()
    assert summary["start_iter"] == ipe
    rows = _metrics(tmp_path)
    assert [r["iteration"] for r in rows if "total_loss" in r] == list(range(ipe, EPOCHS * ipe))
    # same data order, RNG streams and state: the resumed run ends where the uninterrupted one did
    a = torch.load(tmp_path / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True)
    b = torch.load(out / "checkpoint_0001.pth.tar", map_location="cpu", weights_only=True)
    assert a["iteration"] == b["iteration"]
    for k in (
        "module.queue",
        "module.queue_ptr",
        "module.encoder_q.conv1.weight",
        "module.encoder_k.layer4.1.bn2.running_mean",
    ):
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_auto_resume_of_a_finished_run_trains_nothing(trained):
    cfg, out, _ = trained
    trainer = PretrainTrainer(cfg, resume="auto")
    assert trainer.start_iter == trainer.max_iter
    assert trainer.train()["start_iter"] == trainer.max_iter


@pytest.mark.parametrize("cos", [False, True])
def test_lr_schedule_per_epoch_equals_official_formula(cos):
    cfg = get_cfg()
    cfg.SOLVER.EPOCHS, cfg.SOLVER.STEPS, cfg.SOLVER.COS, cfg.SOLVER.BASE_LR = 10, (4, 7), cos, 0.03
    ipe = 5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.SOLVER.BASE_LR)
    sched = LRMultiplier(opt, build_lr_multiplier(cfg), max_iter=10 * ipe)
    for it in range(10 * ipe):
        epoch = it // ipe
        # official main_moco.py adjust_learning_rate, written out
        lr = 0.03
        if cos:
            lr *= 0.5 * (1.0 + math.cos(math.pi * epoch / 10))
        else:
            for milestone in (4, 7):
                lr *= 0.1 if epoch >= milestone else 1.0
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12), (it, epoch)
        opt.step()
        sched.step()


def test_lr_epoch_boundaries_exact_at_imagenet_scale():
    # 200 epochs x 5004 iterations (ImageNet, batch 256): the LR changes exactly at epoch starts
    cfg = get_cfg()
    cfg.SOLVER.COS = True
    ipe, epochs = 5004, cfg.SOLVER.EPOCHS
    mult = build_lr_multiplier(cfg)
    factors = epoch_lr_factors(epochs, (), cos=True)
    max_iter = epochs * ipe
    for e in range(1, epochs):
        assert mult((e * ipe - 1) / max_iter) == factors[e - 1]
        assert mult((e * ipe) / max_iter) == factors[e]
    step = build_lr_multiplier(get_cfg())
    assert step((120 * ipe - 1) / max_iter) == 1.0 and step(120 * ipe / max_iter) == pytest.approx(
        0.1
    )


def test_queue_size_must_be_multiple_of_global_batch(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"MODEL.K": 20})
    with pytest.raises(
        ValueError,
        match=r"MODEL.K \(--moco-k\) = 20 is not a multiple of the "
        r"global batch SOLVER.IMS_PER_BATCH = 8",
    ):
        PretrainTrainer(cfg)
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"MODEL.K": 16, "SOLVER.IMS_PER_BATCH": 16})
    validate_cfg(cfg, 2)  # 8 per process x 2
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        validate_cfg(cfg, 3)


def test_split_bn_needs_two_samples_per_sub_batch(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"MODEL.SPLIT_BN_GROUPS": 8})  # batch 8: 1 each
    with pytest.raises(
        ValueError,
        match=r"per-process batch 8 gives fewer than 2 samples per "
        r"sub-batch with MODEL.SPLIT_BN_GROUPS = 8",
    ):
        validate_cfg(cfg, 1)
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"MODEL.SPLIT_BN_GROUPS": 4})
    validate_cfg(cfg, 1)  # 2 samples per sub-batch


def test_bad_data_root_is_a_clear_error(synthetic_root, tmp_path):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"DATA.ROOT": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="DATA.ROOT.*nowhere.*train"):
        PretrainTrainer(cfg)
