"""CMC -> Detectron2: the converter writes both views' ResNets, the Lab backbone loads every tensor
and computes what the pretrained encoders compute, and tools/train_net.py fine-tunes it."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from conftest import REPO
from detectron2.modeling import build_model
from test_convert import _randomized, _torchvision_trunk
from test_train_net import TINY

from detection.checkpoint import SafeDetectionCheckpointer
from detection.config import load_cfg
from detection.convert import convert_checkpoint, rename_key
from moco.checkpoint import build_checkpoint
from moco.data.augment import IMAGENET_MEAN, IMAGENET_STD
from moco.modeling.cmc import CMC

CMC_CFG = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18w16_FPN_cmc.yaml")


def _cmc_checkpoint(path, dictionary, seed):
    torch.manual_seed(seed)
    model = CMC("resnet18_w16", dictionary, size=6, dim=8, K=8, shuffle_bn="off")
    for view in (model.l, model.ab):
        _randomized(view.encoder_q, seed)  # defaults would match a fresh detector by accident
        seed += 1
    torch.save(build_checkpoint(model, None, 1, "resnet18_w16"), path)
    return model


def fine_tune(synthetic_root, config, weights, out, iterations):
    """tools/train_net.py on the embedded VOC set at test size; returns final_metrics.json."""
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.dirname(synthetic_root))
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", config]
    cmd += TINY + [
        "SOLVER.MAX_ITER",
        str(iterations),
        "MODEL.WEIGHTS",
        str(weights),
        "OUTPUT_DIR",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "final_metrics.json")) as f:
        return json.load(f)


def test_converted_cmc_loads_every_tensor_and_runs_both_views(tmp_path, capsys):
    model = _cmc_checkpoint(tmp_path / "cmc.pth.tar", "moco", seed=3)
    result = convert_checkpoint(tmp_path / "cmc.pth.tar", tmp_path / "cmc.pkl")
    assert result.format == "cmc" and result.width == 16 and result.depth == 18
    assert "build_lab_resnet_fpn_backbone" in result.summary("in", "out")
    # dropped: the momentum encoders, queues and heads of both views
    sd = model.state_dict()
    assert result.dropped == sum(not k.split(".", 2)[1] == "encoder_q" or ".fc." in k for k in sd)
    cfg = load_cfg(CMC_CFG, ["MODEL.WEIGHTS", str(tmp_path / "cmc.pkl"), "MODEL.DEVICE", "cpu"])
    detector = build_model(cfg)
    checkpointer = SafeDetectionCheckpointer(detector)
    checkpointer.load(cfg.MODEL.WEIGHTS)
    target = detector.state_dict()
    loaded = set()
    for view in ("l", "ab"):
        for key, value in getattr(model, view).encoder_q.state_dict().items():
            if key.startswith("fc."):
                continue
            name = f"backbone.bottom_up.{view}.{rename_key(key)}"
            assert torch.equal(target[name], value), name
            loaded.add(name)
    owned = {n for n in target if n.startswith("backbone.bottom_up.")}
    assert owned == loaded  # every backbone tensor came from the checkpoint
    load = checkpointer.weights_load
    assert (
        load["matched"]
        == load["backbone_tensors"]
        == len([n for n in owned if "num_batches" not in n])
    )
    # the detector's backbone on its own normalised RGB input = the encoders on the Lab split
    detector.eval()
    rgb = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )
    x = (rgb - mean) / std  # the pretraining loader's and this config's normalisation agree
    with torch.no_grad():
        res5 = detector.backbone.bottom_up(x)["res5"]
        views = model.lab(x)
        expected = [
            enc.eval().layer4(_torchvision_trunk(enc)(v))
            for enc, v in zip((model.l.encoder_q, model.ab.encoder_q), views)
        ]
    assert res5.shape[1] == 128  # 8 x 16: the full-width ResNet-18's res5
    torch.testing.assert_close(res5, torch.cat(expected, 1), atol=1e-4, rtol=1e-4)


def test_bgr_input_is_flipped_before_the_lab_conversion(tmp_path):
    rgb_cfg = load_cfg(CMC_CFG, ["MODEL.DEVICE", "cpu"])
    bgr_cfg = load_cfg(
        CMC_CFG,
        [
            "MODEL.DEVICE",
            "cpu",
            "INPUT.FORMAT",
            "BGR",
            "MODEL.PIXEL_MEAN",
            str(list(rgb_cfg.MODEL.PIXEL_MEAN)[::-1]),
            "MODEL.PIXEL_STD",
            str(list(rgb_cfg.MODEL.PIXEL_STD)[::-1]),
        ],
    )
    torch.manual_seed(0)
    a = build_model(rgb_cfg).backbone.bottom_up.eval()
    b = build_model(bgr_cfg).backbone.bottom_up.eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["res4"], b(x.flip(1))["res4"])


def test_train_net_fine_tunes_converted_cmc_weights(synthetic_datasets, synthetic_root, tmp_path):
    _cmc_checkpoint(tmp_path / "cmc.pth.tar", "memory_bank", seed=5)
    convert = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "convert_to_d2.py"),
            str(tmp_path / "cmc.pth.tar"),
            str(tmp_path / "cmc.pkl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert convert.returncode == 0, convert.stderr[-2000:]
    assert "cmc checkpoint" in convert.stdout
    data = fine_tune(synthetic_root, CMC_CFG, tmp_path / "cmc.pkl", tmp_path / "voc_cmc", 3)
    assert data["iterations"] == 3 and data["weights"] == str(tmp_path / "cmc.pkl")
    load = data["weights_load"]
    assert load["matched"] == load["backbone_tensors"] > 0 and not load["allow_partial"]
    assert all(v is None or 0 <= v <= 100 for v in data["metrics"]["bbox"].values())
    assert np.isfinite(data["s_per_iter"])
