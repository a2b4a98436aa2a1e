"""Stages.run_many: independent stages side by side in worker processes, reuse, failures named."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from experiments.runs import StageFailed, Stages, resolve_jobs
from moco.utils.cli import run_cli
from moco.utils.run_files import STAGE_FILE


def _work(value, out, resume):
    import torch

    print(f"stage says {value}", flush=True)
    return {
        "value": value,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "resume": resume,
    }


def _fail(out, resume):
    raise ValueError("boom in the stage")


def _sleep(pidfile, out, resume):
    with open(pidfile, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def _sleep_until_sigterm(pidfile, out, resume):
    """A stage that, like a training run (SignalStop), ends normally on SIGTERM."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(pidfile, "a") as f:
        f.write(f"{os.getpid()}\n")
    for _ in range(6000):
        if stop:
            return {}
        time.sleep(0.1)
    return {}


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _stages(n):
    return [(f"s{i}", {"i": i}, functools.partial(_work, i)) for i in range(n)]


def test_run_many_runs_stages_in_worker_processes_and_reuses_them(tmp_path, capsys):
    stages = Stages(str(tmp_path), total=5)
    outputs = stages.run_many(_stages(5), jobs=2, threads=1)
    assert [o["value"] for o in outputs] == list(range(5))  # list order, whatever finished first
    pids = {o["pid"] for o in outputs}
    assert os.getpid() not in pids and len(pids) <= 2  # two worker processes served five stages
    assert all(o["threads"] == 1 for o in outputs)
    for i in range(5):
        (folder,) = [d for d in os.listdir(tmp_path) if d.startswith(f"s{i}-")]
        with open(tmp_path / folder / STAGE_FILE) as f:
            assert json.load(f)["outputs"]["value"] == i
        assert f"stage says {i}" in (tmp_path / folder / "console.log").read_text()
    assert "stage says" not in capsys.readouterr().out  # consoles went to the stage folders

    again = Stages(str(tmp_path), total=5)
    assert again.run_many(_stages(5), jobs=2) == outputs  # finished stages are reused
    assert all(r["reused"] for r in again.records)
    assert capsys.readouterr().out.count("done earlier, reusing") == 5


def test_jobs_1_runs_in_this_process(tmp_path):
    outputs = Stages(str(tmp_path), total=2).run_many(_stages(2), jobs=1)
    assert {o["pid"] for o in outputs} == {os.getpid()}


def test_a_failing_stage_is_named_with_its_log_and_finished_ones_are_kept(tmp_path, capsys):
    stages = _stages(2) + [("bad", {"bad": 1}, _fail)]
    with pytest.raises(
        StageFailed, match=r"stage bad failed: ValueError: boom in the stage \(see .*console.log\)"
    ):
        Stages(str(tmp_path), total=3).run_many(stages, jobs=2, threads=1)
    # a tool prints it as one line and exit code 1: the work failed, the input was not bad (2),
    # and the tool has no bug to show a traceback of
    capsys.readouterr()
    again = Stages(str(tmp_path), total=1)
    code = run_cli("ablate.py", lambda: again.run_many(stages[2:], jobs=2, threads=1))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("ablate.py: error: stage bad failed: ValueError: boom in the stage (see ")
    (bad,) = [d for d in os.listdir(tmp_path) if d.startswith("bad-")]
    assert "Traceback" in (tmp_path / bad / "console.log").read_text()
    assert not (tmp_path / bad / STAGE_FILE).exists()
    # the good stages are finished or resume; a rerun without the bad one completes them all
    again = Stages(str(tmp_path), total=2).run_many(_stages(2), jobs=2, threads=1)
    assert [o["value"] for o in again] == [0, 1]
    for i in range(2):
        (folder,) = [d for d in os.listdir(tmp_path) if d.startswith(f"s{i}-")]
        assert (tmp_path / folder / STAGE_FILE).exists()


def _abort(index):
    signal.signal(signal.SIGABRT, signal.SIG_DFL)  # no faulthandler dump: die as C++'s abort does
    os.abort()


