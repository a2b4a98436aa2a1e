#!/usr/bin/env bash
# The README's first command: set up (or reuse) .venv, then run the main job on the embedded data:
# MoCo v2 + supervised pretraining, conversion, detection fine-tuning from MoCo / supervised /
# random init, and the AP report. Arguments go to tools/pipeline.py (e.g. --preset FILE, KEY VALUE).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python tools/pipeline.py "$@"
