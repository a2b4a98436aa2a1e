"""Runs as submitit jobs: on a SLURM cluster (``--submit slurm``) or on this machine through
submitit's local executor (``--submit local``), for tools/pretrain.py, tools/train_net.py and the
pipeline's stages, as moco-v3's, VISSL's and mmselfsup's submitit launchers do.

- :func:`add_submit_args` / :func:`check_submit_args`: the flags, and one-line errors naming them;
- :func:`make_executor`: a ``submitit.AutoExecutor`` of those flags;
- :class:`ToolJob`: the job of one tool run; it calls the tool's own ``main(argv)`` on every node
  (one task per node, which starts its ``--num-gpus`` processes as the tool does), with
  ``--num-machines``, ``--machine-rank`` and, across nodes, ``--dist-url`` taken from
  ``submitit.JobEnvironment``; :func:`submit_tool` submits it;
- :class:`StageSubmitter`: the pipeline's stages as jobs (:meth:`experiments.runs.Stages.run_many`
  with ``submit``): a stage is submitted once the stages it depends on have finished, since its key
  hashes their outputs (a fine-tune's, the converted weights' sha256).

Jobs log to ``--slurm-log-dir`` (default ``<output folder>/submitit``), ``%j`` the job id.
"""

import importlib.util
import os
import re
import shutil

from moco.utils.cli import RunFailed

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MEM = re.compile(r"^[0-9]+[KMGT]?$")
# the process layout the job decides: dropped from the command line it runs
_IN_JOB = "MOCO_DET_SUBMITTED_JOB"  # set in a job: it does not submit again
_LAYOUT_FLAGS = {
    "--num-machines": True,
    "--machine-rank": True,
    "--world-size": True,
    "--rank": True,
}


def add_submit_args(parser):
    g = parser.add_argument_group("cluster (submitit)")
    g.add_argument(
        "--submit",
        choices=("slurm", "local"),
        help="run as a submitit job: on SLURM (sbatch), or on this machine (submitit's local "
        "executor, waits for the job)",
    )
    g.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition")
    g.add_argument(
        "--slurm-time", type=int, default=4320, metavar="MIN", help="time limit (default 4320)"
    )
    g.add_argument(
        "--slurm-nodes", type=int, default=1, metavar="N", help="machines of the job (default 1)"
    )
    g.add_argument(
        "--slurm-gpus-per-node",
        type=int,
        metavar="N",
        help="GPUs per machine (default: --num-gpus, else 1; local: this machine's CUDA devices)",
    )
    g.add_argument("--slurm-mem", metavar="SIZE", help="memory per machine, e.g. 64G")
    g.add_argument(
        "--slurm-log-dir", metavar="DIR", help="job logs (default: <output folder>/submitit)"
    )
    return parser


def _given(argv, flag):
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def check_submit_args(args, argv):
    """One ValueError naming the flag for bad cluster flags (or flags without ``--submit``)."""
    slurm_only = [f for f in ("--slurm-partition", "--slurm-mem") if _given(argv, f)]
    if args.submit is None:
        given = [f for f in _flags() if _given(argv, f)]
        if given:
            raise ValueError(f"{given[0]} needs --submit slurm (or --submit local)")
        return
    if os.environ.get(_IN_JOB):  # an abbreviated --submit (--sub) would not have been dropped
        raise ValueError("--submit in a submitted job's command: give --submit in full")
    if args.slurm_nodes < 1:
        raise ValueError(f"--slurm-nodes {args.slurm_nodes}: must be >= 1 (machines of the job)")
    if args.slurm_time < 1:
        raise ValueError(f"--slurm-time {args.slurm_time}: must be >= 1 (minutes)")
    if args.slurm_gpus_per_node is not None and args.slurm_gpus_per_node < 0:
        raise ValueError(f"--slurm-gpus-per-node {args.slurm_gpus_per_node}: must be >= 0")
    if args.slurm_mem is not None and not _MEM.match(args.slurm_mem):
        raise ValueError(f"--slurm-mem {args.slurm_mem}: expected a size such as 64G or 500M")
    if args.submit == "local":
        if args.slurm_nodes > 1:
            raise ValueError(
                f"--slurm-nodes {args.slurm_nodes}: the local executor runs on this machine "
                "only; use --submit slurm for several machines"
            )
        if slurm_only:
            raise ValueError(f"{slurm_only[0]} applies to --submit slurm, not --submit local")
    else:
        missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
        if missing:
            raise ValueError(
                f"--submit slurm: no {missing[0]} on this machine (PATH); submit from a SLURM "
                "login node, or use --submit local to run the job here"
            )
    num_gpus = getattr(args, "num_gpus", None) if _given(argv, "--num-gpus") else None
    gpus = args.slurm_gpus_per_node
    if num_gpus is not None and gpus is not None and 0 < gpus < num_gpus:
        raise ValueError(f"--num-gpus {num_gpus} is more than --slurm-gpus-per-node {gpus}")
    for flag, dest in (("--num-machines", "num_machines"), ("--world-size", "world_size")):
        n = getattr(args, dest, None)
        if _given(argv, flag) and n is not None and n > 0 and n != args.slurm_nodes:
            raise ValueError(
                f"{flag} {n} contradicts --slurm-nodes {args.slurm_nodes}: with --submit, "
                "--slurm-nodes sets the machines; drop it"
            )