def test_a_worker_process_killed_by_a_signal_is_one_line_and_exit_1(capsys):
    import torch.multiprocessing as mp

    code = run_cli("pretrain.py", lambda: mp.start_processes(_abort, nprocs=1))
    err = capsys.readouterr().err
    assert code == 1, err
    assert err == "pretrain.py: error: process 0 terminated with signal SIGABRT\n", err


def _dependants(calls, i, outputs):
    """Stage s0's finish adds d0 and d1; d0's finish adds d2; nothing else adds anything."""
    calls.append(outputs["value"])
    more = {0: ["d0", "d1"], "d0": ["d2"]}.get(outputs["value"], [])
    return [(name, {"name": name}, functools.partial(_work, name)) for name in more]


@pytest.mark.parametrize("jobs", [1, 2])
def test_dependants_join_the_queue_when_their_stage_finishes_or_is_reused(tmp_path, jobs):
    calls = []
    then = functools.partial(_dependants, calls)
    outputs = Stages(str(tmp_path), total=6).run_many(_stages(3), jobs=jobs, threads=1, then=then)
    values = [o["value"] for o in outputs]
    assert values[:3] == [0, 1, 2] and sorted(values[3:]) == ["d0", "d1", "d2"]
    assert values.index("d2") > values.index("d0")  # added when d0 finished
    assert sorted(calls, key=str) == sorted([0, 1, 2, "d0", "d1", "d2"], key=str)
    # a rerun reuses every stage, and the reused ones still add their dependants
    again = Stages(str(tmp_path), total=6)
    assert again.run_many(_stages(3), jobs=jobs, then=then) == outputs
    assert len(again.records) == 6 and all(r["reused"] for r in again.records)


def test_a_copied_repository_reuses_its_finished_stages(tmp_path, capsys):
    """Keys and records hold paths relative to the repository root: after a copy to another
    place the stage is found finished, and its outputs point into the copy."""
    import shutil

    def stage(root):
        material = {"config": os.path.join(root, "configs", "a.yaml"), "text": f"DATA: {root}/d\n"}
        return "s", material, lambda out, resume: {"weights": os.path.join(out, "w.pkl")}

    first = tmp_path / "one" / "repo"
    out = Stages(str(first / "output"), 1, root=str(first)).run(*stage(str(first)))
    assert out == {"weights": str(first / "output" / _only_dir(first / "output") / "w.pkl")}
    copy = tmp_path / "two" / "repo"
    shutil.copytree(first, copy)
    capsys.readouterr()
    reused = Stages(str(copy / "output"), 1, root=str(copy)).run(*stage(str(copy)))
    assert "done earlier, reusing" in capsys.readouterr().out
    assert reused == {"weights": str(copy / "output" / _only_dir(copy / "output") / "w.pkl")}
    assert os.listdir(copy / "output") == os.listdir(first / "output")  # no new, partial folder


def _only_dir(path):
    (name,) = os.listdir(path)
    return name


@pytest.mark.parametrize(
    "record, why",
    [
        ("[]", "a list, not a record"),
        ("{}", "the record of stage None key None"),
        ("not json", "not valid JSON"),
        (None, "the record of stage 's1'"),  # s1's stage.json copied into s0's folder
        ("outputs null", "its outputs are null"),
    ],
)
def test_a_stage_json_that_is_not_this_stages_is_one_line_naming_it(tmp_path, record, why):
    Stages(str(tmp_path), total=2).run_many(_stages(2), jobs=1)
    (s0,) = [d for d in os.listdir(tmp_path) if d.startswith("s0-")]
    (s1,) = [d for d in os.listdir(tmp_path) if d.startswith("s1-")]
    path = tmp_path / s0 / STAGE_FILE
    if record is None:
        path.write_text((tmp_path / s1 / STAGE_FILE).read_text())
    elif record == "outputs null":
        good = json.loads(path.read_text())
        path.write_text(json.dumps({**good, "outputs": None}))
    else:
        path.write_text(record)
    with pytest.raises(ValueError) as e:
        Stages(str(tmp_path), total=2).run_many(_stages(2), jobs=1)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and why in message and "\n" not in message
    assert f"remove {tmp_path / s0} to run stage s0 again" in message


