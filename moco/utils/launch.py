"""Processes and devices: what every training entry point shares.

- :class:`LaunchSpec` / :func:`resolve_launch`: the process layout from Detectron2's flags
  (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``) or the official
  main_moco.py's (``--multiprocessing-distributed``, ``--world-size``, ``--rank``), or torchrun's
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``).
- :func:`launch_processes`: a function in every process (Detectron2's ``launch``: gloo on CPU,
  NCCL on GPU; or the processes torchrun started); :func:`launch_training`: a trainer class
  (moco.engine.trainer.PretrainTrainer, moco.engine.supervised.SupervisedTrainer) in every process.
- :func:`process_group_timeout`: ``DIST.TIMEOUT_MINUTES`` as the process group's timeout, so a peer
  that hangs without closing its connection (a frozen or cut-off machine) ends the run after that
  long; a collective that timed out names the ranks that did not answer a roll call. At most a
  year (:data:`MAX_TIMEOUT_MINUTES`).
- :func:`check_local_processes`: at launch, no more processes per machine than CUDA devices (or CPU
  cores without CUDA).
- :func:`resolve_device`: the one device rule (auto, cpu, cuda, cuda:N) of every caller.
"""

import contextlib
import dataclasses
import datetime
import functools
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time

import torch
import torch.distributed as dist
from detectron2.engine.launch import launch
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from moco.utils import file_io
from moco.utils.run_files import CONFIG_FILE

logger = logging.getLogger(__name__)


_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
MAX_TIMEOUT_MINUTES = 525600  # a year: DIST.TIMEOUT_MINUTES's bound (process_group_timeout)


@dataclasses.dataclass
class LaunchSpec:
    """How many processes, where. ``from_env``: torchrun started them (init from env://)."""

    procs_per_machine: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    from_env: bool = False

    @property
    def world_size(self):
        return self.procs_per_machine * self.num_machines


