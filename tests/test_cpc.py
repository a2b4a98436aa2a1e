"""CPC v2: patch grid geometry, the context network's masking (no prediction sees its target row),
the InfoNCE's positive and negative sets by hand, patch augmentation, training with the engine
(checkpoint, exact resume), 1 process vs 2 gloo processes, conversion and fine-tuning."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from detectron2.modeling import build_model
from test_cmc import assert_resumes_exactly, same_in_one_and_two_gloo_processes
from test_cmc_detection import fine_tune
from test_engine import tiny_cfg
from test_mechanisms import pretrain_in_two_processes
from torch import nn

from detection.checkpoint import SafeDetectionCheckpointer
from detection.config import load_cfg
from detection.convert import convert_checkpoint
from moco.checkpoint import load_checkpoint
from moco.engine.trainer import PretrainTrainer, validate_cfg
from moco.modeling.cpc import (
    CPC,
    augment_patches,
    context_network,
    cpc_logits,
    grid_size,
    patch_grid,
)
from moco.modeling.resnet import resnet_encoder


def test_patch_grid_geometry():
    assert grid_size(256, 64) == 7  # CPC: 64-px patches, stride 32, 256-px crops
    assert grid_size(64, 16) == 7  # the same grid at this toolkit's CPU scale
    assert grid_size(48, 16) == 5 and grid_size(32, 16) == 3
    for size, patch in ((47, 16), (48, 15), (8, 16)):
        with pytest.raises(ValueError, match="must be even and tile"):
            grid_size(size, patch)
    x = torch.randn(2, 3, 48, 48)
    patches = patch_grid(x, 16)
    assert patches.shape == (2, 5, 5, 3, 16, 16)
    for i in range(5):
        for j in range(5):
            assert torch.equal(patches[:, i, j], x[:, :, 8 * i : 8 * i + 16, 8 * j : 8 * j + 16])
    # neighbours overlap by half a patch
    assert torch.equal(patches[:, 1, 2, :, 8:], patches[:, 2, 2, :, :8])
    assert torch.equal(patches[:, 3, 1, :, :, 8:], patches[:, 3, 2, :, :, :8])


def test_no_prediction_sees_its_target_row():
    torch.manual_seed(0)
    d, g = 4, 5
    context = context_network(d, g)
    predictor = nn.Conv2d(d, d, 1)
    z = torch.randn(1, d, g, g)
    jac = torch.autograd.functional.jacobian(lambda t: predictor(context(t)), z)[
        0
    ]  # d g g x 1 d g g
    for i in range(
        g
    ):  # the prediction made at row i (of rows i + 1, ...) sees every row <= i, none below
        depends = (
            jac[:, i].abs().sum(dim=(0, 1, 2, 3, 5))
        )  # over output channel, column, input channel
        assert (depends[i + 1 :] == 0).all() and (depends[: i + 1] > 0).all(), (i, depends)
    # and perturbing a row changes nothing above it
    c = context(z)
    z2 = z.clone()
    z2[:, :, 3] += 1.0
    c2 = context(z2)
    assert torch.equal(c[:, :, :3], c2[:, :, :3]) and not torch.allclose(c[:, :, 3], c2[:, :, 3])


def test_info_nce_positive_and_negatives_by_hand():
    n, d, g = 2, 3, 3
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, d, g, g, generator=gen)
    preds = [torch.randn(n, d, g, g, generator=gen) for _ in range(2)]
    logits, labels = cpc_logits(z, preds)
    patches = [
        (m, a, b) for m in range(n) for a in range(g) for b in range(g)
    ]  # every patch of the batch
    rows = [(k, m, i, j) for k in (1, 2) for m in range(n) for i in range(g - k) for j in range(g)]
    assert logits.shape == (len(rows), n * g * g) == (18, 18)
    for r, (k, m, i, j) in enumerate(rows):
        q = preds[k - 1][m, :, i, j]
        expected = torch.stack([q @ z[mm, :, a, b] for mm, a, b in patches])
        torch.testing.assert_close(logits[r], expected)
        # positive: the patch k rows below in the same image; negatives: the 17 others, 8 of them
        # in the same image
        assert patches[labels[r]] == (m, i + k, j)


def test_patch_augmentation_flips_and_drops_colour_per_patch():
    patches = torch.rand(4, 5, 5, 3, 6, 6) + 0.1  # no zero pixel, so a kept channel is visible
    out = augment_patches(patches, generator=torch.Generator().manual_seed(0))
    flat_in, flat_out = patches.reshape(-1, 3, 6, 6), out.reshape(-1, 3, 6, 6)
    flipped, kept = 0, set()
    for a, b in zip(flat_in, flat_out):
        channels = [c for c in range(3) if b[c].abs().sum() > 0]
        assert len(channels) == 1  # two of three channels dropped
        c = channels[0]
        kept.add(c)
        if torch.equal(b[c], a[c].flip(-1)):
            flipped += 1
        else:
            assert torch.equal(b[c], a[c])
    assert kept == {0, 1, 2} and 20 < flipped < 80  # each patch its own draw (100 patches)


def test_model_rows_and_eval_has_no_augmentation():
    torch.manual_seed(0)
    model = CPC(resnet_encoder("resnet18_w4"), 32, patch_size=16, steps=2, dim=8).eval()
    x = torch.randn(3, 3, 32, 32)
    logits, labels = model(x)
    assert logits.shape == (3 * (3 * 2 + 3 * 1), 3 * 9)
    z = model.embed(x)
    with torch.no_grad():
        z_hand = (
            model.encoder_q(patch_grid(x, 16).reshape(27, 3, 16, 16))
            .view(3, 3, 3, 8)
            .permute(0, 3, 1, 2)
        )
    torch.testing.assert_close(z, z_hand)
    F.cross_entropy(logits, labels).backward()
    for module in (model.encoder_q, model.context, model.predictors):
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0
            for p in module.parameters()
            if p.requires_grad
        )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"MODEL.CPC_PATCH_SIZE": 12}, "must be even and tile the INPUT.CROP_SIZE 32"),
        ({"MODEL.CPC_STEPS": 3}, "MODEL.CPC_STEPS 3 must be in \\[1, 3\\)"),
    ],
)
def test_cpc_settings_that_cannot_train_are_one_line_errors(
    synthetic_root, tmp_path, overrides, message
):
    cfg = tiny_cfg(synthetic_root, tmp_path, **{"MODEL.MECHANISM": "cpc", **overrides})
    with pytest.raises(ValueError, match=message):
        validate_cfg(cfg, 1)


# ---------------------------------------------------------------- engine, conversion, detection

OPTS = {"MODEL.MECHANISM": "cpc", "MODEL.ARCH": "resnet18_w16", "KNN.AT_START": False}


def test_cpc_trains_resumes_exactly_converts_and_fine_tunes(
    synthetic_datasets, synthetic_root, tmp_path, one_thread
):
    summary = PretrainTrainer(tiny_cfg(synthetic_root, tmp_path / "a", **OPTS)).train()  # 2 epochs
    assert summary["mechanism"] == "cpc" and summary["max_iter"] == 6 and len(summary["knn"]) == 2
    last = load_checkpoint(str(tmp_path / "a" / "checkpoint_0001.pth.tar"))
    assert {k.split(".")[1] for k in last["state_dict"]} == {"encoder_q", "context", "predictors"}
    # same patches, patch augmentations and steps after the resume
    assert_resumes_exactly(tiny_cfg(synthetic_root, tmp_path / "b", **OPTS), tmp_path / "a")

    # the patch encoder is a plain ResNet: it converts as MoCo's encoder_q and runs on whole images
    result = convert_checkpoint(tmp_path / "a" / "checkpoint_0001.pth.tar", tmp_path / "cpc.pkl")
    assert result.format == "moco" and result.width == 16
    # dropped: the context network, the predictors and the head
    assert result.dropped == sum(
        not k.startswith("module.encoder_q.") or ".fc." in k for k in last["state_dict"]
    )
    config = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18w16_FPN.yaml")
    cfg = load_cfg(config, ["MODEL.WEIGHTS", str(tmp_path / "cpc.pkl"), "MODEL.DEVICE", "cpu"])
    detector = build_model(cfg)
    checkpointer = SafeDetectionCheckpointer(detector)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    assert checkpointer.weights_load["matched"] == checkpointer.weights_load["backbone_tensors"] > 0
    target = detector.state_dict()
    assert torch.equal(
        target["backbone.bottom_up.res5.1.conv2.weight"],
        last["state_dict"]["module.encoder_q.layer4.1.conv2.weight"],
    )
    load = fine_tune(synthetic_root, config, tmp_path / "cpc.pkl", tmp_path / "voc_cpc", 2)[
        "weights_load"
    ]
    assert load["matched"] == load["backbone_tensors"] > 0


# ---------------------------------------------------------------- 2 gloo processes


def _cpc_gradients(rank, world, ddp):
    """Negatives gathered with gradient. BatchNorm in eval mode (no patch augmentation), so a
    patch's embedding does not depend on the batch split."""
    n = 2
    x = torch.randn(world * n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    if ddp:
        x = x[rank * n : (rank + 1) * n]
    torch.manual_seed(1)
    model = CPC(resnet_encoder("resnet18_w4"), 32, patch_size=16, steps=2, dim=8).eval()
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    logits, labels = net(x)
    assert logits.shape[1] == world * n * 9  # every patch of the global batch
    F.cross_entropy(logits, labels).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.timeout(240)
def test_one_process_and_two_gloo_processes_give_the_same_gradients():
    same_in_one_and_two_gloo_processes(_cpc_gradients)


@pytest.mark.timeout(300)
def test_cpc_trains_in_two_processes_via_cli(synthetic_root, tmp_path):
    s = pretrain_in_two_processes(
        synthetic_root, tmp_path / "cpc", ["MODEL.MECHANISM", "cpc", "MODEL.ARCH", "resnet18_w16"]
    )
    assert s["world_size"] == 2 and s["mechanism"] == "cpc" and s["max_iter"] == 3