def test_a_file_where_a_stage_folder_belongs_is_one_line(tmp_path):
    Stages(str(tmp_path), total=1).run_many(_stages(1), jobs=1)
    (s0,) = os.listdir(tmp_path)
    shutil.rmtree(tmp_path / s0)
    (tmp_path / s0).write_text("a log, not a stage")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / s0} is a file where the folder"):
        Stages(str(tmp_path), total=1).run_many(_stages(1), jobs=1)
    assert (tmp_path / s0).read_text() == "a log, not a stage"


def test_jobs_auto_is_one_lane_per_available_core():
    assert resolve_jobs(0) == len(os.sched_getaffinity(0))
    assert resolve_jobs(3) == 3
    with pytest.raises(ValueError, match=r"JOBS must be >= 1, or 0 for auto .* got -2"):
        resolve_jobs(-2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_lanes_stop_when_their_parent_is_killed(tmp_path):
    """A sweep or pipeline killed with SIGKILL (no finally runs) takes its lanes with it: orphaned,
    they would train on in run folders that the next start resumes in lanes of its own."""
    pidfile = str(tmp_path / "lane.pid")
    script = (
        "import functools, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from experiments.runs import Stages\n"
        "from test_runs import _sleep\n"
        f"stages = [('sleeper', {{'i': 0}}, functools.partial(_sleep, {pidfile!r}))]\n"
        f"Stages({str(tmp_path / 'run')!r}, total=1).run_many(stages, jobs=2, threads=1)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    lane = None
    try:
        for _ in range(600):  # the lane imports torch before its stage starts
            if os.path.exists(pidfile) and os.path.getsize(pidfile):
                break
            assert parent.poll() is None, "the pipeline process ended before its lane started"
            time.sleep(0.2)
        with open(pidfile) as f:
            lane = int(f.read())
        assert _running(lane)
        parent.kill()
        parent.wait()
        for _ in range(300):
            if not _running(lane):
                break
            time.sleep(0.1)
        assert not _running(lane), "the lane outlived its killed parent"
    finally:
        parent.kill()
        if lane is not None and _running(lane):
            os.kill(lane, signal.SIGKILL)


def test_lanes_take_no_new_stage_once_their_parent_is_gone(tmp_path):
    """A training stage ends normally on the SIGTERM its lane gets when the parent dies (a
    checkpoint, then a return); the orphaned lane must then stop, not start the next queued
    stage in a run folder that the next start would also resume."""
    started = str(tmp_path / "started")
    script = (
        "import functools, sys\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "from experiments.runs import Stages\n"
        "from test_runs import _sleep_until_sigterm\n"
        f"fn = functools.partial(_sleep_until_sigterm, {started!r})\n"
        "stages = [(f's{i}', {'i': i}, fn) for i in range(4)]\n"
        f"Stages({str(tmp_path / 'run')!r}, total=4).run_many(stages, jobs=2, threads=1)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    lanes = []
    try:
        for _ in range(600):  # each lane imports torch before its first stage starts
            if os.path.exists(started) and len(open(started).read().split()) == 2:
                break
            assert parent.poll() is None, "the pipeline process ended before its lanes started"
            time.sleep(0.2)
        lanes = [int(x) for x in open(started).read().split()]
        assert len(lanes) == 2 and all(_running(p) for p in lanes)
        parent.kill()
        parent.wait()
        for _ in range(300):
            if not any(_running(p) for p in lanes):
                break
            time.sleep(0.1)
        assert not any(_running(p) for p in lanes), "a lane outlived its killed parent"
        assert len(open(started).read().split()) == 2, "an orphaned lane started another stage"
    finally:
        parent.kill()
        for p in lanes:
            if _running(p):
                os.kill(p, signal.SIGKILL)