def resolve_launch(
    num_gpus=None,
    num_machines=None,
    machine_rank=None,
    dist_url=None,
    world_size=None,
    rank=None,
    multiprocessing_distributed=False,
    environ=None,
):
    """Process layout from Detectron2's and the official main_moco.py's flags.

    Official semantics: with ``--multiprocessing-distributed``, ``--world-size`` is the number of
    nodes and ``--rank`` the node rank, one process per GPU of the node; without it,
    ``--world-size`` > 1 means one process per node. ``--num-gpus`` (processes per machine; CPU
    processes where there is no CUDA), ``--num-machines`` and ``--machine-rank`` are Detectron2's
    names and may be combined with them when consistent.
    """
    environ = os.environ if environ is None else environ
    if all(v in environ for v in _TORCHRUN_VARS):
        world = int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_WORLD_SIZE", world))
        if num_gpus not in (None, local) or num_machines not in (None, world // local):
            raise ValueError(
                "started by torchrun (RANK/WORLD_SIZE set): drop --num-gpus / "
                "--num-machines, torchrun decides the processes"
            )
        return LaunchSpec(local, world // local, int(environ.get("GROUP_RANK", 0)), "env://", True)

    ws = world_size if world_size is not None and world_size > 0 else None  # official default -1
    node_rank = rank if rank is not None and rank >= 0 else None
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if multiprocessing_distributed:
        machines, per_machine = ws or 1, num_gpus or (cuda or 1)
    else:
        machines, per_machine = ws or 1, num_gpus or 1
    if num_machines is not None:
        if ws is not None and num_machines != ws:
            raise ValueError(
                f"--num-machines {num_machines} contradicts --world-size {ws} "
                "(the number of nodes); give one of them"
            )
        machines = num_machines
    if machine_rank is not None:
        if node_rank is not None and machine_rank != node_rank:
            raise ValueError(f"--machine-rank {machine_rank} contradicts --rank {node_rank}")
        node_rank = machine_rank
    node_rank = 0 if node_rank is None else node_rank
    if per_machine < 1 or machines < 1:
        raise ValueError(f"--num-gpus ({per_machine}) and --num-machines ({machines}) must be >= 1")
    if not 0 <= node_rank < machines:
        raise ValueError(f"--machine-rank/--rank {node_rank} must be in [0, {machines})")
    if cuda and per_machine > cuda:
        raise ValueError(f"--num-gpus {per_machine} but this machine has {cuda} CUDA devices")
    if machines > 1 and (not dist_url or dist_url == "auto"):
        raise ValueError(
            "--dist-url tcp://HOST:PORT (of machine 0) is needed with several machines"
        )
    return LaunchSpec(per_machine, machines, node_rank, dist_url or "auto", False)


def launch_from_args(args):
    """:func:`resolve_launch` of a command line with the official and Detectron2 process flags
    (tools/pretrain.py, tools/lincls.py), bounded by this machine (:func:`check_local_processes`)."""
    spec = resolve_launch(
        num_gpus=args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        multiprocessing_distributed=args.multiprocessing_distributed,
    )
    check_local_processes(spec)
    return spec


def process_group_timeout(minutes=None, what="DIST.TIMEOUT_MINUTES"):
    """``minutes`` (None: the default of moco/config.py) as the ``timedelta`` of
    ``init_process_group``; one-line ValueError naming ``what`` unless a positive finite number.

    The timeout bounds every collective (gloo honours it; NCCL's watchdog aborts the process) and
    the start-up rendezvous: every machine must join within it.
    """
    if minutes is None:
        from moco.config import get_cfg  # the one place defaults live

        minutes = get_cfg().DIST.TIMEOUT_MINUTES
    try:
        value = float(minutes)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(minutes, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{what} must be a positive number of minutes (fractions allowed), got {minutes!r}"
        )
    if value > MAX_TIMEOUT_MINUTES:
        # timedelta overflows past 1e9 days, and the backends' deadlines (now + timeout, int64
        # nanoseconds) past 292 years; no peer is worth waiting for longer than a year
        raise ValueError(
            f"{what} {minutes!r} is more than a year ({MAX_TIMEOUT_MINUTES} minutes); "
            "give the longest a peer may be silent, in minutes"
        )
    return datetime.timedelta(minutes=value)


def available_cores():
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def check_local_processes(spec, flag="--num-gpus"):
    """One-line ValueError naming ``flag`` when ``spec`` would start more processes on this machine
    than it has CUDA devices (CUDA available) or CPU cores (no CUDA). Checked at launch, not when
    flags are parsed: a layout for other machines may be resolved and mapped to a config here."""
    if spec.from_env or spec.procs_per_machine <= 1:
        return  # torchrun started the processes; one process is always possible
    n = spec.procs_per_machine
    if torch.cuda.is_available():
        devices = torch.cuda.device_count()
        if n > devices:
            raise ValueError(f"{flag} {n}: this machine has {devices} CUDA devices")
        return
    cores = available_cores()
    if n > cores:
        raise ValueError(
            f"{flag} {n}: without CUDA each process is a CPU process, and this machine has "
            f"{cores} cores for this run; give at most {flag} {cores}"
        )


def _init_from_env(timeout):
    """Process group for a torchrun start (NCCL with CUDA, else gloo), as Detectron2's launch."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if cuda else "gloo", init_method="env://", timeout=timeout
    )
    comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    comm.synchronize()


@contextlib.contextmanager
def signals_to_children(received):
    """While Detectron2's launch waits for its worker processes: a SIGTERM or SIGINT of this process
    is passed on to them as SIGTERM (each stops after its step, with a checkpoint; a terminal's
    Ctrl-C reaches them too, and SIGINT twice would mean "stop now")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        received.append(signum)
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch_processes(fn, spec, args, timeout_minutes=None):
    """``fn(*args)`` in every process of ``spec`` (Detectron2's launch, or torchrun's env), with
    :func:`process_group_timeout` of ``timeout_minutes``.

    Returns ``fn``'s result when it runs in this process (one process or torchrun), else None.
    """
    timeout = process_group_timeout(timeout_minutes)
    check_local_processes(spec)
    if spec.from_env:
        _init_from_env(timeout)
        return _close_after(fn, *args)
    if spec.world_size == 1:
        return fn(*args)
    launch(
        functools.partial(_close_after, fn),
        spec.procs_per_machine,
        spec.num_machines,
        spec.machine_rank,
        spec.dist_url,
        args=args,
        timeout=timeout,
    )
    return None


def _close_after(fn, *args):
    """``fn(*args)``, then a barrier and ``destroy_process_group`` once every rank has finished.

    Without it a process can exit while gloo's threads still serve a peer, and the process group's
    destructor aborts it ("terminate called without an active exception", seen in 2-process runs).
    On failure nothing waits: the other ranks are ended by launch or by their broken connection.
    A collective that timed out is re-raised with the ranks that did not answer (:func:`roll_call`).
    """
    try:
        result = fn(*args)
    except RuntimeError as e:  # gloo's timeout names no peer: "Timed out waiting 900ms for recv"
        if not (dist.is_initialized() and _PEER_TIMEOUT.search(str(e))):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"rank {dist.get_rank()}: {first}; {roll_call()}") from e
    if dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()
        _forget_detectron2_groups()
    return result


def _forget_detectron2_groups():
    """Drop the process groups Detectron2's comm keeps after ``destroy_process_group`` (the local
    group and the cached gloo group), so their gloo threads end here. Kept, they ended in
    interpreter finalization, where 2 runs in 192 aborted ("terminate called without an active
    exception", docs/RESULTS.md). Also lets a process create its groups again."""
    comm.create_local_process_group.cache_clear()
    comm._get_global_gloo_group.cache_clear()
    comm._LOCAL_PROCESS_GROUP = None  # no public reset; create_local_process_group asserts None


_ROLL_CALL_KEY = "moco/roll_call/"


# a collective or the store waited for a peer past the timeout (gloo's two messages, the store's,
# NCCL's watchdog); not any "timeout": a peer waiting for this rank would be named silent
_PEER_TIMEOUT = re.compile(
    r"Timed out waiting \d+ms|Application timeout caused pair closure|"
    r"Socket Timeout|collective operation timeout"
)


def roll_call(seconds=10.0):
    """After a collective timed out: which ranks do not answer through the rendezvous store within
    ``seconds`` (the other survivors time out at about the same moment, each having entered the
    same collective, and answer). Returns one clause for the error message.

    The store's own calls ignore its timeout when its host is stopped (set() blocked for good, seen
    with rank 0 under SIGSTOP), so the calls run in a daemon thread that is given up on.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    found = {}

    def ask():
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{_ROLL_CALL_KEY}{rank}", "here")
        deadline = time.monotonic() + seconds
        while True:
            found["silent"] = [
                r for r in range(world) if r != rank and not store.check([f"{_ROLL_CALL_KEY}{r}"])
            ]
            if not found["silent"] or time.monotonic() > deadline:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=ask, daemon=True, name="roll-call")
    thread.start()
    thread.join(seconds + 5)
    silent = found.get("silent")
    if silent is None:
        return (
            "the rendezvous store does not answer either: the process or machine that hosts "
            "it (rank 0's) went silent"
        )
    if not silent:
        return "every rank answered a roll call afterwards (a slow rank, not a lost one)"
    return (
        f"rank{'s' * (len(silent) > 1)} {', '.join(map(str, silent))} of {world} did not "
        f"answer a roll call within {seconds:g} s (hung, stopped or cut off)"
    )


def setup_process(cfg):
    rank = comm.get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name in ("moco", "experiments", "detectron2", "fvcore"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name=name, abbrev_name=name)
    if comm.is_main_process():
        file_io.atomic_write_text(os.path.join(cfg.OUTPUT_DIR, CONFIG_FILE), cfg.dump())
    logger.info("rank %d of %d, config:\n%s", rank, comm.get_world_size(), cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if cfg.SEED >= 0 and torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True  # official --seed


def kernels(device):
    """What computes on ``device``, for a run's record: torch's version and, on CPU, the instruction
    set its kernels dispatch to (AVX2 / AVX512), on CUDA the GPU's name. Runs of the same code and
    seed agree bit for bit only where this agrees (docs/RESULTS.md, "The demo's numbers moved")."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        what = torch.cuda.get_device_name(index)
    else:
        what = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {device.type} {what}"


def resolve_device(name, what="MODEL.DEVICE"):
    """``torch.device`` of ``name`` (auto, cpu, cuda or cuda:N; ``what``: the setting, for errors).

    auto = cuda when available, else cpu; ``cuda`` = this process's current GPU; ``cuda:N`` pins GPU
    N (made current), which is only allowed with one process per machine.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not name.startswith("cuda"):
        raise ValueError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} {name}: CUDA is not available on this machine")
    device = torch.device(name)
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if comm.get_local_size() > 1:
        raise ValueError(
            f"{what}={name} pins one GPU; with several processes per machine use 'auto' or 'cuda'"
        )
    torch.cuda.set_device(device)
    return device
