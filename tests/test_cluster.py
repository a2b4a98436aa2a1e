"""--submit (experiments/cluster.py): tools/pretrain.py, tools/train_net.py and the pipeline's
stages as submitit jobs, run here through submitit's local executor; the SLURM form checked with
a stand-in sbatch (no cluster needed)."""

import argparse
import functools
import os
import pickle
import re
import stat
import sys

import cloudpickle
import pytest
import submitit
from conftest import REPO, load_tool

from experiments.cluster import StageSubmitter, ToolJob, add_submit_args, job_argv
from experiments.runs import StageFailed, Stages

PRETRAIN_CFG = os.path.join(REPO, "configs", "pretrain", "moco_v2_R18_cpu.yaml")
VOC_CFG = os.path.join(REPO, "configs", "detection", "embedded_voc_R_18_FPN.yaml")
TINY_PRETRAIN = ["--epochs", "1", "-j", "0", "SOLVER.IMS_PER_BATCH", "8", "MODEL.K", "8"]
TINY_PRETRAIN += ["MODEL.SPLIT_BN_GROUPS", "2", "MODEL.DIM", "16", "INPUT.CROP_SIZE", "32"]
TINY_PRETRAIN += ["KNN.BATCH_SIZE", "8"]
TINY_DETECT = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()"]
TINY_DETECT += ["SOLVER.MAX_ITER", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)"]
TINY_DETECT += ["INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64"]
TINY_DETECT += ["INPUT.MAX_SIZE_TEST", "128", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200"]
TINY_DETECT += ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200"]
TINY_DETECT += ["MODEL.RPN.POST_NMS_TOPK_TEST", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]
TINY_DETECT += ["TEST.DETECTIONS_PER_IMAGE", "20", "DATALOADER.NUM_WORKERS", "0"]
TINY_DETECT += ["TEST.PRECISE_BN.NUM_ITER", "1"]
SUBMITTED = re.compile(r"submitted job (\S+); logs in (\S+)")


@pytest.fixture
def job_env(monkeypatch, synthetic_root):
    """What a job process inherits: this checkout importable, one thread, the embedded set."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(synthetic_root))


def _job_result(stdout):
    """The result of the local job a tool's output names (its id and log folder)."""
    job_id, folder = SUBMITTED.search(stdout).groups()
    return submitit.local.local.LocalJob(folder=folder, job_id=job_id).result()


def test_pretrain_and_finetune_through_the_local_executor(
    job_env, synthetic_root, tmp_path, capsys
):
    data = os.path.join(synthetic_root, "imagefolder")
    out = str(tmp_path / "pretrain")
    argv = ["--config-file", PRETRAIN_CFG, "--submit", "local", "--output-dir", out, data]
    assert load_tool("pretrain").main(argv + TINY_PRETRAIN) == 0
    printed = capsys.readouterr().out
    result = _job_result(printed)
    assert result["tool"] == "pretrain" and result["exit_code"] == 0
    assert result["output_dir"] == out and result["argv"][:4] == [
        "--num-machines",
        "1",
        "--machine-rank",
        "0",
    ]
    assert SUBMITTED.search(printed).group(2).startswith(os.path.join(out, "submitit"))
    ckpt = os.path.join(out, "checkpoint_0000.pth.tar")
    for name in ("checkpoint_0000.pth.tar", "pretrain_summary.json", "metrics.json"):
        assert os.path.isfile(os.path.join(out, name)), name

    weights = str(tmp_path / "moco.pkl")
    assert load_tool("convert_to_d2").main([ckpt, weights]) == 0
    det = str(tmp_path / "detect")
    argv = ["--config-file", VOC_CFG, "--submit", "local", "--slurm-log-dir", str(tmp_path / "l")]
    argv += TINY_DETECT + ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", det]
    assert load_tool("train_net").main(argv) == 0
    printed = capsys.readouterr().out
    result = _job_result(printed)
    assert result["tool"] == "train_net" and result["output_dir"] == det
    assert SUBMITTED.search(printed).group(2).startswith(str(tmp_path / "l"))
    for name in ("final_metrics.json", "model_final.pth"):
        assert os.path.isfile(os.path.join(det, name)), name


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An ``sbatch`` (and ``srun``) on PATH: every script is accepted as job 4242, as SLURM answers."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sbatch = bindir / "sbatch"
    sbatch.write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    srun = bindir / "srun"  # submitit looks for it too
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return sbatch


def test_slurm_submission_parameters_and_multi_node_command(
    fake_sbatch, synthetic_root, tmp_path, capsys
):
    data = os.path.join(synthetic_root, "imagefolder")
    out = str(tmp_path / "run")
    argv = ["--config-file", PRETRAIN_CFG, "--submit", "slurm", "--slurm-partition", "learnlab"]
    argv += ["--slurm-nodes", "2", "--slurm-gpus-per-node", "8", "--slurm-time", "600"]
    argv += ["--slurm-mem", "480G", "--multiprocessing-distributed", "--world-size", "2"]
    argv += ["--rank", "0", "--dist-url", "tcp://localhost:10001", "--output-dir", out, data]
    assert load_tool("pretrain").main(argv + TINY_PRETRAIN) == 0
    printed = capsys.readouterr().out
    assert "pretrain.py: submitted job 4242; logs in " + os.path.join(out, "submitit", "4242")
    folder = os.path.join(out, "submitit", "4242")
    assert SUBMITTED.search(printed).groups() == ("4242", folder)
    with open(os.path.join(folder, "4242_submission.sh")) as f:
        script = f.read()
    for line in (
        "#SBATCH --partition=learnlab",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=600",
        "#SBATCH --mem=480G",
        "#SBATCH --job-name=moco-det-pretrain",
    ):
        assert line in script, line
    # the pickled job: the command without the cluster and layout flags, 8 processes per node
    with open(os.path.join(folder, "4242_submitted.pkl"), "rb") as f:
        job = pickle.load(f).function
    assert isinstance(job, ToolJob) and job.nodes == 2 and job.output_dir == out
    assert not {"--submit", "--slurm-nodes", "--world-size", "--rank"} & set(job.argv)
    assert job.argv[:2] == ["--num-gpus", "8"] and "--multiprocessing-distributed" in job.argv
    # what node 1 of the job runs: its rank, node 0's address (no longer localhost)
    run = job_argv(job.argv, 2, 1, ["node-a", "node-b"], "4242")
    assert run[:6] == [
        "--num-machines",
        "2",
        "--machine-rank",
        "1",
        "--dist-url",
        "tcp://node-a:24242",
    ]
    assert "tcp://localhost:10001" not in run
    args = load_tool("pretrain").parse_args(run)
    assert (args.num_machines, args.machine_rank, args.num_gpus) == (2, 1, 8)
    # train_net's trailing KEY VALUE overrides stay last
    run = job_argv(["--config-file", VOC_CFG, "SOLVER.MAX_ITER", "5"], 1, 0, ["n"], "7")
    train_args = load_tool("train_net").build_parser().parse_args(run)
    assert train_args.num_machines == 1 and train_args.opts == ["SOLVER.MAX_ITER", "5"]


# --- pipeline stages as jobs -------------------------------------------------------------------


def _work(value, out, resume):
    return {"value": value, "pid": os.getpid(), "resume": resume}


def _fail(out, resume):
    raise ValueError("boom in the stage")


def _stages(names):
    return [(name, {"name": name}, functools.partial(_work, name)) for name in names]


def _then(i, outputs):
    """a's finish adds b and c; b's adds d."""
    return _stages({"a": ["b", "c"], "b": ["d"]}.get(outputs["value"], []))


def _then_only(name, names, i, outputs):
    return _stages(names) if outputs["value"] == name else []


class FakeJob:
    def __init__(self, job_id, fn, log):
        self.job_id, self.fn, self.cancelled = job_id, fn, False
        self.paths = type("Paths", (), {"stdout": log + ".out", "stderr": log + ".err"})

    def done(self):
        return True

    def result(self):
        return self.fn()

    def cancel(self, check=True):
        self.cancelled = True


class FakeSubmit:
    """Records what is submitted when; runs a stage when its result is asked for."""

    def __init__(self, events):
        self.events, self.jobs = events, []

    def __call__(self, name, fn, out, resume):
        self.events.append(f"submit {name}")
        job = FakeJob(str(len(self.jobs)), functools.partial(self._run, name, fn, out, resume), out)
        self.jobs.append(job)
        return job

    def _run(self, name, fn, out, resume):
        self.events.append(f"finish {name}")
        return fn(out, resume)


def test_stages_are_jobs_submitted_after_their_dependencies_and_reused(tmp_path, capsys):
    events = []
    stages = Stages(str(tmp_path), total=4)
    outputs = stages.run_many(_stages(["a"]), then=_then, submit=FakeSubmit(events))
    assert [o["value"] for o in outputs] == ["a", "b", "c", "d"]
    assert events.index("submit b") > events.index("finish a")
    assert events.index("submit c") > events.index("finish a")
    assert events.index("submit d") > events.index("finish b")
    assert "[1/4] a: submitted job 0 (running in " in capsys.readouterr().out
    # a rerun reuses every finished stage (their stage.json) and submits nothing
    again, events = Stages(str(tmp_path), total=4), []
    assert again.run_many(_stages(["a"]), then=_then, submit=FakeSubmit(events)) == outputs
    assert events == [] and all(r["reused"] for r in again.records)


def test_a_failed_stage_job_is_named_and_the_others_cancelled(tmp_path):
    submit = FakeSubmit([])
    stages = [("bad", {"n": 0}, _fail)] + _stages(["x"])
    with pytest.raises(StageFailed, match=r"stage bad failed in job 0: boom in the stage \(see "):
        Stages(str(tmp_path), total=2).run_many(stages, submit=submit)
    assert submit.jobs[1].cancelled


def test_stage_jobs_through_the_local_executor(job_env, tmp_path, monkeypatch):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the jobs can't import tests/
    args = add_submit_args(argparse.ArgumentParser()).parse_args(["--submit", "local"])
    submit = StageSubmitter(args, str(tmp_path / "logs"), 0)
    then = functools.partial(_then_only, "a", ["b"])
    outputs = Stages(str(tmp_path / "run"), total=2).run_many(
        _stages(["a"]), then=then, submit=submit
    )
    assert [o["value"] for o in outputs] == ["a", "b"]
    assert len({o["pid"] for o in outputs} | {os.getpid()}) == 3  # each stage a process of its own
    assert os.listdir(tmp_path / "logs" / "a") and os.listdir(tmp_path / "logs" / "b")


# --- bad input ---------------------------------------------------------------------------------

_NO_SBATCH = "--submit slurm: no sbatch on this machine"


@pytest.mark.parametrize(
    "tool, flags, message",
    [
        ("pretrain", ["--submit", "slurm"], _NO_SBATCH),
        ("train_net", ["--submit", "slurm"], _NO_SBATCH),
        ("pipeline", ["--submit", "slurm"], _NO_SBATCH),
        ("pretrain", ["--submit", "local", "--slurm-nodes", "0"], "--slurm-nodes 0: must be >= 1"),
        ("train_net", ["--submit", "local", "--slurm-time", "0"], "--slurm-time 0: must be >= 1"),
        ("pretrain", ["--slurm-partition", "dev"], "--slurm-partition needs --submit slurm"),
        (
            "train_net",
            ["--submit", "local", "--slurm-nodes", "2"],
            "--slurm-nodes 2: the local executor runs on this machine only",
        ),
        (
            "pretrain",
            ["--submit", "local", "--slurm-mem", "64G"],
            "--slurm-mem applies to --submit slurm",
        ),
        (
            "pretrain",
            ["--submit", "local", "--num-gpus", "4", "--slurm-gpus-per-node", "2"],
            "--num-gpus 4 is more than --slurm-gpus-per-node 2",
        ),
        (
            "pretrain",
            ["--submit", "local", "--num-machines", "2"],
            "--num-machines 2 contradicts --slurm-nodes 1",
        ),
        (
            "pipeline",
            ["--submit", "local", "--slurm-gpus-per-node", "-1"],
            "--slurm-gpus-per-node -1: must be >= 0",
        ),
    ],
)
def test_bad_cluster_flags_are_one_line(tool, flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    argv = {
        "pretrain": ["--config-file", PRETRAIN_CFG, "--output-dir", str(tmp_path / "o")],
        "train_net": ["--config-file", VOC_CFG],
        "pipeline": [],
    }[tool]
    assert load_tool(tool).main(flags + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{tool}.py: error: {err[0].split('error: ', 1)[1]}"] and message in err[0]
    assert not os.listdir(tmp_path)  # nothing submitted, no folder made


@pytest.mark.parametrize("mem", ["64GB", "lots"])
def test_a_bad_slurm_mem_is_one_line(mem, fake_sbatch, capsys):
    argv = ["--config-file", VOC_CFG, "--submit", "slurm", "--slurm-mem", mem]
    assert load_tool("train_net").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"train_net.py: error: --slurm-mem {mem}: expected a size such as 64G or 500M"


def test_pipeline_stages_take_one_node(fake_sbatch, capsys):
    assert load_tool("pipeline").main(["--submit", "slurm", "--slurm-nodes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipeline.py: error: --slurm-nodes 2: each pipeline stage runs on one")


def test_a_job_never_submits_again(monkeypatch, tmp_path, capsys):
    """An abbreviated --submit (argparse accepts --sub) stays in the job's command; the job refuses
    it rather than submitting itself again."""
    monkeypatch.setenv("MOCO_DET_SUBMITTED_JOB", "1")
    argv = ["--sub", "local", "--config-file", PRETRAIN_CFG, "--output-dir", str(tmp_path)]
    assert load_tool("pretrain").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pretrain.py: error: --submit in a submitted job's command: give --submit in full"
