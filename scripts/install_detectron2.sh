#!/usr/bin/env bash
# Installs Detectron2 into the active Python environment (the toolkit needs only its Python code).
# Order: already importable -> upstream source install (short timeout) -> registry wheel fallback.
# MOCO_DET_D2_INSTALL=upstream|registry forces one path.
set -euo pipefail
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONSTRAINTS="$HERE/../constraints.txt"
FORCE=${MOCO_DET_D2_INSTALL:-}
quiet_pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
D2_WHEEL=sal_detectron2-0.7.2
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561
D2_REQS=(fvcore iopath pycocotools "omegaconf>=2.1,<2.4" hydra-core yacs tabulate termcolor
         cloudpickle matplotlib tqdm tensorboard packaging "setuptools<81")

if [ -z "$FORCE" ] && "$PY" -c "import detectron2" 2>/dev/null; then
  echo "[detectron2] already importable: $("$PY" -c 'import detectron2,os;print(os.path.dirname(detectron2.__file__))')"
  exit 0
fi

install_upstream() {
  local url=https://github.com/facebookresearch/detectron2.git
  echo "[detectron2] trying the upstream source install"
  # A short reachability check first, so that an offline machine falls back within seconds.
  timeout 15 git ls-remote --heads "$url" >/dev/null 2>&1 || { echo "[detectron2] upstream unreachable"; return 1; }
  timeout "${MOCO_DET_D2_UPSTREAM_TIMEOUT:-1200}" "$PY" -m pip install -q --no-build-isolation \
    -c "$CONSTRAINTS" "git+$url"
}

install_registry() {
  echo "[detectron2] installing the registry wheel ${D2_WHEEL} (pure-Python package, no _C)"
  local tmp; tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  quiet_pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$tmp" "sal-detectron2==0.7.2"
  local whl; whl=$(ls "$tmp"/${D2_WHEEL}-*.whl)
  echo "${D2_SHA256}  ${whl}" | sha256sum -c --quiet - || {
    echo "[detectron2] sha256 mismatch for $(basename "$whl"): refusing to install it" >&2; return 1; }
  local site; site=$("$PY" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  "$PY" - "$whl" "$site" <<'PYEOF'
import sys, zipfile
whl, site = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith("detectron2/")
             and not n.split("/")[-1].startswith("_C")]
    z.extractall(site, members=names)
print(f"[detectron2] copied {len(names)} files of detectron2/ into {site}")
PYEOF
  quiet_pip install -q -c "$CONSTRAINTS" "${D2_REQS[@]}"
}

case "$FORCE" in
  upstream) install_upstream ;;
  registry) install_registry ;;
  "") install_upstream || { echo "[detectron2] upstream install failed; using the registry fallback"; install_registry; } ;;
  *) echo "MOCO_DET_D2_INSTALL must be 'upstream' or 'registry', got '$FORCE'" >&2; exit 2 ;;
esac
"$PY" -c "import detectron2, detectron2.modeling; print('[detectron2] ready:', detectron2.__version__)"
