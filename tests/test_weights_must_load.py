"""Fine-tuning refuses weights that do not fill the whole backbone (issue 17, finding 4): Detectron2
only warns and trains from random init, so a "moco" row could be random init. The count of matched
tensors is recorded, the report refuses a row whose weights did not load, and the expert override
is recorded."""

import json
import os
import pickle

import numpy as np
import pytest
from conftest import REPO

from detection.checkpoint import SafeDetectionCheckpointer, backbone_keys
from detection.config import load_cfg
from detection.convert import convert_state_dict, save_d2_weights
from detection.trainer import DetectionTrainer
from experiments.report import load_metrics
from moco.modeling.resnet import resnet_encoder

W16_CFG = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18w16_FPN.yaml")


@pytest.fixture(scope="module")
def w16_model():
    return DetectionTrainer.build_model(load_cfg(W16_CFG, ["MODEL.DEVICE", "cpu"]))


def _converted(tmp_path, arch):
    model, _ = convert_state_dict(resnet_encoder(arch)().state_dict())
    path = tmp_path / f"{arch}.pkl"
    save_d2_weights(model, path)
    return str(path)


def test_matching_weights_fill_every_backbone_tensor(tmp_path, w16_model):
    keys = backbone_keys(w16_model)
    assert keys and all(k.startswith("backbone.bottom_up.") for k in keys)
    ckpt = SafeDetectionCheckpointer(w16_model)
    ckpt.load(_converted(tmp_path, "resnet18_w16"))
    assert ckpt.weights_load["matched"] == ckpt.weights_load["backbone_tensors"] == len(keys)


@pytest.mark.parametrize("case", ["keys_match_nothing", "wrong_width"])
def test_weights_that_do_not_load_are_refused(tmp_path, w16_model, case):
    if case == "keys_match_nothing":
        path = str(tmp_path / "foo.pkl")
        with open(path, "wb") as f:
            pickle.dump({"model": {"foo.weight": np.zeros(3, np.float32)}, "__author__": "x"}, f)
    else:
        path = _converted(tmp_path, "resnet18_w32")
    with pytest.raises(ValueError, match=r"of \d+ backbone tensors did not load") as e:
        SafeDetectionCheckpointer(w16_model).load(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_expert_override_loads_partly_and_is_recorded(tmp_path, w16_model):
    ckpt = SafeDetectionCheckpointer(w16_model, allow_partial_weights=True)
    ckpt.load(_converted(tmp_path, "resnet18_w32"))
    assert ckpt.weights_load["allow_partial"] is True
    assert ckpt.weights_load["matched"] < ckpt.weights_load["backbone_tensors"]


def test_c4_backbone_includes_res5_in_the_roi_head_but_not_its_extra_norm():
    cfg = load_cfg(
        os.path.join(REPO, "configs", "detection", "pascal_voc_R_50_C4_24k_moco.yaml"),
        ["MODEL.DEVICE", "cpu"],
    )
    keys = backbone_keys(DetectionTrainer.build_model(cfg))
    assert any(k.startswith("roi_heads.res5.0.") for k in keys)
    assert not any(k.startswith("roi_heads.res5.norm") for k in keys)


def test_report_refuses_a_row_whose_weights_did_not_load(tmp_path):
    data = {
        "task": "voc",
        "metrics": {"bbox": {"AP": 1.0}},
        "weights": "w.pkl",
        "weights_load": {
            "file": "w.pkl",
            "backbone_tensors": 60,
            "matched": 0,
            "allow_partial": False,
        },
    }
    path = tmp_path / "final_metrics.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="its weights did not load .0 of 60"):
        load_metrics(str(tmp_path))
    data["weights_load"]["allow_partial"] = True  # the recorded expert override
    path.write_text(json.dumps(data))
    assert load_metrics(str(tmp_path))["weights_load"]["allow_partial"]
