"""Official checkpoint format, atomic writes, weights_only loading, RNG state round trip."""

import os
import pickle
import random

import numpy as np
import pytest
import torch

from moco import checkpoint as C
from moco.modeling.moco import MoCo
from moco.modeling.resnet import resnet_encoder
from moco.utils import file_io


def _small_moco(shuffle_bn="split", mlp=True):
    torch.manual_seed(0)
    return MoCo(
        resnet_encoder("resnet18"), dim=16, K=32, mlp=mlp, shuffle_bn=shuffle_bn, split_bn_groups=2
    )


def _trained_optimizer(model):
    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    logits, labels = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits, labels).backward()
    opt.step()
    return opt


def test_official_keys_weights_only_and_official_layout(tmp_path):
    model = _small_moco()
    opt = _trained_optimizer(model)
    ckpt = C.build_checkpoint(
        model, opt, 3, "resnet18", iteration=30, rng_states=[C.capture_rng_state()]
    )
    path = C.save_checkpoint(ckpt, str(tmp_path))
    assert os.path.basename(path) == "checkpoint_0002.pth.tar"  # official: epoch index 2 = 3 done
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint_0002.pth.tar"

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert list(loaded)[:4] == ["epoch", "arch", "state_dict", "optimizer"]
    assert loaded["epoch"] == 3 and loaded["arch"] == "resnet18" and loaded["iteration"] == 30
    sd = loaded["state_dict"]
    assert set(sd) == {"module." + k for k in model.state_dict()}
    groups = {k.split(".")[1] for k in sd}
    assert groups == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    assert "module.encoder_q.fc.0.weight" in sd and "module.encoder_q.fc.2.weight" in sd
    assert sd["module.queue"].shape == (16, 32) and sd["module.queue_ptr"].item() == 4
    assert loaded["optimizer"]["state"], "SGD momentum buffers are saved"

    # the official layout: a MoCo module (any Shuffle BN mode) after stripping "module."
    fresh = _small_moco(shuffle_bn="off")
    fresh.load_state_dict(C.strip_prefix(sd, "module."), strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # and the library loader accepts the same
    other = _small_moco()
    C.load_model_state(other, sd, path)
    assert torch.equal(other.queue, model.queue)


def test_load_model_state_rejects_mismatch_with_clear_error():
    model = _small_moco(mlp=False)
    sd = C.model_state_dict(_small_moco(mlp=True))
    with pytest.raises(ValueError, match=r"x\.pth.*does not match.*MODEL\.MLP"):
        C.load_model_state(model, sd, "x.pth")


class _Payload:
    """Unpickling this object runs code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_code_payload_is_refused_and_never_runs(tmp_path):
    marker = str(tmp_path / "marker")
    path = str(tmp_path / "evil.pth.tar")
    torch.save({"epoch": 1, "state_dict": {}, "x": _Payload(marker)}, path)
    assert not os.path.exists(marker)
    with pytest.raises(C.UnsafeCheckpointError, match="refusing to load .*evil.pth.tar"):
        C.load_checkpoint(path)
    assert not os.path.exists(marker), "the payload ran"


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "garbage.pth.tar"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth.tar is not a readable torch checkpoint"):
        C.load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        C.load_checkpoint(str(tmp_path / "nope.pth"))


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ckpt.pth")
    file_io.atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # by torch version
        file_io.atomic_save({"a": lambda: None}, path)  # lambdas cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pth"], "temporary files are cleaned up"


def test_resolve_resume(tmp_path):
    out = str(tmp_path)
    assert C.resolve_resume("", out) is None
    assert C.resolve_resume("auto", out) is None
    assert C.resolve_resume("auto", str(tmp_path / "absent")) is None
    C.write_last_checkpoint(out, "checkpoint_0004.pth.tar")
    expected = os.path.join(out, "checkpoint_0004.pth.tar")
    assert C.resolve_resume("auto", out) == expected
    assert C.resolve_resume(out, "elsewhere") == expected
    with pytest.raises(FileNotFoundError, match="--resume .*missing.pth"):
        C.resolve_resume(str(tmp_path / "missing.pth"), out)


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = C.capture_rng_state()
    expected = (
        torch.rand(3),
        np.random.rand(3),
        [random.random() for _ in range(3)],
        np.random.randn(),
    )
    path = str(tmp_path / "rng.pth")
    file_io.atomic_save({"rng": state}, path)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    C.restore_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]


def test_append_file_writes_whole_lines_and_cuts_a_torn_last_line(tmp_path):
    from moco.utils.file_io import AtomicAppendFile

    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 0}\n{"iterat')  # a crash elsewhere tore the last line
    f = AtomicAppendFile(str(path))
    assert path.read_text() == '{"iteration": 0}\n'
    f.write('{"iteration": 1')
    assert path.read_text() == '{"iteration": 0}\n'  # nothing reaches the file before flush
    f.write("}\n")
    f.flush()
    f.write('{"iteration": 2}\n')
    f.close()
    assert path.read_text().splitlines() == [
        '{"iteration": 0}',
        '{"iteration": 1}',
        '{"iteration": 2}',
    ]
