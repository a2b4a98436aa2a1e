"""Every tool answers --help before importing torch or Detectron2 (they take seconds to load), and
its usage line carries the tool's file name, the prefix of its errors."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

TOOLS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "tools")) if f.endswith(".py"))

_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "detectron2", "matplotlib") if m in sys.modules)
print("HEAVY:", ",".join(heavy))
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_help_loads_no_heavy_library(tool):
    path = os.path.join(REPO, "tools", f"{tool}.py")
    env = {**os.environ, "PYTHONPATH": REPO}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, path],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: {tool}.py"), r.stdout[:200]
    assert r.stdout.rstrip().endswith("HEAVY:"), r.stdout[-300:]