def _flags():
    import argparse

    return [a.option_strings[0] for a in add_submit_args(argparse.ArgumentParser())._actions[1:]]


def gpus_per_node(args, argv, default=None):
    """GPUs asked per machine: --slurm-gpus-per-node, else --num-gpus (or ``default``), else 1 on
    SLURM and this machine's CUDA devices locally."""
    if args.slurm_gpus_per_node is not None:
        return args.slurm_gpus_per_node
    if _given(argv, "--num-gpus"):
        return args.num_gpus
    if default is not None:
        return default
    if args.submit == "slurm":
        return 1
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_executor(args, log_dir, name, gpus):
    """A submitit executor of the flags: ``log_dir`` its folder (``%j``: the job id)."""
    import submitit

    if args.submit == "local":
        executor = submitit.LocalExecutor(folder=log_dir)
        executor.update_parameters(
            timeout_min=args.slurm_time, gpus_per_node=gpus, tasks_per_node=1, nodes=1
        )
        return executor
    executor = submitit.AutoExecutor(folder=log_dir, cluster="slurm")
    extra = {"mem": args.slurm_mem} if args.slurm_mem else {}
    executor.update_parameters(
        name=name,
        timeout_min=args.slurm_time,
        nodes=args.slurm_nodes,
        tasks_per_node=1,  # one task per machine starts the machine's processes
        gpus_per_node=gpus,
        cpus_per_task=max(1, 10 * gpus),
        slurm_signal_delay_s=120,
        **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {}),
        **({"slurm_additional_parameters": extra} if extra else {}),
    )
    return executor


def strip_flags(argv, flags):
    """``argv`` without ``flags`` ({flag: takes a value}), written ``--f V`` or ``--f=V``."""
    out, rest = [], list(argv)
    while rest:
        a = rest.pop(0)
        flag = a.split("=", 1)[0]
        if flag in flags:
            if flags[flag] and "=" not in a and rest:
                rest.pop(0)
            continue
        out.append(a)
    return out


def _submit_flags():
    return {f: True for f in _flags()}  # every cluster flag takes a value


def _port(job_id):
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return 20000 + int(digits) % 20000


def job_argv(argv, nodes, node, hostnames, job_id):
    """The command line a job runs on machine ``node`` of ``nodes``: the layout flags first (after
    train_net's trailing KEY VALUE they would be read as overrides)."""
    layout = ["--num-machines", str(nodes), "--machine-rank", str(node)]
    if nodes > 1:
        layout += ["--dist-url", f"tcp://{hostnames[0]}:{_port(job_id)}"]
        argv = strip_flags(argv, {"--dist-url": True})
    return layout + list(argv)


