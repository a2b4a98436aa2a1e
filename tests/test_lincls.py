"""Linear classification: frozen backbone, fc-only training, sanity check, pretrained formats."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, load_tool

from moco import checkpoint as C
from moco.evaluation.lincls import (
    LinclsOptions,
    backbone_state,
    build_linear_model,
    load_pretrained,
    run_lincls,
    sanity_check,
)
from moco.modeling.moco import MoCo
from moco.modeling.resnet import resnet_encoder


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
    """An official-format checkpoint of a (randomly initialised) MoCo v2 ResNet-18."""
    torch.manual_seed(0)
    model = MoCo(resnet_encoder("resnet18"), dim=32, K=16, mlp=True, shuffle_bn="off")
    folder = tmp_path_factory.mktemp("pretrained")
    return C.save_checkpoint(C.build_checkpoint(model, None, 1, "resnet18"), str(folder)), model


def test_linear_model_is_frozen_except_fc():
    torch.manual_seed(0)
    model = build_linear_model("resnet18", 10)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert torch.count_nonzero(model.fc.bias) == 0
    assert 0.008 < model.fc.weight.std().item() < 0.012  # N(0, 0.01), 5120 samples
    assert abs(model.fc.weight.mean().item()) < 0.001


def test_lincls_trains_fc_only_and_sanity_check_passes(synthetic_root, moco_checkpoint, tmp_path):
    path, moco = moco_checkpoint
    opts = LinclsOptions(
        data=os.path.join(synthetic_root, "imagefolder"),
        arch="resnet18",
        workers=0,
        epochs=2,
        batch_size=8,
        lr=0.5,
        schedule=(1,),
        pretrained=path,
        seed=0,
        crop_size=32,
        output_dir=str(tmp_path),
        print_freq=1,
    )
    results = run_lincls(opts)  # raises if the backbone changed (sanity check after epoch 1)
    with open(tmp_path / "lincls_results.json") as f:
        saved = json.load(f)
    assert saved["pretrained_format"] == "moco" and saved["num_classes"] == 10
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    assert [h["lr"] for h in saved["history"]] == pytest.approx([0.5, 0.05])
    for key in ("top1", "top5", "best_top1"):
        assert 0.0 <= saved[key] <= 100.0 and saved[key] == results[key]
    assert saved["top1"] <= saved["top5"]
    ckpt = torch.load(tmp_path / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18"
    sd = C.strip_prefix(ckpt["state_dict"], "module.")
    # backbone (BN running statistics included) identical to encoder_q; fc trained
    q = moco.encoder_q.state_dict()
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(v, q[k]), k
    assert sd["fc.weight"].shape == (10, 512)
    assert torch.count_nonzero(sd["fc.bias"]) > 0, "fc was trained"
    assert os.path.exists(tmp_path / "model_best.pth.tar")

    # -e: evaluate the resumed classifier only
    ev = run_lincls(
        LinclsOptions(
            **{**opts.__dict__, "evaluate": True, "resume": str(tmp_path / "checkpoint.pth.tar")}
        )
    )
    assert ev["top1"] == pytest.approx(saved["top1"])


def test_sanity_check_catches_a_changed_backbone(moco_checkpoint):
    path, _ = moco_checkpoint
    model = build_linear_model("resnet18", 10)
    load_pretrained(model, path, "resnet18")
    sanity_check(model.state_dict(), path)  # unchanged: passes
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layer3.0.bn1.running_mean"] += 1e-3
    with pytest.raises(RuntimeError, match="layer3.0.bn1.running_mean is changed"):
        sanity_check(state, path)


def test_pretrained_formats_moco_v3_and_torchvision(moco_checkpoint, tmp_path):
    path, moco = moco_checkpoint
    q = moco.encoder_q.state_dict()
    v3 = {"module.base_encoder." + k: v for k, v in q.items()}
    v3.update({"module.momentum_encoder." + k: v + 1 for k, v in q.items()})
    v3["module.predictor.0.weight"] = torch.zeros(3, 3)
    backbone, fmt = backbone_state(v3)
    assert fmt == "moco_v3" and not any(k.startswith("fc.") for k in backbone)
    assert all(torch.equal(backbone[k], q[k]) for k in backbone)
    tv = resnet_encoder("resnet18")(num_classes=1000).state_dict()
    backbone, fmt = backbone_state(tv)
    assert fmt == "torchvision" and set(backbone) == {k for k in tv if not k.startswith("fc.")}
    with pytest.raises(ValueError, match="no ResNet backbone"):
        backbone_state({"model.weight": torch.zeros(1)})

    # a file of another arch is refused with the arch named
    other = str(tmp_path / "r34.pth")
    torch.save({"state_dict": resnet_encoder("resnet34")().state_dict()}, other)
    with pytest.raises(ValueError, match="r34.pth .*does not fit -a resnet18:.*--arch"):
        load_pretrained(build_linear_model("resnet18", 10), other, "resnet18")


def _lincls_cli(args):
    repo = REPO
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "lincls.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_lincls_cli_main_lincls_flags(synthetic_root, moco_checkpoint, tmp_path):
    path, _ = moco_checkpoint
    data = os.path.join(synthetic_root, "imagefolder")
    common = [
        "-a",
        "resnet18",
        "--crop-size",
        "32",
        "-b",
        "10",
        "-j",
        "0",
        "--wd",
        "0",
        "--momentum",
        "0.9",
        "--output-dir",
        str(tmp_path),
    ]
    r = _lincls_cli(
        [
            *common,
            "--lr",
            "0.5",
            "--epochs",
            "1",
            "--schedule",
            "1",
            "--seed",
            "0",
            "--pretrained",
            path,
            data,
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "lincls_results.json") as f:
        res = json.load(f)
    assert res["pretrained_format"] == "moco" and len(res["history"]) == 1
    assert "Acc@1" in r.stdout and "sanity check passed" in r.stdout
    # where the files go, progress with an ETA, epochs counted from 1 as in the JSON
    assert r.stdout.startswith(f"lincls.py: output folder {tmp_path}\n"), r.stdout[:300]
    assert "eta: " in r.stdout and " * epoch 1/1: Acc@1" in r.stdout
    assert r.stdout.rstrip().endswith(
        f"lincls.py: wrote {tmp_path / 'lincls_results.json'}, "
        f"{tmp_path / 'checkpoint.pth.tar'}, "
        f"{tmp_path / 'model_best.pth.tar'}"
    )
    # as every run: metrics.json (each logged step's loss and lr, each epoch's val scores) and
    # TensorBoard events
    rows = [json.loads(r) for r in (tmp_path / "metrics.json").read_text().splitlines()]
    # 30 images in batches of 10: steps 0-2, the last logged (-p 10 or the epoch's end), then
    # the epoch's val scores at the next iteration
    assert [r["iteration"] for r in rows] == [2, 3]
    assert {"loss", "lr", "time"} <= set(rows[0]) and rows[0]["lr"] == 0.5
    first = res["history"][0]
    assert rows[1]["val_top1"] == first["top1"] and rows[1]["val_loss"] == first["val_loss"]
    assert list(tmp_path.glob("events.out.tfevents.*"))
    before = (tmp_path / "checkpoint.pth.tar").read_bytes()

    for args, message in (
        (["--pretrained", str(tmp_path / "missing.pth"), data], "--pretrained"),
        (
            ["-a", "resnet34", "--pretrained", path, "--output-dir", str(tmp_path / "r34"), data],
            "does not fit -a resnet34: ",
        ),
        # a new run never writes over an earlier one
        (
            ["--pretrained", path, data],
            f"--output-dir {tmp_path} holds a linear classifier run "
            f"({tmp_path / 'checkpoint.pth.tar'}); continue it with "
            f"--resume {tmp_path / 'checkpoint.pth.tar'}",
        ),
    ):
        r = _lincls_cli([*common, *args])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]
    assert (tmp_path / "checkpoint.pth.tar").read_bytes() == before
    assert not (tmp_path / "r34").exists()  # a failed start leaves no folder behind


def test_lincls_output_goes_under_output_named_after_the_pretraining_run():
    default = load_tool("lincls").default_output_dir
    assert default("output/pretrain/moco_v2_R18_cpu/checkpoint_0001.pth.tar") == os.path.join(
        "output", "lincls", "moco_v2_R18_cpu"
    )
    assert default("") == os.path.join("output", "lincls", "random_init")
