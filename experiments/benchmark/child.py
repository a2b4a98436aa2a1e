"""Start-up rows' measurement: a fresh Python process, from its start to its first batch."""

import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def time_child_start(code, spec, what, env=None):
    """(wall s, CPU s) of ``python -c code spec`` until it prints "first batch" (the CPU time is
    the whole child's). This copy of the code comes first on PYTHONPATH; ``env`` adds variables.
    A child that fails raises RuntimeError naming ``what`` with the end of its stderr."""
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile("w+") as err:  # a file: a chatty child cannot fill a pipe
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", code, spec],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            text=True,
        )
        line = proc.stdout.readline()
        wall = time.perf_counter() - start
        proc.communicate()
        if proc.returncode or not line.startswith("first batch"):
            err.seek(0)
            raise RuntimeError(f"{what} row failed ({proc.returncode}): {err.read()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
