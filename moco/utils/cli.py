"""The command-line error helper of every tool: expected errors become one line and exit code 2,
work that ran and failed (:class:`RunFailed`) one line and exit code 1.

Kept free of heavy imports (torch, Detectron2), so a tool that needs neither starts fast.
"""

import os
import shlex
import sys
import traceback

INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


class RunFailed(RuntimeError):
    """Work that ran and failed for a reason its message names, with the log to read (a stage of a
    sweep, a submitted job): not bad input (exit 2) and not a bug in the tool (a traceback), so one
    line and exit code 1."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM / SIGINT at a step boundary (moco.engine.hooks.SignalStop); the message
    names the checkpoint and how to resume. Exit code 128 + the signal's number, as a shell's.

    A KeyboardInterrupt, so Detectron2's training loop does not log it as a failure.
    """

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def run_cli(prog, fn, errors=(), rewrite=None):
    """Call ``fn()`` and return the exit code: ``fn``'s (0 when it returns None). Every tool runs
    through it (``sys.exit(main())``).

    Bad input (INPUT_ERRORS and the tool's ``errors``) becomes one line ``prog: error: ...`` on
    stderr (``rewrite``: maps the message, e.g. to flag names) and exit code 2; a
    :class:`RunFailed` the same line and exit code 1. Errors raised inside
    processes started by ``launch`` arrive as a traceback text; its last line (``ValueError: ...``)
    is reported the same way, and a worker that died (a signal, an exit code) as torch's one line
    (``process 1 terminated with signal SIGABRT``) and exit code 1. Ctrl-C is 130
    (:class:`Interrupted`: its one line and 128 + signal); anything else prints its traceback and
    is 1.
    """
    try:
        code = fn()
    except INPUT_ERRORS + tuple(errors) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {rewrite(msg) if rewrite else msg}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"{prog}: {str(e) or 'interrupted'}", file=sys.stderr)  # a bare Ctrl-C has no text
        return getattr(e, "exit_code", 130)
    except Exception as e:
        if not _raised_in_worker(e):
            traceback.print_exc()
            return 1
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "a worker process failed"
        print(f"{prog}: error: {last}", file=sys.stderr)
        names = tuple(t.__name__ for t in INPUT_ERRORS) + ("UnsafeCheckpointError",)
        return 2 if last.split(":", 1)[0].split(".")[-1] in names else 1
    return 0 if code is None else code


def resume_command(script, argv, resume=("--resume", "auto")):
    """The command line that continues a run: this interpreter, ``script``, ``resume`` (the flag
    and its value, if it takes one) and ``argv`` without any ``--resume`` given; the interpreter
    relative to the current folder when inside it, as a user would type it.

    ``resume`` comes first: after trailing ``KEY VALUE`` overrides (train_net's argparse
    REMAINDER) it would be read as one more override ("Override list has odd length")."""
    args, rest = [], list(argv)
    while rest:
        a = rest.pop(0)
        if a == "--resume" and len(resume) > 1 and rest:
            rest.pop(0)  # its value
        elif a != "--resume" and not a.startswith("--resume="):
            args.append(a)
    python = sys.executable
    if python.startswith(os.getcwd() + os.sep):
        python = os.path.relpath(python)
    return shlex.join([python, script, *resume, *args])


def _raised_in_worker(e):
    """A worker process of ``launch`` (torch.multiprocessing) raised or died; only then is torch
    loaded."""
    mp = sys.modules.get("torch.multiprocessing")
    return mp is not None and isinstance(e, (mp.ProcessRaisedException, mp.ProcessExitedException))
