#!/usr/bin/env bash
# Creates or reuses .venv at the repository root and installs everything the toolkit needs:
# torch/torchvision, Detectron2 (scripts/install_detectron2.sh) and moco-det (editable, with tests).
# A stamp keyed on the install inputs makes a second run return within seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.moco-det-installed"
KEY=$(cat "$ROOT/setup.py" "$ROOT/constraints.txt" "$ROOT/scripts/setup_env.sh" \
          "$ROOT/scripts/install_detectron2.sh" | sha256sum | cut -d' ' -f1)

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
  exit 0
fi
start=$(date +%s)
# pip on some machines warns about every missing local index folder; keep the log readable.
pip_install() { "$PY" -m pip install -q -c "$ROOT/constraints.txt" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if [ ! -x "$PY" ]; then
  BASE_PY=${PYTHON:-python3}
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "moco-det needs Python >= 3.10; '$BASE_PY' is $("$BASE_PY" --version 2>&1). Set PYTHON=/path/to/python3.10+" >&2; exit 1; }
  echo "[setup] creating $VENV"
  "$BASE_PY" -m venv "$VENV"
fi
echo "[setup] installing torch and torchvision"
pip_install torch torchvision
PYTHON="$PY" bash "$ROOT/scripts/install_detectron2.sh"
echo "[setup] installing moco-det (editable, with the test extra)"
pip_install -e "$ROOT[test]"
# The LVIS and Cityscapes loaders / evaluators (issue 26's task formats). --no-deps: lvis asks for
# opencv-python, which would overwrite opencv-python-headless's cv2, and cityscapesscripts for the
# Python 2 `typing` backport and its GUI / downloader packages; what they import is here already.
echo "[setup] installing lvis and cityscapesscripts (no dependencies; constraints.txt pins them)"
pip_install --no-deps lvis cityscapesscripts pyquaternion
echo "$KEY" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start ))s"
