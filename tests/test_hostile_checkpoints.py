"""Checkpoints and weights are checked for contents, not only types (issue 17, findings 2 and 3 and
the state items of 8): crafted resume states are one line and exit 2, never a segfault (each runs in
a subprocess); tiny files never allocate what they claim (peak memory of a subprocess)."""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import REPO
from test_reliability import tiny_cfg, tiny_opts

from moco import checkpoint as C
from moco.engine.trainer import PretrainTrainer

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
PRETRAIN = os.path.join(REPO, "tools", "pretrain.py")
GIB = 1 << 30
LITTLE = 256 << 20  # far below every payload's claim (2 GiB and more)


@pytest.fixture(scope="module")
def real_checkpoint(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained")
    cfg = tiny_cfg(synthetic_root, out, **{"SOLVER.EPOCHS": 1, "SOLVER.FUSED_SGD": True})
    cfg.freeze()
    PretrainTrainer(cfg).train()
    return C.read_last_checkpoint(str(out))


def _resume(synthetic_root, path, out):
    opts = tiny_opts(synthetic_root, out, **{"SOLVER.EPOCHS": 2, "SOLVER.FUSED_SGD": True})
    return subprocess.run(
        [sys.executable, PRETRAIN, "--resume", str(path), *opts],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def _craft_momentum(ckpt):
    for state in ckpt["optimizer"]["state"].values():
        state["momentum_buffer"] = torch.zeros(3)


def _craft_queue_ptr(ckpt):
    ckpt["state_dict"]["module.queue_ptr"] = torch.tensor([5])


def _craft_iteration(ckpt):
    ckpt["iteration"] = -4


def _craft_epoch(ckpt):
    ckpt["epoch"] = "one"


@pytest.mark.parametrize(
    "craft, field",
    [
        (_craft_momentum, "momentum_buffer"),
        (_craft_queue_ptr, "queue_ptr"),
        (_craft_iteration, "iteration"),
        (_craft_epoch, "epoch"),
    ],
)
def test_crafted_resume_state_is_one_line_exit_2_never_a_segfault(
    synthetic_root, real_checkpoint, tmp_path, craft, field
):
    ckpt = torch.load(real_checkpoint, weights_only=True)
    craft(ckpt)
    crafted = tmp_path / "crafted.pth.tar"
    torch.save(ckpt, crafted)
    r = _resume(synthetic_root, crafted, tmp_path / "out")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])  # 139 was SIGSEGV in fused SGD
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(crafted) in lines[0] and field in lines[0], r.stderr[-3000:]


def test_optimizer_state_is_checked_against_the_model_before_loading():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    good = opt.state_dict()
    C.check_optimizer_state(good, opt, "f.pth")
    bad = {**good, "state": {0: {"momentum_buffer": torch.zeros(3)}}}
    with pytest.raises(
        ValueError, match=r"f.pth: optimizer.state\[0\].momentum_buffer .* shape \(3,\)"
    ):
        C.check_optimizer_state(bad, opt, "f.pth")
    with pytest.raises(ValueError, match="param_groups"):
        C.check_optimizer_state({**good, "param_groups": []}, opt, "f.pth")


_MEMORY_PROBE = """
import resource, sys
sys.path.insert(0, {repo!r})
from moco.utils.cli import run_cli
from detection.checkpoint import SafeDetectionCheckpointer, load_weights_only
import torch
def load():
    path = sys.argv[1]
    if path.endswith(".pkl"):
        SafeDetectionCheckpointer(torch.nn.Linear(1, 1))._load_file(path)
    else:
        from moco.checkpoint import load_checkpoint
        load_checkpoint(path)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the imports (about 1 GB)
code = run_cli("probe", load, errors=(OSError, __import__("pickle").UnpicklingError))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
sys.exit(code)
"""


def _probe(tmp_path, path):
    """(peak memory growth of loading ``path`` in a fresh process, its one error line)."""
    script = tmp_path / "probe.py"
    script.write_text(_MEMORY_PROBE.format(repo=REPO))
    r = subprocess.run(
        [sys.executable, str(script), str(path)], env=ENV, cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], r.stderr[-3000:]
    return int(r.stdout.split()[-1]), lines[0]


def _bytearray_pickle(n):
    # GLOBAL builtins bytearray; (n,) REDUCE: a few bytes that ask for n bytes
    return b"\x80\x02cbuiltins\nbytearray\nJ" + n.to_bytes(4, "little") + b"\x85R."


def test_tiny_pkl_naming_bytearray_allocates_nothing(tmp_path):
    path = tmp_path / "w.pkl"
    path.write_bytes(_bytearray_pickle(2 * GIB - 1))
    peak, line = _probe(tmp_path, path)
    assert "bytearray" in line and peak < LITTLE, peak


def test_tiny_pth_naming_bytearray_allocates_nothing(tmp_path):
    path = tmp_path / "w.pth"
    with zipfile.ZipFile(path, "w") as z:  # torch's zip layout; bytearray is on torch's allow-list
        z.writestr("w/data.pkl", _bytearray_pickle(2 * GIB - 1))
        z.writestr("w/version", "3\n")
        z.writestr("w/byteorder", "little")
    peak, line = _probe(tmp_path, path)
    assert "bytearray" in line and peak < LITTLE, peak


def test_compressed_zip_member_is_refused_before_it_expands(tmp_path):
    tensor = torch.zeros(1 << 20)  # 4 MiB of zeros: a few KiB deflated; a real attack claims GiBs
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": tensor}}, plain)
    crafted = tmp_path / "deflated.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(crafted, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert crafted.stat().st_size < 100_000
    peak, line = _probe(tmp_path, crafted)
    assert "compressed" in line and peak < LITTLE


def test_pkl_array_that_claims_more_than_its_data_is_refused(tmp_path):
    # an ndarray pickle whose state declares 2**30 floats (4 GiB) but carries 4 bytes
    payload = pickle.dumps({"model": {"w": np.zeros(1, np.float32)}}, protocol=2)
    shape = b"K\x01\x85"  # BININT1 1, TUPLE1: the state's shape (1,)
    assert payload.count(shape) == 1
    payload = payload.replace(shape, b"J\x00\x00\x00\x40\x85")  # BININT 2**30
    path = tmp_path / "w.pkl"
    path.write_bytes(payload)
    peak, line = _probe(tmp_path, path)
    assert "bytes" in line and peak < LITTLE


@pytest.mark.parametrize(
    "model, message",
    [
        (["a"], "'model' must be a dict"),
        ("weights", "'model' must be a dict"),
        ({"w": np.array([1, 2], dtype=object)}, "object-dtype"),
    ],
)
def test_pkl_with_object_arrays_or_a_non_dict_model_is_one_line(tmp_path, model, message):
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"model": model, "__author__": "x"}, protocol=2))
    _, line = _probe(tmp_path, path)
    assert message in line, line