def load_tool(name):
    """``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ToolJob:
    """A job that runs ``tools/<tool>.py argv`` in the job's process, one task per machine."""

    def __init__(self, tool, argv, nodes, output_dir):
        self.tool, self.argv, self.nodes, self.output_dir = tool, list(argv), nodes, output_dir

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        os.environ[_IN_JOB] = "1"
        argv = job_argv(self.argv, self.nodes, env.node, env.hostnames, env.job_id)
        print(f"{self.tool}.py {' '.join(argv)}", flush=True)
        code = load_tool(self.tool).main(argv)
        if code:
            raise RuntimeError(
                f"tools/{self.tool}.py exited with code {code}; its error is in the log"
            )
        return {"tool": self.tool, "argv": argv, "output_dir": self.output_dir, "exit_code": 0}


def _log_dir(args, output_dir):
    return os.path.abspath(args.slurm_log_dir or os.path.join(output_dir, "submitit"))


def submit_tool(tool, args, argv, output_dir, default_gpus=None):
    """Submit ``tools/<tool>.py argv`` (without the cluster flags) as one job; prints its id and
    log folder. ``--submit local`` waits for it and returns its result; ``slurm`` returns the job."""
    check_submit_args(args, argv)
    gpus = gpus_per_node(args, argv, default_gpus)
    run_argv = strip_flags(argv, {**_submit_flags(), **_LAYOUT_FLAGS})
    if not _given(argv, "--num-gpus") and gpus > 0:
        run_argv = ["--num-gpus", str(gpus)] + run_argv
    log_dir = _log_dir(args, output_dir)
    executor = make_executor(args, os.path.join(log_dir, "%j"), f"moco-det-{tool}", gpus)
    job = executor.submit(ToolJob(tool, run_argv, args.slurm_nodes, output_dir))
    print(f"{tool}.py: submitted job {job.job_id}; logs in {job.paths.folder}", flush=True)
    if args.submit == "slurm":
        return job
    result = _wait(job)
    print(f"{tool}.py: job {job.job_id} finished; output folder {output_dir}", flush=True)
    return result


class JobFailed(RunFailed):
    """A submitted job failed; the message is one line naming its log (the tools' ``run_cli``
    prints it as an error line, exit code 1)."""


def _wait(job):
    """The job's result; a failed job is one RuntimeError naming its log."""
    import submitit

    from experiments.runs import last_line

    try:
        return job.result()
    except submitit.core.utils.UncompletedJobError as e:
        raise JobFailed(
            f"job {job.job_id} failed: {last_line(e, 'failed')} (log: {job.paths.stderr})"
        ) from None


class StageJob:
    """A pipeline stage's work (``fn(out, resume)``, picklable) run as a job."""

    def __init__(self, fn, out, resume):
        self.fn, self.out, self.resume = fn, out, resume

    def __call__(self):
        from experiments.runs import fresh_loggers

        with fresh_loggers():
            return self.fn(self.out, self.resume)


class StageSubmitter:
    """``submit(name, fn, out, resume) -> job`` for :meth:`experiments.runs.Stages.run_many`: each
    stage a job logged under ``log_dir/<name>/%j``."""

    def __init__(self, args, log_dir, gpus):
        self.args, self.log_dir, self.gpus = args, log_dir, gpus

    def __call__(self, name, fn, out, resume):
        folder = os.path.join(self.log_dir, name, "%j")
        executor = make_executor(self.args, folder, f"moco-det-{name}", self.gpus)
        return executor.submit(StageJob(fn, out, resume))


def stage_submitter(args, argv, run_dir, gpus):
    """The pipeline's :class:`StageSubmitter` of the cluster flags (checked here); ``gpus``: the
    stages' processes per machine."""
    check_submit_args(args, argv)
    if args.slurm_nodes > 1:
        raise ValueError(
            f"--slurm-nodes {args.slurm_nodes}: each pipeline stage runs on one machine "
            "(PRETRAIN.NUM_PROCESSES / DETECTION.NUM_PROCESSES processes); use --slurm-nodes 1"
        )
    gpus = gpus_per_node(args, argv, gpus if args.submit == "slurm" else None)
    return StageSubmitter(args, _log_dir(args, run_dir), gpus)
