"""Converter + safe loading: pretrained ResNets arrive intact in Detectron2 models; code payloads never run."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, load_tool
from detectron2.modeling import build_model
from torch import nn

from detection.checkpoint import SafeDetectionCheckpointer, load_weights_only, safe_load_pickle
from detection.config import load_cfg
from detection.convert import (
    convert_checkpoint,
    convert_state_dict,
    load_source_state_dict,
    rename_key,
)

ROOT = REPO
CONFIGS = os.path.join(ROOT, "configs", "detection")


def _randomized(model, seed):
    """A torchvision model whose every parameter and BN buffer is random (defaults would match a fresh
    Detectron2 model by accident); He-scaled so activations stay finite through 50 layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():  # num_batches_tracked
                t.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif t.dim() > 1:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            else:  # biases, running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def _moco_checkpoint(arch, head, seed):
    """Official MoCo layout: DDP prefix, encoder_q / encoder_k, queue; v1 fc or v2 MLP head."""
    q = _randomized(getattr(torchvision.models, arch)(num_classes=128), seed)
    k = _randomized(getattr(torchvision.models, arch)(num_classes=128), seed + 1)  # differs from q
    if head == "mlp":
        for enc in (q, k):
            d = enc.fc.weight.shape[1]
            enc.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), enc.fc)
    sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
    sd.update({f"module.encoder_k.{n}": t for n, t in k.state_dict().items()})
    sd["module.queue"] = torch.randn(128, 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": arch, "state_dict": sd, "optimizer": {}}, q


def _d2_name(tv_key, c4):
    """Where a torchvision key must land in a Detectron2 model (written out independently of the converter)."""
    parts = tv_key.split(".")
    if parts[0].startswith("layer"):
        stage = int(parts[0][5:]) + 1
        block, rest = parts[1], parts[2:]
        if rest[0] == "downsample":
            local = ["shortcut"] + ([] if rest[1] == "0" else ["norm"]) + rest[2:]
        elif rest[0].startswith("bn"):
            local = [f"conv{rest[0][2:]}", "norm"] + rest[1:]
        else:
            local = rest
        name = ".".join([f"res{stage}", block] + local)
        if c4 and stage == 5:
            return "roi_heads." + name
        return ("backbone." if c4 else "backbone.bottom_up.") + name
    local = ["conv1", "norm"] + parts[1:] if parts[0] == "bn1" else parts
    return ("backbone." if c4 else "backbone.bottom_up.") + "stem." + ".".join(local)


def _assert_backbone_loaded(model, source, c4):
    """Every non-fc source tensor equals its model tensor, and every model backbone tensor came from the source."""
    target = model.state_dict()
    expected = {}
    for key, value in source.state_dict().items():
        if key.startswith("fc."):
            continue
        name = _d2_name(key, c4)
        assert name in target, f"{key} -> {name} not in the model"
        assert torch.equal(target[name].cpu(), value), f"{name} differs from source {key}"
        expected[name] = key
    owned = [n for n in target if n.startswith("backbone.bottom_up." if not c4 else "backbone.")]
    if c4:
        owned += [
            n
            for n in target
            if n.startswith("roi_heads.res5.") and not n.startswith("roi_heads.res5.norm.")
        ]
    missing = sorted(set(owned) - set(expected))
    assert not missing, f"backbone tensors not loaded from the checkpoint: {missing[:5]}"


def _torchvision_trunk(tv):
    return nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1, tv.layer2, tv.layer3)


@pytest.fixture(scope="module")
def moco_voc_cfg():
    return load_cfg(
        os.path.join(CONFIGS, "pascal_voc_R_50_C4_24k_moco.yaml"), ["MODEL.DEVICE", "cpu"]
    )


