"""One run per output folder, signals, atomic detection files (issue 17, findings 5, 6 and 8).

Each test reproduces the mistake or attack: a second run on a busy folder, a folder of another
configuration, an OUTPUT_DIR that is a file, SIGTERM / SIGINT during training, a kill mid-save,
a temporary file left by a killed run. Runs are the tiny ones of test_reliability / test_train_net;
signals go to subprocesses once a checkpoint exists (polled, every wait bounded).
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, load_tool
from test_reliability import ENV, tiny_opts
from test_train_net import TINY, VOC_CFG

from moco.utils import file_io

_HOLD = r"""
import sys, time
from moco.utils.file_io import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _one_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def held_folder(tmp_path):
    """(folder, pid): a folder whose lock another live process holds."""
    out = tmp_path / "busy"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"  # bounded: the holder prints or dies
        yield out, proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_second_run_on_a_busy_output_dir_is_refused_naming_the_holder(
    synthetic_root, held_folder, capsys
):
    out, pid = held_folder
    pretrain, train_net = load_tool("pretrain").main, load_tool("train_net").main
    assert pretrain(tiny_opts(synthetic_root, out)) == 2
    err = _one_line(capsys.readouterr().err)
    assert (
        err.startswith("pretrain.py: error: OUTPUT_DIR") and str(out) in err and f"pid {pid}" in err
    )
    assert train_net(["--config-file", VOC_CFG, *TINY, "OUTPUT_DIR", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith("train_net.py: error: OUTPUT_DIR") and f"pid {pid}" in err
    assert sorted(os.listdir(out)) == [".lock"]  # neither run wrote anything there


def test_a_folder_of_another_config_is_refused_unless_resuming(synthetic_root, tmp_path, capsys):
    from moco.config import get_cfg

    out = tmp_path / "k16"
    first = get_cfg()
    first.merge_from_list(tiny_opts(synthetic_root, out))
    out.mkdir()
    (out / "config.yaml").write_text(first.dump())  # what a K 16 run leaves
    pretrain = load_tool("pretrain").main
    assert pretrain(tiny_opts(synthetic_root, out, **{"MODEL.K": 32})) == 2
    err = _one_line(capsys.readouterr().err)
    assert "holds a run of another configuration" in err and "--resume auto" in err
    assert (out / "config.yaml").read_text() == first.dump()


def test_a_new_run_never_writes_over_a_finished_one_and_resume_auto_says_what_it_found(
    synthetic_root, tmp_path, capsys
):
    out = tmp_path / "run"
    pretrain = load_tool("pretrain").main
    assert pretrain([*tiny_opts(synthetic_root, out), "--resume", "auto"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"pretrain.py: output folder {out}\n")
    assert f"pretrain.py: wrote {out / 'checkpoint_0001.pth.tar'}, " in printed
    assert (
        f"--resume auto: no checkpoint in {out}, starting from the beginning"
        in (out / "log.txt").read_text()
    )
    files = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    assert pretrain(tiny_opts(synthetic_root, out)) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"pretrain.py: error: OUTPUT_DIR {out} holds a run (last checkpoint "
        f"{out / 'checkpoint_0001.pth.tar'}); continue it with --resume auto, or give another "
        "--output-dir"
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == files
    assert pretrain([*tiny_opts(synthetic_root, out), "--resume", "auto"]) == 0
    assert (
        f"--resume auto: resuming from {out / 'checkpoint_0001.pth.tar'}"
        in (out / "log.txt").read_text()
    )


def test_a_failed_start_leaves_no_folder_and_the_corrected_run_is_not_refused(
    synthetic_root, tmp_path, capsys
):
    from moco import checkpoint as C
    from moco.modeling.moco import MoCo
    from moco.modeling.resnet import resnet_encoder

    # pretraining: the kNN folder has no train/ (found after the log and config.yaml are written)
    out = tmp_path / "pre"
    pretrain = load_tool("pretrain").main
    assert pretrain(tiny_opts(synthetic_root, out, **{"KNN.DATA": str(tmp_path)})) == 2
    assert "has no train/" in _one_line(capsys.readouterr().err)
    assert not out.exists()
    assert pretrain(tiny_opts(synthetic_root, out)) == 0, capsys.readouterr().err
    capsys.readouterr()
    # detection: unconverted MoCo weights (found when the trainer loads them)
    model = MoCo(resnet_encoder("resnet18"), dim=16, K=8, mlp=False, shuffle_bn="off")
    weights = C.save_checkpoint(C.build_checkpoint(model, None, 1, "resnet18"), str(tmp_path))
    det = tmp_path / "det"
    argv = ["--config-file", VOC_CFG, *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(det)]
    train_net = load_tool("train_net").main
    assert train_net([*argv, "MODEL.WEIGHTS", weights]) == 2
    assert "tools/convert_to_d2.py" in capsys.readouterr().err
    assert not det.exists()
    assert train_net(argv) == 0, capsys.readouterr().err
    assert (det / "final_metrics.json").is_file()
    # a folder that existed keeps what it held; only what the failed start wrote goes
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine\n")
    assert train_net([*argv[:-1], str(kept), "MODEL.WEIGHTS", weights]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_train_net_refuses_a_finished_folder_unless_resuming(synthetic_root, tmp_path, capsys):
    out = tmp_path / "det"
    argv = ["--config-file", VOC_CFG, *TINY, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out)]
    train_net = load_tool("train_net").main
    assert train_net(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert train_net(argv) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"train_net.py: error: OUTPUT_DIR {out} holds a run (last checkpoint "
        f"{out / 'model_final.pth'}); continue it with --resume, or give another OUTPUT_DIR"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files

    def trained():
        rows = (json.loads(r) for r in (out / "metrics.json").read_text().splitlines())
        return [r for r in rows if "total_loss" in r]

    steps = trained()
    assert train_net(["--resume", *argv]) == 0  # nothing left to train: it evaluates again
    assert trained() == steps


def test_an_output_dir_that_is_a_file_is_one_line_and_exit_2(synthetic_root, tmp_path, capsys):
    log = tmp_path / "notes.txt"
    log.write_text("mine\n")
    assert load_tool("pretrain").main(tiny_opts(synthetic_root, log)) == 2
    assert _one_line(capsys.readouterr().err).endswith(
        f"OUTPUT_DIR {log} is a file, not a folder; give a folder path"
    )
    assert load_tool("train_net").main(["--config-file", VOC_CFG, "OUTPUT_DIR", str(log)]) == 2
    assert "is a file, not a folder" in _one_line(capsys.readouterr().err)
    assert log.read_text() == "mine\n"  # detection used to append its log to it


def _wait_for(path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _stop(proc, signum):
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return err


def test_sigterm_stops_pretraining_with_a_checkpoint_and_stale_tmp_is_removed(
    synthetic_root, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint_0000.pth.tar.k3x9_a1b.tmp"  # what a kill mid-save leaves
    stale.write_bytes(b"\0" * 4096)
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "pretrain.py"),
        *tiny_opts(synthetic_root, out, **{"SOLVER.EPOCHS": 500}),
    ]
    proc = subprocess.Popen(
        cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "last_checkpoint", proc)  # the first epoch's checkpoint
    assert not stale.exists()
    err = _stop(proc, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith(
        "pretrain.py: stopped by SIGTERM after iteration"
    )
    # to continue: the command that was run, with --resume auto
    assert line.endswith(f"tools/pretrain.py --resume auto {shlex.join(cmd[2:])}"), line
    path = line.split("checkpoint ", 1)[1].split(";")[0]
    assert os.path.dirname(path) == str(out) and (
        out / "last_checkpoint"
    ).read_text() == os.path.basename(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert f"after iteration {ckpt['iteration']};" in line and ckpt["iteration"] >= 3
    rows = [json.loads(r) for r in (out / "metrics.json").read_text().splitlines()]
    assert (
        rows[-1]["iteration"] == ckpt["iteration"] - 1
    )  # the last step is logged, then resumed after
    assert not file_io.remove_stale_temp_files(str(out))
    # the printed command, run exactly as printed, continues after that checkpoint
    pointer = out / "last_checkpoint"
    again = _run_printed(line, ENV, lambda: pointer.read_text() != os.path.basename(path))
    later = again.split("checkpoint ", 1)[1].split(";")[0]
    resumed = torch.load(later, map_location="cpu", weights_only=True)
    assert resumed["iteration"] > ckpt["iteration"]
    assert f"--resume auto: resuming from {path}" in (out / "log.txt").read_text()


def _run_printed(line, env, progressed, signum=signal.SIGINT):
    """Run the command a stop line printed (after ": ") exactly as printed, from the repository
    root; once ``progressed()`` stop it with ``signum`` and return its own stop line, which must
    print the same command."""
    printed = line.split("): ", 1)[1]
    proc = subprocess.Popen(
        shlex.split(printed),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not progressed():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the resumed run made no progress"
        time.sleep(0.1)
    err = _stop(proc, signum)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err[-3000:]
    again = err.strip().splitlines()[-1]
    assert again.endswith(printed), again
    return again


# pretrain.py with a Ctrl-C (SIGINT to the process group: data-loading workers too) once the
# kNN feature extraction number argv[1] has read a batch of its loader (1 and 2: the untrained
# encoder's, KNN.AT_START; 3: the first evaluation after a training step)
_CTRL_C_IN_KNN = r"""
import os, signal, sys
import moco.evaluation.knn as knn

# a shell starts the tool with Python's own SIGINT handler and SIGINT unblocked; a child inherits
# an ignored or blocked SIGINT from the test process if an earlier test left one (then the
# Ctrl-C below would reach no one)
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

extract, calls = knn.extract_features, []

def ctrl_c_during_extraction(encoder, loader, *args, **kwargs):
    calls.append(1)
    def batches():
        for i, batch in enumerate(loader):
            if len(calls) == int(sys.argv[1]) and i == 0:
                os.killpg(0, signal.SIGINT)
            yield batch
    return extract(encoder, batches(), *args, **kwargs)

knn.extract_features = ctrl_c_during_extraction
sys.path.insert(0, "tools")
import pretrain
sys.exit(pretrain.main(sys.argv[2:]))
"""


def _ctrl_c_in_knn(synthetic_root, out, extraction):
    opts = tiny_opts(
        synthetic_root,
        out,
        **{
            "KNN.DATA": os.path.join(synthetic_root, "imagefolder"),
            "KNN.BATCH_SIZE": 4,  # several batches: the loader is read again after the signal
            # its workers start before the training loop's signal handler is set (Python's
            # default then: a KeyboardInterrupt ends the worker)
            "KNN.AT_START": True,
            "DATALOADER.NUM_WORKERS": 1,  # the kNN loader's worker gets the Ctrl-C too
            "INPUT.BATCH_AUGMENT": True,  # training reads decoded images in this process
            "DATA.CACHE_DECODED": True,
        },
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CTRL_C_IN_KNN, str(extraction), *opts],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        start_new_session=True,  # its own process group: the Ctrl-C reaches no one else
    )
    err = proc.stderr
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "exited unexpectedly" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_ctrl_c_during_the_knn_evaluation_stops_with_one_line_and_a_checkpoint(
    synthetic_root, tmp_path
):
    out = tmp_path / "run"
    line = _ctrl_c_in_knn(synthetic_root, out, 3)
    assert line.startswith("pretrain.py: stopped by SIGINT after iteration 3; checkpoint "), line
    path = line.split("checkpoint ", 1)[1].split(";")[0]
    assert (out / "last_checkpoint").read_text() == os.path.basename(path)
    assert torch.load(path, map_location="cpu", weights_only=True)["iteration"] == 3
    assert "kNN top-1" in (out / "log.txt").read_text()  # the evaluation finished first


def test_ctrl_c_during_the_untrained_knn_ends_with_one_line_and_leaves_no_folder(
    synthetic_root, tmp_path
):
    # before the first step (KNN.AT_START) there is nothing to keep: the start is undone
    out = tmp_path / "run"
    assert _ctrl_c_in_knn(synthetic_root, out, 1) == "pretrain.py: interrupted"
    assert not out.exists()


def test_sigint_stops_detection_with_one_line_and_complete_files(synthetic_root, tmp_path):
    out = tmp_path / "det"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        VOC_CFG,
        *TINY,
        "SOLVER.MAX_ITER",
        "2000",
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
        "DATASETS.TEST",
        "()",
        "TEST.PRECISE_BN.ENABLED",
        "False",
        "OUTPUT_DIR",
        str(out),
    ]
    env = dict(ENV, DETECTRON2_DATASETS=os.path.dirname(synthetic_root))
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _wait_for(out / "last_checkpoint", proc)
    err = _stop(proc, signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("train_net.py: stopped by SIGINT after iteration") and "--resume" in line
    # to continue: --resume before the KEY VALUE overrides (after them it would be one more)
    assert line.endswith(f"tools/train_net.py --resume {shlex.join(cmd[2:])}"), line
    models = sorted(out.glob("model_*.pth"))
    assert models and (out / "last_checkpoint").read_text() == models[-1].name
    for m in models:  # each complete: never a 0-byte file under the final name
        assert "iteration" in torch.load(m, map_location="cpu", weights_only=True)
    for row in (out / "metrics.json").read_text().splitlines():
        json.loads(row)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    # the printed command, run exactly as printed, resumes from the last checkpoint and trains on
    stopped = torch.load(models[-1], map_location="cpu", weights_only=True)["iteration"]
    newer = out / f"model_{stopped + 1:07d}.pth"
    _run_printed(line, env, newer.exists)
    assert f"Loading from {models[-1]}" in (out / "log.txt").read_text()
    rows = [json.loads(r) for r in (out / "metrics.json").read_text().splitlines()]
    assert rows[-1]["iteration"] > stopped  # it trained past the stop


def test_a_kill_during_a_detection_save_leaves_no_partial_file(tmp_path, monkeypatch):
    from detection.checkpoint import SafeDetectionCheckpointer

    model = torch.nn.Linear(4, 2)
    ckpt = SafeDetectionCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000001")

    def dies_mid_write(obj, f, *a, **k):
        f.write(b"PK\3\4 partial")
        raise KeyboardInterrupt  # what SIGINT (or SIGTERM's default) does mid-save

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000003")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
