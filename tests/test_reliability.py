"""Faults injected, outcomes asserted: kill and resume, NaN loss, full disk, a dead rank, bad data.

Runs are tiny (ResNet-18 on 32-px crops of the 30-image fixture folder, batch 8: 3 iterations per
epoch, no data-loading workers) so the whole file takes well under two minutes on 2 CPU cores.
Training that must be compared bit for bit runs in subprocesses with the same environment (one
thread), so the thread count of this test process cannot change the arithmetic.
"""

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, FullDisk, folder_with_bad_files

from moco import checkpoint as C
from moco.config import get_cfg
from moco.engine.trainer import PretrainTrainer
from moco.utils import file_io

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def tiny_opts(root, out, **overrides):
    """KEY VALUE list of a tiny pretraining run (2 epochs x 3 iterations, a checkpoint per epoch)."""
    opts = {
        "MODEL.ARCH": "resnet18",
        "MODEL.DIM": 16,
        "MODEL.K": 16,
        "MODEL.M": 0.99,
        "MODEL.MLP": True,
        "MODEL.T": 0.2,
        "MODEL.SPLIT_BN_GROUPS": 2,
        "MODEL.DEVICE": "cpu",
        "INPUT.AUG_PLUS": True,
        "INPUT.CROP_SIZE": 32,
        "DATA.ROOT": os.path.join(root, "imagefolder"),
        "DATALOADER.NUM_WORKERS": 0,
        "SOLVER.IMS_PER_BATCH": 8,
        "SOLVER.BASE_LR": 0.06,
        "SOLVER.EPOCHS": 2,
        "SOLVER.COS": True,
        "SOLVER.CHECKPOINT_PERIOD": 1,
        "KNN.DATA": "",
        "LOG_PERIOD": 1,
        "SEED": 0,
        "OUTPUT_DIR": str(out),
    }
    opts.update(overrides)
    return [str(x) for kv in opts.items() for x in kv]


def tiny_cfg(root, out, **overrides):
    cfg = get_cfg()
    cfg.merge_from_list(tiny_opts(root, out, **overrides))
    return cfg


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(out):
    """{iteration: (total_loss, acc1, acc5, lr)} of the training rows of metrics.json."""
    return {
        r["iteration"]: (r["total_loss"], r["acc1"], r["acc5"], r["lr"])
        for r in _metrics(out)
        if "total_loss" in r
    }


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tmp_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# 1. kill -9 after the checkpoint at N/2, resume to N: bit-identical to N iterations straight

# a hook that announces the end of iteration `stop` (after its checkpoint and metrics are written)
# and then waits to be killed
_WAIT_FOR_KILL = r"""
class WaitForKill(HookBase):
    def after_step(self):
        if self.trainer.iter + 1 == stop:
            with open(marker + ".part", "w") as f:
                f.write(str(os.getpid()))
            os.replace(marker + ".part", marker)
            time.sleep(600)
"""

# train_worker's steps (logging, seeds, trainer, train), plus WaitForKill
_DRIVER = (
    r"""
import json, os, sys, time
from detectron2.engine import HookBase
from moco.config import get_cfg
from moco.engine import PretrainTrainer
from moco.utils.launch import setup_process

opts, stop, marker = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = get_cfg()
cfg.merge_from_list(opts)
cfg.freeze()
setup_process(cfg)
trainer = PretrainTrainer(cfg, resume="auto")
"""
    + _WAIT_FOR_KILL
    + r"""
trainer.register_hooks([WaitForKill()])
trainer.train()
"""
)