@pytest.mark.parametrize("head", ["fc", "mlp"])
def test_moco_r50_checkpoint_loads_into_paper_c4_model(tmp_path, moco_voc_cfg, head, capsys):
    ckpt, encoder_q = _moco_checkpoint("resnet50", head, seed=1)
    src, dst = tmp_path / "checkpoint_0199.pth.tar", tmp_path / "moco.pkl"
    torch.save(ckpt, src)
    result = convert_checkpoint(src, dst)
    assert result.format == "moco" and result.depth == 50 and result.block == "bottleneck"
    n_backbone = sum(1 for k in encoder_q.state_dict() if not k.startswith("fc."))
    assert result.converted == n_backbone
    assert result.dropped == len(ckpt["state_dict"]) - n_backbone  # encoder_k, queue, ptr, head
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")], "temp file left behind"

    saved = safe_load_pickle(str(dst))
    assert saved["__author__"] == "moco-det" and saved["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in saved["model"].values())
    assert not any(k.startswith(("fc", "stem.fc")) for k in saved["model"])

    model = build_model(moco_voc_cfg)
    SafeDetectionCheckpointer(model).load(str(dst))
    _assert_backbone_loaded(model, encoder_q, c4=True)

    # Same function, not only the same numbers: D2's R50-C4 (STRIDE_IN_1X1 False) == torchvision.
    model.eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        res4 = model.backbone(x)["res4"]
        assert torch.allclose(res4, _torchvision_trunk(encoder_q)(x), atol=1e-4, rtol=1e-4)
        res5_blocks = nn.Sequential(*list(model.roi_heads.res5.children())[:3])
        assert torch.allclose(res5_blocks(res4), encoder_q.layer4(res4), atol=1e-4, rtol=1e-4)


def test_supervised_torchvision_state_dict_loads_into_c4_model(tmp_path, moco_voc_cfg):
    tv = _randomized(torchvision.models.resnet50(), seed=5)
    src, dst = tmp_path / "resnet50.pth", tmp_path / "r50.pkl"
    torch.save(tv.state_dict(), src)
    result = convert_checkpoint(src, dst)
    assert result.format == "torchvision" and result.dropped == 2  # fc.weight, fc.bias
    model = build_model(moco_voc_cfg)
    SafeDetectionCheckpointer(model).load(str(dst))
    _assert_backbone_loaded(model, tv, c4=True)


def test_wrapped_and_prefixed_layouts_convert_identically(tmp_path):
    tv = _randomized(torchvision.models.resnet18(), seed=2)
    sd = tv.state_dict()
    plain, _ = convert_state_dict(sd)
    layouts = {
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "ddp": {"module." + k: v for k, v in sd.items()},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        model, result = convert_state_dict(load_source_state_dict(str(tmp_path / f"{name}.pth")))
        assert result.format == "torchvision", name
        assert model.keys() == plain.keys(), name
        assert all(np.array_equal(model[k], plain[k]) for k in plain), name


def test_moco_v3_checkpoint_keeps_only_base_encoder(tmp_path):
    base = _randomized(torchvision.models.resnet18(), seed=3)
    momentum = _randomized(torchvision.models.resnet18(), seed=4)
    d = base.fc.in_features
    base.fc = nn.Sequential(nn.Linear(d, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    sd = {f"module.base_encoder.{k}": v for k, v in base.state_dict().items()}
    sd.update({f"module.momentum_encoder.{k}": v for k, v in momentum.state_dict().items()})
    sd["module.predictor.0.weight"] = torch.randn(32, 32)
    torch.save(
        {"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {}, "scaler": {}},
        tmp_path / "v3.pth.tar",
    )
    result = convert_checkpoint(tmp_path / "v3.pth.tar", tmp_path / "v3.pkl")
    assert result.format == "mocov3" and result.depth == 18 and result.block == "basic"
    model = safe_load_pickle(str(tmp_path / "v3.pkl"))["model"]
    for k, v in base.state_dict().items():
        if not k.startswith("fc."):
            assert np.array_equal(model[rename_key(k)], v.numpy()), k
    assert len(model) == sum(1 for k in base.state_dict() if not k.startswith("fc."))


def test_toolkit_moco_checkpoint_without_ddp_prefix(tmp_path):
    from moco.modeling.moco import MoCo

    moco = MoCo(torchvision.models.resnet18, dim=16, K=32, mlp=True)  # default split-BN mode
    torch.save(
        {"epoch": 1, "arch": "resnet18", "state_dict": moco.state_dict()}, tmp_path / "c.pth.tar"
    )
    result = convert_checkpoint(tmp_path / "c.pth.tar", tmp_path / "c.pkl")
    model = safe_load_pickle(str(tmp_path / "c.pkl"))["model"]
    expected = {
        rename_key(k): v for k, v in moco.encoder_q.state_dict().items() if not k.startswith("fc.")
    }
    assert result.format == "moco" and model.keys() == expected.keys()
    assert all(np.array_equal(model[k], v.numpy()) for k, v in expected.items())


def test_resnet18_loads_into_embedded_r18_fpn_model(tmp_path):
    ckpt, encoder_q = _moco_checkpoint("resnet18", "mlp", seed=7)
    torch.save(ckpt, tmp_path / "r18.pth.tar")
    convert_checkpoint(tmp_path / "r18.pth.tar", tmp_path / "r18.pkl")
    cfg = load_cfg(
        os.path.join(CONFIGS, "embedded_voc_R_18_FPN.yaml"),
        ["MODEL.WEIGHTS", str(tmp_path / "r18.pkl")],
    )
    model = build_model(cfg)
    SafeDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    _assert_backbone_loaded(model, encoder_q, c4=False)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        res5 = model.backbone.bottom_up(x)["res5"]
        expected = encoder_q.layer4(_torchvision_trunk(encoder_q)(x))
    assert torch.allclose(res5, expected, atol=1e-4, rtol=1e-4)


def test_cli_prints_counts_and_refuses_bad_input(tmp_path):
    ckpt, q = _moco_checkpoint("resnet18", "fc", seed=8)
    torch.save(ckpt, tmp_path / "in.pth.tar")
    tool = os.path.join(ROOT, "tools", "convert_to_d2.py")
    ok = subprocess.run(
        [sys.executable, tool, str(tmp_path / "in.pth.tar"), str(tmp_path / "out.pkl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    n = sum(1 for k in q.state_dict() if not k.startswith("fc."))
    assert f"converted {n} tensors, dropped {len(ckpt['state_dict']) - n}" in ok.stdout
    assert "ResNet-18" in ok.stdout

    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "nobackbone.pth")
    bad = subprocess.run(
        [sys.executable, tool, str(tmp_path / "nobackbone.pth"), str(tmp_path / "x.pkl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "nobackbone.pth" in bad.stderr and "no ResNet backbone" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.pkl").exists()


def test_the_cli_refuses_to_overwrite_an_output_without_force(tmp_path, capsys):
    tv = _randomized(torchvision.models.resnet18(), seed=9)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    torch.save(_randomized(torchvision.models.resnet18(), seed=10).state_dict(), tmp_path / "b.pth")
    main, out = load_tool("convert_to_d2").main, tmp_path / "out.pkl"
    assert main([str(tmp_path / "tv.pth"), str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main([str(tmp_path / "b.pth"), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"convert_to_d2.py: error: OUTPUT {out} exists; give another name, or --force to "
        "overwrite it\n"
    )
    assert out.read_bytes() == before
    assert main([str(tmp_path / "b.pth"), str(out), "--force"]) == 0
    assert out.read_bytes() != before


def test_refusals_leave_existing_output_untouched(tmp_path):
    tv = _randomized(torchvision.models.resnet18(), seed=9)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "out.pkl"
    convert_checkpoint(tmp_path / "tv.pth", out)
    before = out.read_bytes()
    # a MoCo checkpoint whose encoder_q lacks layer4 is not a backbone
    partial = {
        f"module.encoder_q.{k}": v for k, v in tv.state_dict().items() if not k.startswith("layer4")
    }
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*no ResNet backbone.*layer4"):
        convert_checkpoint(tmp_path / "partial.pth", out)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert_checkpoint(tmp_path / "missing.pth", out)
    with pytest.raises(ValueError, match="must end with .pkl"):
        convert_checkpoint(tmp_path / "tv.pth", tmp_path / "out.pth")
    with pytest.raises(ValueError, match="--format"):
        convert_checkpoint(tmp_path / "tv.pth", out, fmt="moco")  # forced layout that is absent
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "tv.pth").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.pth: not a readable torch checkpoint"):
        convert_checkpoint(tmp_path / "truncated.pth", out)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.pkl", "partial.pth", "truncated.pth", "tv.pth"]


class _WriteMarker:
    """Unpickling this object creates ``path``: stands for any code a malicious checkpoint runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_code_payload_in_pth_is_refused_by_converter(tmp_path):
    marker = tmp_path / "marker"
    tv = torchvision.models.resnet18()
    payload = {"state_dict": tv.state_dict(), "extra": _WriteMarker(marker)}
    torch.save(payload, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pth: refusing to load.*io\.open"):
        convert_checkpoint(tmp_path / "evil.pth", tmp_path / "out.pkl")
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()
    # control: the payload is live, an unrestricted load would have run it
    control = tmp_path / "control"
    torch.save({"x": _WriteMarker(control)}, tmp_path / "control.pth")
    torch.load(tmp_path / "control.pth", weights_only=False)
    assert control.exists()


def test_code_payload_in_pkl_is_refused_by_checkpointer(tmp_path):
    marker = tmp_path / "marker"
    weights = {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": weights, "__author__": "x", "hook": _WriteMarker(marker)}, f)
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(
        pickle.UnpicklingError, match=r"evil\.pkl: refusing to unpickle global 'io\.open'"
    ):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "evil.pkl"))
    assert not marker.exists()
    # .pth weights go through torch.load(weights_only=True)
    torch.save({"model": model.state_dict(), "hook": _WriteMarker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError, match=r"evil\.pth"):
        SafeDetectionCheckpointer(model).load(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    # control: Detectron2's own checkpointer would have executed the payload
    from detectron2.checkpoint import DetectionCheckpointer

    with open(tmp_path / "control.pkl", "wb") as f:
        pickle.dump({"model": {}, "__author__": "x", "hook": _WriteMarker(tmp_path / "control")}, f)
    DetectionCheckpointer(model).load(str(tmp_path / "control.pkl"))
    assert (tmp_path / "control").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_numpy_weights_of_any_protocol(tmp_path, protocol):
    data = {
        "model": {
            "a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.array([1, 2], np.int64),
        },
        "__author__": "x",
        "scalars": [np.float32(1.5), np.int64(3), np.dtype("float16")],
    }
    with open(tmp_path / "w.pkl", "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    back = safe_load_pickle(str(tmp_path / "w.pkl"))
    assert (
        np.array_equal(back["model"]["a"], data["model"]["a"])
        and back["model"]["a"].dtype == np.float32
    )
    assert back["scalars"] == data["scalars"]


def test_load_weights_only_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights_only(str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("content", [b"hello world\n", b'{"a": 1}', b"", b"\x00\x01garbage" * 50])
def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    assert load_tool("convert_to_d2").main([str(path), str(tmp_path / "out.pkl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (
        f"convert_to_d2.py: error: {path} is not a readable torch "
        "checkpoint (neither a torch.save archive nor a pickle); give "
        "a .pth / .pth.tar / .pkl weights file"
    ), err
    assert "Traceback" not in err
    assert not (tmp_path / "out.pkl").exists()


def _tiny_checkpoint(fmt):
    """A checkpoint of ``fmt``'s layout around a ResNet-18 of base width 16 (CMC: the real model)."""
    from moco.checkpoint import build_checkpoint
    from moco.modeling.cmc import CMC
    from moco.modeling.resnet import resnet_encoder

    if fmt == "cmc":
        model = CMC("resnet18_w16", "moco", size=6, dim=8, K=8, shuffle_bn="off")
        return build_checkpoint(model, None, 1, "resnet18_w16"), "module.ab.encoder_q."
    sd = resnet_encoder("resnet18_w16")(num_classes=8).state_dict()
    prefix = {"moco": "module.encoder_q.", "mocov3": "module.base_encoder.", "torchvision": ""}
    sd = {prefix[fmt] + k: v for k, v in sd.items()}
    return ({"state_dict": sd} if fmt != "torchvision" else sd), prefix[fmt]


@pytest.mark.parametrize("fmt", ["moco", "mocov3", "torchvision", "cmc"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_backbone_weights_are_refused_at_conversion(tmp_path, fmt, value, capsys):
    ckpt, prefix = _tiny_checkpoint(fmt)
    src, out = tmp_path / "ckpt.pth.tar", tmp_path / "out.pkl"
    torch.save(ckpt, src)
    assert convert_checkpoint(src, out).format == fmt  # the clean checkpoint converts
    before = out.read_bytes()
    sd = ckpt if fmt == "torchvision" else ckpt["state_dict"]
    sd[prefix + "layer3.1.bn2.running_var"][5] = value  # one value in one buffer
    torch.save(ckpt, src)
    # --force: the refusal must come from the weights, not from the existing output
    code = load_tool("convert_to_d2").main([str(src), str(out), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "ckpt.pth.tar: 1 backbone tensor holds NaN or inf" in err
    assert repr(prefix + "layer3.1.bn2.running_var") in err
    assert out.read_bytes() == before  # the earlier output is kept whole
