"""A mechanism is one class and one decorator: registered here, in the test file, it trains
through tools/pretrain.py's own code path (config check, dataset, model, step, checkpoint)."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tool

from moco.modeling import (
    MECHANISM_REGISTRY,
    Mechanism,
    build_encoder,
    mechanism_names,
    resnet_encoder,
)


@MECHANISM_REGISTRY.register()
class ToyMechanism(Mechanism):
    """Both crops through one encoder; each query's positive is its own key, the batch's other
    keys are its negatives (end-to-end InfoNCE, written from scratch)."""

    name = "toy"
    calls = 0

    def __init__(self, encoder, T):
        super().__init__()
        self.encoder_q, self.T = encoder, T

    @classmethod
    def from_config(cls, cfg, world_size, dataset_size):
        m = cfg.MODEL
        return cls(build_encoder(resnet_encoder(m.ARCH), m.DIM, "linear", "off", 1), m.T)

    @classmethod
    def validate(cls, cfg, world_size):
        if cfg.MODEL.T > 1.0:
            raise ValueError(f"toy: MODEL.T must be <= 1, got {cfg.MODEL.T}")

    def forward(self, im_q, im_k):
        ToyMechanism.calls += 1
        q = F.normalize(self.encoder_q(im_q), dim=1)
        k = F.normalize(self.encoder_q(im_k), dim=1)
        return q @ k.t() / self.T, torch.arange(q.shape[0], device=q.device)


def _argv(synthetic_root, out, *extra):
    return [
        "--config-file",
        "configs/pretrain/moco_v2_R18_cpu.yaml",
        "--epochs",
        "1",
        "-b",
        "16",
        "-j",
        "0",
        "--seed",
        "0",
        "--output-dir",
        str(out),
        os.path.join(synthetic_root, "imagefolder"),
        "MODEL.MECHANISM",
        "toy",
        "MODEL.ARCH",
        "resnet18_w16",
        "INPUT.CROP_SIZE",
        "32",
        "KNN.DATA",
        "",
        *extra,
    ]


def test_a_mechanism_registered_in_a_test_file_trains_through_the_pretrain_tool(
    synthetic_root, tmp_path, monkeypatch
):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    assert "toy" in mechanism_names()
    ToyMechanism.calls = 0
    out = tmp_path / "toy"
    assert load_tool("pretrain").main(_argv(synthetic_root, out)) == 0
    assert ToyMechanism.calls == 1  # 30 images, batch 16: one step
    ckpt = torch.load(out / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"]
    assert "module.encoder_q.conv1.weight" in keys and "module.queue" not in keys
    with open(out / "pretrain_summary.json") as f:
        summary = json.load(f)
    assert summary["mechanism"] == "toy" and summary["max_iter"] == 1


def test_a_registered_mechanism_checks_its_own_settings(
    synthetic_root, tmp_path, monkeypatch, capsys
):
    from conftest import REPO

    monkeypatch.chdir(REPO)
    code = load_tool("pretrain").main(_argv(synthetic_root, tmp_path / "bad", "MODEL.T", "2.0"))
    assert code == 2
    assert "toy: MODEL.T must be <= 1, got 2.0" in capsys.readouterr().err


def test_an_unknown_mechanism_names_every_registered_one():
    from moco.config import get_cfg
    from moco.modeling import mechanism_class

    cfg = get_cfg()
    cfg.MODEL.MECHANISM = "nope"
    with pytest.raises(
        ValueError, match="choose one of: .*cmc.*cpc.*end_to_end.*memory_bank.*moco"
    ):
        mechanism_class(cfg)