def _driver(opts, stop=0, marker=""):
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, json.dumps(opts), str(stop), marker],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(proc, timeout=240):
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _kill_when_marked(proc, marker, stop):
    """SIGKILL ``proc`` once it wrote ``marker`` (WaitForKill after iteration ``stop``)."""
    deadline = time.monotonic() + 240
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"the run never reached iteration {stop}"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_after_half_then_resume_is_bit_identical(synthetic_root, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    marker = str(tmp_path / "at_half")
    a = _driver(tiny_opts(synthetic_root, straight))
    b = _driver(tiny_opts(synthetic_root, killed), stop=3, marker=marker)  # N = 6, N/2 = 3
    _kill_when_marked(b, marker, 3)
    assert (killed / "last_checkpoint").read_text() == "checkpoint_0000.pth.tar"
    assert not os.path.exists(killed / "checkpoint_0001.pth.tar")
    assert sorted(_losses(killed)) == [0, 1, 2]

    _wait(_driver(tiny_opts(synthetic_root, killed)))  # resume="auto" from checkpoint_0000
    _wait(a)
    want, got = _losses(straight), _losses(killed)
    assert sorted(want) == list(range(6))
    assert got == want  # JSON floats round-trip exactly: bit-identical losses, accuracies, LRs

    x = C.load_checkpoint(str(straight / "checkpoint_0001.pth.tar"))
    y = C.load_checkpoint(str(killed / "checkpoint_0001.pth.tar"))
    assert x["iteration"] == y["iteration"] == 6 and x["epoch"] == y["epoch"] == 2
    assert x["state_dict"].keys() == y["state_dict"].keys()
    for k, v in x["state_dict"].items():  # encoders, BN statistics, queue and pointer
        assert torch.equal(v, y["state_dict"][k]), k
    for i, s in x["optimizer"]["state"].items():  # SGD momentum buffers
        assert torch.equal(s["momentum_buffer"], y["optimizer"]["state"][i]["momentum_buffer"]), i
    assert x["scheduler"] == y["scheduler"]
    for rx, ry in zip(x["rng_states"], y["rng_states"]):
        assert torch.equal(rx["torch"], ry["torch"])
        assert torch.equal(rx["numpy"]["keys"], ry["numpy"]["keys"])
        assert torch.equal(rx["python"]["internal"], ry["python"]["internal"])


# ------------------------------------------------------------------------------------------------
# 4. training faults: NaN loss, full disk during a save


def test_nan_loss_stops_before_the_optimizer_step_and_keeps_the_checkpoint(
    synthetic_root, tmp_path, one_thread
):
    trainer = PretrainTrainer(tiny_cfg(synthetic_root, tmp_path))
    forward = trainer.model.forward
    seen = {}

    def poisoned(*args, **kwargs):  # iteration 4 (in epoch 2) produces NaN logits
        logits, labels = forward(*args, **kwargs)
        if trainer.iter == 4:
            seen["params"] = [p.detach().clone() for p in trainer.moco.parameters()]
            seen["ckpt"] = _sha256(tmp_path / "checkpoint_0000.pth.tar")
            logits = logits * float("nan")
        return logits, labels

    trainer.model.forward = poisoned
    with pytest.raises(FloatingPointError, match=r"iteration=4"):
        trainer.train()
    # no parameter moved: the run stopped before optimizer.step()
    for before, p in zip(seen["params"], trainer.moco.parameters()):
        assert torch.equal(before, p.detach())
    assert all(torch.isfinite(p).all() for p in trainer.moco.parameters())
    assert _sha256(tmp_path / "checkpoint_0000.pth.tar") == seen["ckpt"]
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint_0000.pth.tar"
    assert not os.path.exists(tmp_path / "checkpoint_0001.pth.tar")
    assert C.load_checkpoint(str(tmp_path / "checkpoint_0000.pth.tar"))["iteration"] == 3


def test_full_disk_during_save_keeps_previous_checkpoint(
    synthetic_root, tmp_path, monkeypatch, one_thread
):
    trainer = PretrainTrainer(tiny_cfg(synthetic_root, tmp_path))
    mkstemp, fdopen = file_io.tempfile.mkstemp, os.fdopen
    names, seen = {}, {}

    def recording_mkstemp(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        names[fd] = name
        return fd, name

    def full_fdopen(fd, *args, **kwargs):
        f = fdopen(fd, *args, **kwargs)
        if "checkpoint_0001" not in os.path.basename(names.get(fd, "")):
            return f
        seen["ckpt"] = _sha256(tmp_path / "checkpoint_0000.pth.tar")
        seen["tmp"] = names[fd]
        return FullDisk(
            f, {"bytes": 4096}
        )  # part of the new file reaches the disk, then it is full

    monkeypatch.setattr(file_io.tempfile, "mkstemp", recording_mkstemp)
    monkeypatch.setattr(os, "fdopen", full_fdopen)
    with pytest.raises(
        OSError,
        match=r"could not write .*checkpoint_0001\.pth\.tar: No space left "
        r"on device; the previous file there \(if any\) is unchanged",
    ) as err:
        trainer.train()
    assert err.value.errno == errno.ENOSPC
    assert seen["tmp"] and not os.path.exists(seen["tmp"])  # the partial file was removed
    assert not _tmp_files(tmp_path) and not os.path.exists(tmp_path / "checkpoint_0001.pth.tar")
    assert _sha256(tmp_path / "checkpoint_0000.pth.tar") == seen["ckpt"]
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint_0000.pth.tar"
    monkeypatch.undo()
    assert C.load_checkpoint(C.resolve_resume("auto", str(tmp_path)))["iteration"] == 3


# ------------------------------------------------------------------------------------------------
# 4. a dead rank: every process ends, non-zero, in bounded time

_DDP_DRIVER = r"""
import json, os, signal, sys
from detectron2.engine import HookBase
from detectron2.utils import comm
from moco.config import get_cfg
from moco.engine import PretrainTrainer
from moco.utils.launch import LaunchSpec, launch_processes, resolve_launch, setup_process


class Die(HookBase):
    def __init__(self, victim, stop, signum):
        self.victim, self.stop, self.signum = victim, stop, signum

    def after_step(self):
        if comm.get_rank() == self.victim and self.trainer.iter + 1 == self.stop:
            os.kill(os.getpid(), self.signum)


def worker(cfg, victim, stop, pid_dir, signum):
    setup_process(cfg)
    with open(os.path.join(pid_dir, f"rank{comm.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    trainer = PretrainTrainer(cfg)
    trainer.register_hooks([Die(victim, stop, signum)])
    trainer.train()


if __name__ == "__main__":
    opts, (victim, stop), pid_dir = json.loads(sys.argv[1]), map(int, sys.argv[2:4]), sys.argv[4]
    signum = getattr(signal, sys.argv[5] if len(sys.argv) > 5 else "SIGKILL")
    cfg = get_cfg()
    cfg.merge_from_list(opts)
    cfg.freeze()
    # torchrun's environment: each process on its own (no parent to stop the others); else
    # Detectron2's launch spawns both
    spec = resolve_launch(environ=os.environ) if "RANK" in os.environ else LaunchSpec(2)
    launch_processes(worker, spec, (cfg, victim, stop, pid_dir, signum),
                     timeout_minutes=cfg.DIST.TIMEOUT_MINUTES)
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().split(")")[-1].split()[0] != "Z"


def _run_driver(tmp_path, source, *args):
    """``source`` as a script in ``tmp_path`` (spawned workers import its functions), run to its
    end."""
    driver = tmp_path / "driver.py"
    driver.write_text(source)
    return subprocess.run(
        [sys.executable, str(driver), *args],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_killed_rank_ends_every_process_nonzero_in_bounded_time(synthetic_root, tmp_path):
    victim = 1
    opts = tiny_opts(synthetic_root, tmp_path / "out", **{"SOLVER.EPOCHS": 3})
    start = time.monotonic()
    proc = _run_driver(tmp_path, _DDP_DRIVER, json.dumps(opts), str(victim), "4", str(tmp_path))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert f"process {victim} terminated with signal SIGKILL" in proc.stderr, proc.stderr[-3000:]
    pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in (0, 1)]
    assert not any(_alive(p) for p in pids), pids
    # the checkpoint of epoch 1 (iteration 3) was written before the failure and is intact
    out = tmp_path / "out"
    assert C.load_checkpoint(str(out / "checkpoint_0000.pth.tar"))["iteration"] == 3
    assert not _tmp_files(out)
    assert elapsed < 120


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_a_parent(synthetic_root, tmp_path, signum, **overrides):
    """Two processes as torchrun or several machines start them (independent, rendezvous via
    env://); rank 1 sends itself ``signum`` after iteration 4."""
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(_DDP_DRIVER)
    opts = json.dumps(
        tiny_opts(synthetic_root, tmp_path / "out", **{"SOLVER.EPOCHS": 3}, **overrides)
    )
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {
            **ENV,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(driver), opts, "1", "4", str(tmp_path), signum],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def test_without_a_parent_the_survivor_of_a_killed_rank_fails_in_bounded_time(
    synthetic_root, tmp_path
):
    procs = _without_a_parent(synthetic_root, tmp_path, "SIGKILL")
    start = time.monotonic()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode not in (0, None), errs[0][-3000:]
    assert "gloo" in errs[0]  # gloo notices the closed connection (a stopped peer: the next test)
    assert time.monotonic() - start < 120


def _stopped(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "T"


def test_a_silent_rank_ends_the_run_within_the_process_group_timeout_naming_it(
    synthetic_root, tmp_path
):
    # SIGSTOP: a frozen or cut-off machine; its connections stay open, so only the timeout tells
    timeout_s = 9  # DIST.TIMEOUT_MINUTES 0.15
    procs = _without_a_parent(
        synthetic_root, tmp_path, "SIGSTOP", **{"DIST.TIMEOUT_MINUTES": timeout_s / 60}
    )
    try:
        deadline = time.monotonic() + 120
        while not _stopped(procs[1].pid):
            assert procs[1].poll() is None and time.monotonic() < deadline, "rank 1 never stopped"
            time.sleep(0.1)
        stopped = time.monotonic()
        err = procs[0].communicate(timeout=timeout_s + 10 + 60)[1]  # + the roll call + slack
        elapsed = time.monotonic() - stopped
        assert procs[0].returncode == 1, err[-3000:]
        last = err.strip().splitlines()[-1]  # torch may prefix "[rank0]: "
        # gloo's own words: its timeout, or the pair it closed on a timeout (another thread's op)
        assert re.search(
            r"RuntimeError: rank 0: (\[.*gloo.*\] Timed out waiting 9000ms for \w+ "
            r"operation to complete|Application timeout caused pair closure); rank 1 "
            r"of 2 did not answer a roll call within 10 s \(hung, stopped or cut "
            r"off\)$",
            last,
        ), last
        assert elapsed < timeout_s + 10 + 45, elapsed
        os.kill(procs[1].pid, signal.SIGCONT)  # back again, it finds its peer gone
        err1 = procs[1].communicate(timeout=60)[1]
        assert procs[1].returncode not in (0, None), err1[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.communicate()


_CLOSE_DRIVER = r"""
import json, os, sys
from detectron2.utils import comm
from moco.utils.launch import LaunchSpec, _close_after, launch_processes

def work():
    comm.all_gather(comm.get_rank())  # Detectron2 caches the gloo group it gathers over
    return comm.get_local_size()  # and keeps the local group launch made

def close_then_list_threads(out):
    _close_after(work)  # what launch_processes runs in each process
    names = []
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/comm") as f:
            names.append(f.read().strip())
    with open(os.path.join(out, f"threads{os.getpid()}.json"), "w") as f:
        json.dump(names, f)

if __name__ == "__main__":
    launch_processes(close_then_list_threads, LaunchSpec(2), (sys.argv[1],))
"""


def test_a_finished_launch_ends_every_gloo_thread_before_the_process_exits(tmp_path):
    # threads still alive end in interpreter finalization, where 2 runs of 2-process pretraining
    # in 192 aborted
    proc = _run_driver(tmp_path, _CLOSE_DRIVER, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads(p.read_text()) for p in tmp_path.glob("threads*.json")]
    assert len(found) == 2, proc.stderr[-3000:]
    for names in found:
        assert names and not [n for n in names if "gloo" in n or "tcpstore" in n], names


# ------------------------------------------------------------------------------------------------
# 3. bad data in image folders


def test_check_image_catches_what_verify_misses(synthetic_root, tmp_path):
    from PIL import Image

    from moco.data.checks import check_image

    truncated, empty, notes = folder_with_bad_files(synthetic_root, tmp_path / "f")
    with Image.open(truncated) as im:
        im.verify()  # PIL's cheap check passes a JPEG cut in half ...
    assert "truncated" in check_image(truncated)  # ... a decode does not
    assert check_image(empty) == "empty file"
    assert "cannot identify image file" in check_image(notes)
    good = os.path.join(synthetic_root, "imagefolder", "train", "disk", "disk_0000.jpg")
    assert check_image(good) is None


def test_unreadable_images_are_skipped_counted_and_bounded(synthetic_root, tmp_path, caplog):
    from moco.data.datasets import image_folder

    bad = folder_with_bad_files(synthetic_root, tmp_path / "f")
    root = str(tmp_path / "f")
    with caplog.at_level("WARNING", logger="moco.data.checks"):
        ds = image_folder(root, "train", None, "DATA.ROOT", max_bad_fraction=0.1)  # 3/33 < 10%
    assert len(ds) == 30 and ds.skipped_images == 3
    assert not set(bad) & {p for p, _ in ds.samples}
    assert len(ds.targets) == 30 and ds.imgs is ds.samples
    for path in bad:  # one warning naming each file
        assert sum(path in r.getMessage() for r in caplog.records) == 1, path

    with pytest.raises(ValueError) as err:  # default DATA.MAX_BAD_FRACTION 0.01
        image_folder(root, "train", None, "DATA.ROOT")
    msg = str(err.value)
    assert "\n" not in msg and f"DATA.ROOT={root}: 3 of 33 image files are unreadable" in msg
    assert "DATA.MAX_BAD_FRACTION 1.00%" in msg and bad[0] in msg

    nothing = tmp_path / "nothing" / "train" / "a"
    os.makedirs(nothing)
    (nothing / "x.jpg").write_bytes(b"")
    (nothing / "y.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(
        ValueError,
        match=r"none of the 2 image files is readable \(e\.g\. .*x\.jpg: "
        r"empty file\)",
    ):
        image_folder(str(tmp_path / "nothing"), "train", None, "KNN.DATA", max_bad_fraction=1.0)


def test_an_image_broken_after_the_scan_is_replaced_and_counted_across_workers(
    synthetic_root, tmp_path
):
    from torch.utils.data import DataLoader

    from moco.data.augment import eval_transform
    from moco.data.datasets import image_folder

    folder_with_bad_files(synthetic_root, tmp_path / "f")
    ds = image_folder(
        str(tmp_path / "f"), "train", eval_transform(crop=32), "DATA.ROOT", max_bad_fraction=0.1
    )
    victim = ds.samples[5][0]
    with open(victim, "r+b") as f:  # the file breaks while the run is going
        f.truncate(100)
    batches = list(DataLoader(ds, batch_size=10, num_workers=2))
    images = torch.cat([b[0] for b in batches])
    assert images.shape == (30, 3, 32, 32)
    assert torch.equal(images[5], images[6])  # index 5 served by the next image, deterministically
    assert ds.skipped_images == 3 + 1  # the workers' count reaches the main process


def test_pretraining_skips_unreadable_images_and_reports_them(
    synthetic_root, tmp_path, caplog, one_thread
):
    bad = folder_with_bad_files(synthetic_root, tmp_path / "f")
    cfg = tiny_cfg(
        synthetic_root,
        tmp_path / "out",
        **{"SOLVER.EPOCHS": 1, "DATA.ROOT": str(tmp_path / "f"), "DATA.MAX_BAD_FRACTION": 0.1},
    )
    with caplog.at_level("WARNING", logger="moco"):  # the "moco" logger writes the run's log.txt
        summary = PretrainTrainer(cfg).train()
    assert summary["dataset_size"] == 30 and summary["skipped_images"] == 3
    with open(tmp_path / "out" / "pretrain_summary.json") as f:
        assert json.load(f)["skipped_images"] == 3
    log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("moco."))
    assert all(f"skipping unreadable image {p}" in log for p in bad)
    cfg.DATA.MAX_BAD_FRACTION = 0.01
    with pytest.raises(ValueError, match="3 of 33 image files are unreadable"):
        PretrainTrainer(cfg)


# ------------------------------------------------------------------------------------------------
# 3. bad detection data: VOC XML, unreadable images in the training set

_BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<annotation><size><width>&lol2;</width><height>5</height></size></annotation>
"""


@pytest.fixture
def voc_copy(synthetic_root, tmp_path):
    import shutil

    dst = str(tmp_path / "VOC2007")
    shutil.copytree(os.path.join(synthetic_root, "VOC2007"), dst)
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda x: x[: len(x) // 2], "not well-formed XML"),
        (
            lambda x: x.replace("<height>", "<h>").replace("</height>", "</h>"),
            "missing <size/height>",
        ),
        (lambda x: x.replace("<name>", "<name>unicorn", 1), "has class 'unicorn"),
        (lambda x: x.replace("<xmax>", "<xmax>wide", 1), "<bndbox/xmax> in object 0 is 'wide"),
        (lambda x: _BOMB, "refused unsafe XML (EntitiesForbidden)"),
    ],
)
def test_broken_voc_xml_is_one_line_error_naming_the_file(voc_copy, edit, message):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detection.data.checks import check_voc_annotations, register_pascal_voc_checked
    from moco.data.synthetic.spec import CLASS_NAMES

    check_voc_annotations(voc_copy, "trainval", CLASS_NAMES)  # the generated files are fine
    xml = os.path.join(voc_copy, "Annotations", "000002.xml")
    with open(xml) as f:
        text = f.read()
    with open(xml, "w") as f:
        f.write(edit(text))
    name = "reliability_voc_broken"
    register_pascal_voc_checked(name, voc_copy, "trainval", 2007, CLASS_NAMES)
    try:
        with pytest.raises(ValueError) as err:
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    msg = str(err.value)
    assert msg.startswith(f"VOC annotation {xml}: ") and message in msg and "\n" not in msg


def _det_cfg(out, *opts):
    from test_train_net import TINY, VOC_CFG

    from detection.config import load_cfg

    return load_cfg(
        VOC_CFG,
        TINY
        + [
            "TEST.PRECISE_BN.ENABLED",
            "False",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(out),
            "SEED",
            "1",
            *opts,
        ],
    )


def test_detection_training_skips_a_corrupt_jpeg_and_counts_it(
    voc_copy, tmp_path, caplog, one_thread
):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from detection.data.checks import register_pascal_voc_checked
    from detection.trainer import DetectionTrainer
    from moco.data.synthetic.spec import CLASS_NAMES

    jpeg = os.path.join(voc_copy, "JPEGImages", "000003.jpg")
    with open(jpeg, "r+b") as f:
        f.truncate(300)
    name = "reliability_voc_corrupt_jpeg"
    register_pascal_voc_checked(name, voc_copy, "trainval", 2007, CLASS_NAMES)
    try:
        cfg = _det_cfg(tmp_path / "d", "DATASETS.TRAIN", f"('{name}',)", "SOLVER.MAX_ITER", "2")
        with pytest.raises(
            ValueError,
            match=rf"DATASETS.TRAIN {name}: 1 of 12 image files are "
            r"unreadable \(8.33% > DATALOADER.MAX_BAD_FRACTION "
            r"1.00%\), e.g. .*000003.jpg: OSError",
        ):
            DetectionTrainer(cfg)
        cfg = _det_cfg(
            tmp_path / "d",
            "DATASETS.TRAIN",
            f"('{name}',)",
            "SOLVER.MAX_ITER",
            "2",
            "DATALOADER.MAX_BAD_FRACTION",
            "0.1",
        )
        with caplog.at_level("WARNING", logger="detection"):
            trainer = DetectionTrainer(cfg)
        assert f"skipping unreadable image {jpeg}" in caplog.text
        assert len(trainer.data_loader.dataset) == 11  # the loader's list
        trainer.train()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    rows = [json.loads(line) for line in open(tmp_path / "d" / "metrics.json") if line.strip()]
    counts = [r["data/skipped_images"] for r in rows if "data/skipped_images" in r]
    assert counts and all(c == 1 for c in counts)


# ------------------------------------------------------------------------------------------------
# 1. detection fine-tuning resumes through Detectron2's DefaultTrainer


def test_detection_resume_restores_iteration_model_optimizer_and_schedule(
    synthetic_datasets, tmp_path, one_thread
):
    from detection.trainer import DetectionTrainer

    out = tmp_path / "det"
    first = DetectionTrainer(_det_cfg(out, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2"))
    first.resume_or_load(resume=True)
    first.train()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 1

    second = DetectionTrainer(
        _det_cfg(out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
    )
    second.resume_or_load(resume=True)  # reads last_checkpoint through SafeDetectionCheckpointer
    assert second.start_iter == 2
    model = second.model.state_dict()
    for k, v in saved["model"].items():
        assert torch.equal(model[k], v), k
    opt, saved_opt = second.optimizer.state_dict(), saved["trainer"]["_trainer"]["optimizer"]
    assert opt["state"].keys() == saved_opt["state"].keys() and opt["state"]
    for i, s in saved_opt["state"].items():
        assert torch.equal(opt["state"][i]["momentum_buffer"], s["momentum_buffer"]), i
    assert (
        second.scheduler.last_epoch == saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 2
    )
    second.train()
    assert second.iter == 4  # Detectron2 leaves iter at max_iter
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 3 and not torch.equal(
        final["model"]["backbone.bottom_up.stem.conv1.weight"],
        saved["model"]["backbone.bottom_up.stem.conv1.weight"],
    )


def test_the_detection_loader_continues_at_any_batch_whatever_the_workers():
    import itertools
    import random

    import numpy as np
    from detectron2.data.samplers import TrainingSampler

    from detection.data.order import ResumableTrainLoader

    # two aspect groups (width > height or not): Detectron2's grouping buffers one while the other
    # fills; every draw of the mapper (augmentation) is recorded
    dicts = [{"i": i, "width": 130 if i % 3 == 0 else 100, "height": 100} for i in range(10)]

    def mapper(d):
        return d["i"], float(np.random.rand()), float(torch.rand(1)), random.random()

    def batches(workers, start, n):
        loader = ResumableTrainLoader(dicts, mapper, TrainingSampler(10, seed=3), 3, True, workers)
        loader.load_state_dict({"seed": 3, "batches": start})
        return list(itertools.islice(loader, n)), loader.consumed

    straight, consumed = batches(0, 0, 9)
    assert consumed == 9
    assert all(len({dicts[i]["width"] for i, *_ in b}) == 1 for b in straight)  # grouped
    assert len({i for b in straight for i, *_ in b}) == 10
    for workers, start in ((0, 4), (2, 4), (2, 7)):
        assert batches(workers, start, 9 - start) == (straight[start:], 9), (workers, start)
    loader = ResumableTrainLoader(dicts, mapper, TrainingSampler(10, seed=3), 3, True, 0)
    for state, field in (
        ({"seed": "3", "batches": 1}, "seed '3'"),
        ({"seed": 3, "batches": -1}, "batches -1"),
        ([], "seed None"),
    ):
        with pytest.raises(ValueError, match=rf"^m.pth: data order {field} is not"):
            loader.load_state_dict(state, "m.pth")


# detection's main() up to training (setup_cfg seeds as train_net does), metrics.json written every
# iteration, and WaitForKill
_DET_DRIVER = (
    r"""
import json, os, sys, time
from detectron2.engine import HookBase, default_argument_parser, hooks
from detection.config import setup_cfg
from detection.data.datasets import register_synthetic
from detection.trainer import DetectionTrainer, prepare_datasets

argv, root, stop, marker = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
register_synthetic(root)
cfg = setup_cfg(default_argument_parser().parse_args(argv))
prepare_datasets(cfg)
trainer = DetectionTrainer(cfg)
trainer.resume_or_load(resume=True)
"""
    + _WAIT_FOR_KILL
    + r"""
for h in trainer._hooks:
    if isinstance(h, hooks.PeriodicWriter):
        h._period = 1  # Detectron2 writes every 20 iterations; compare each one
trainer.register_hooks([WaitForKill()])
trainer.train()
"""
)


def _det_driver(root, out, workers, stop=0, marker=""):
    from test_train_net import TINY, VOC_CFG

    argv = [
        "--config-file",
        VOC_CFG,
        *TINY,
        "SOLVER.MAX_ITER",
        "8",
        "SOLVER.CHECKPOINT_PERIOD",
        "4",
        "DATASETS.TEST",
        "()",
        "DATALOADER.NUM_WORKERS",
        str(workers),
        "SEED",
        "5",
        "OUTPUT_DIR",
        str(out),
    ]
    return subprocess.Popen(
        [sys.executable, "-c", _DET_DRIVER, json.dumps(argv), root, str(stop), marker],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _det_losses(out):
    """{iteration: every loss and the lr} of the training rows of a detection metrics.json."""
    return {
        r["iteration"]: {
            k: v for k, v in r.items() if k.startswith("loss") or k in ("total_loss", "lr")
        }
        for r in _metrics(out)
        if "total_loss" in r
    }


def test_detection_sigkill_after_a_checkpoint_then_resume_is_bit_identical(
    synthetic_root, tmp_path
):
    # the killed run has data-loading workers that prefetch, the straight one none: the data order,
    # augmentation and step RNGs depend on (seed, position) only
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    marker = str(tmp_path / "at_4")
    a = _det_driver(synthetic_root, straight, workers=0)
    b = _det_driver(synthetic_root, killed, workers=2, stop=4, marker=marker)
    _kill_when_marked(b, marker, 4)
    assert (killed / "last_checkpoint").read_text() == "model_0000003.pth"
    assert sorted(_det_losses(killed)) == [0, 1, 2, 3]

    _wait(_det_driver(synthetic_root, killed, workers=2))  # --resume: from model_0000003.pth
    _wait(a)
    want, got = _det_losses(straight), _det_losses(killed)
    assert sorted(want) == list(range(8)) and len(want[0]) >= 5
    assert got == want  # bit-identical losses of the RPN and ROI heads, and LRs

    x = torch.load(straight / "model_final.pth", map_location="cpu", weights_only=True)
    y = torch.load(killed / "model_final.pth", map_location="cpu", weights_only=True)
    assert x["iteration"] == y["iteration"] == 7
    assert x["model"].keys() == y["model"].keys()
    for k, v in x["model"].items():  # weights and the precise-BN statistics of the end
        assert torch.equal(v, y["model"][k]), k
    ox, oy = x["trainer"]["_trainer"]["optimizer"], y["trainer"]["_trainer"]["optimizer"]
    for i, s in ox["state"].items():
        assert torch.equal(s["momentum_buffer"], oy["state"][i]["momentum_buffer"]), i
    assert x["trainer"]["hooks"] == y["trainer"]["hooks"]  # LR schedule, data order {seed, batches}
    assert x["trainer"]["hooks"]["DataOrder"]["batches"] == 8


# ------------------------------------------------------------------------------------------------
# 2. hostile files: no loader in the toolkit runs code from a file


def test_no_unsafe_deserialisation_in_the_toolkit():
    import ast

    checked = 0
    for pkg in ("moco", "detection", "experiments", "tools"):
        for name in sorted(os.listdir(os.path.join(REPO, pkg))):
            if not name.endswith(".py"):
                continue
            path = os.path.join(REPO, pkg, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = ast.unparse(node.func)
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if func.endswith("torch.load") or func == "load" and "map_location" in kwargs:
                    checked += 1
                    assert kwargs.get("weights_only") == "True", f"{path}:{node.lineno}"
                assert func not in ("pickle.load", "pickle.loads", "pickle.Unpickler"), (
                    f"{path}:{node.lineno}: plain unpickling"
                )
                assert not (
                    func.endswith(("ET.parse", "ET.fromstring", "ElementTree.parse"))
                    and not func.startswith("DET")
                ), f"{path}:{node.lineno}: use defusedxml"
    assert checked >= 3  # the loaders exist and were seen
