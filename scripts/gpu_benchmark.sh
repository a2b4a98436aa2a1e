#!/usr/bin/env bash
# MoCo pretraining throughput on one GPU (ResNet-50, 224 px, batch 256) plus a Detectron2 R50-C4
# fine-tuning iteration at the paper's VOC settings; results (JSON, logs) under $OUT.
#
#   bash scripts/gpu_benchmark.sh --prepare   here, once (needs this repo's .venv and the package
#                                             registry): fills .gpu_carry/ (git-ignored) with what
#                                             the GPU machine lacks
#   bash scripts/gpu_benchmark.sh             on the GPU machine, from the repo root, with
#                                             .gpu_carry carried along (device tool: carry
#                                             [".gpu_carry"]); about 7 minutes
#   bash scripts/gpu_benchmark.sh --dry-run   the same steps at tiny sizes on this machine's CPU
#
# The GPU machine has torch/torchvision/OpenCV but no Detectron2 and no network. Detectron2 here
# is pure Python (no _C; ROIAlign/NMS come from torchvision), so --prepare copies it and its
# pure-Python dependencies from .venv into .gpu_carry/site (put on PYTHONPATH there) and downloads
# the two compiled/extra wheels that must match the GPU machine's CPython 3.12 (pycocotools) or are
# not installed anywhere here (lightly, for the lightly row) into .gpu_carry/wheels, which the run
# installs into /tmp with pip --no-index. Without .gpu_carry the MoCo rows still run and the
# Detectron2 / lightly rows say "not installed".
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CARRY=.gpu_carry
MODE=${1:-run}

prepare() {
  local site=.venv/lib/python3.11/site-packages
  [ -d "$site/detectron2" ] || { echo "gpu_benchmark: --prepare needs .venv with detectron2 (scripts/setup_env.sh)" >&2; exit 2; }
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  rm -rf "$CARRY" && mkdir -p "$CARRY/site" "$CARRY/wheels"
  # pure-Python packages Detectron2 imports that the GPU image lacks (it has numpy, PIL, yaml,
  # tabulate, cloudpickle, portalocker, tqdm, matplotlib, packaging, tensorboard, opencv)
  for pkg in detectron2 fvcore iopath yacs omegaconf hydra antlr4 termcolor; do
    cp -r "$site/$pkg" "$CARRY/site/"
  done
  find "$CARRY/site" -name '__pycache__' -prune -exec rm -rf {} + -o -name '_C*.so' -exec rm -f {} +
  local pycoco
  pycoco=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('pycocotools'))")
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" "pycocotools==$pycoco"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/wheels" lightly==1.6.0
  du -sh "$CARRY"
  ls "$CARRY/wheels"
}

if [ "$MODE" = "--prepare" ]; then
  prepare
  exit 0
fi

if [ "$MODE" = "--dry-run" ]; then
  PY=${PYTHON:-.venv/bin/python}
  OUT=${OUT:-/tmp/gpu_benchmark_dry}
  DEVICE=cpu
  # tiny: ResNet-18, 32 px, batch 16, one repetition; the C4 config shrunk (R18 trunk, 64 px)
  BENCH=(--arch resnet18 --image-size 32 --batch-size 16 --K 256 --workers 2 --reps 1 --steps 1
         --warmup 1 --data-batches 1 --threads 1)
  DET=(--det-ims-per-batch 2 --det-iters 1 --det-opts MODEL.RESNETS.DEPTH 18
       MODEL.RESNETS.RES2_OUT_CHANNELS 64 "INPUT.MIN_SIZE_TRAIN" "(64,)" INPUT.MAX_SIZE_TRAIN 96
       MODEL.RPN.POST_NMS_TOPK_TRAIN 50 MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 16)
  DET_BIG=("${DET[@]}")
  DATA_ARGS=(--cls-size 96 --cls-train-per-class 4)
  LIMIT=600
  DET_LIMIT=300
elif [ "$MODE" = "run" ]; then
  PY=${PYTHON:-python3}
  OUT=${OUT:-output/gpu_benchmark}
  DEVICE=cuda
  # 12 loader workers on the 16-core machine (the main process and the pin thread need cores);
  # 3 interleaved repetitions of every group keep the whole run near 7 minutes
  BENCH=(--arch resnet50 --image-size 224 --batch-size 256 --workers 12 --reps 3 --steps 5
         --warmup 2 --data-batches 12)
  # paper: 16 images per iteration over 8 GPUs = 2 per GPU; also the whole 16 on this one GPU
  DET=(--det-ims-per-batch 2 --det-iters 8)
  DET_BIG=(--det-ims-per-batch 16 --det-iters 3)
  # ImageNet-like JPEGs (the embedded default is 64 px): 384 px, 600 training images
  DATA_ARGS=(--cls-size 384 --cls-train-per-class 60)
  LIMIT=300  # whole script: 60 + 300 + 2 x 60 s at most, under 8 minutes
  DET_LIMIT=60
else
  echo "usage: $0 [--prepare | --dry-run]" >&2
  exit 2
fi

mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ -d "$CARRY/site" ]; then
  export PYTHONPATH="$PYTHONPATH:$ROOT/$CARRY/site"
fi
if compgen -G "$CARRY/wheels/*.whl" > /dev/null && [ "$MODE" = "run" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_benchmark_site "$CARRY"/wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_benchmark_site"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import importlib, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
for name in ("detectron2", "lightly", "pycocotools", "cv2"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "ok"))
    except Exception as e:  # report, the rows say what is missing
        print(name, "missing:", e)
EOF
} 2>&1 | tee "$OUT/environment.txt"

WORK=${TMPDIR:-/tmp}/moco_gpu_benchmark
set -o pipefail
timeout 60 "$PY" tools/make_data.py --root "$WORK/synthetic" "${DATA_ARGS[@]}" --cls-val-per-class 1 \
  --det-trainval 2 --det-test 2 --workers "$(nproc)" 2>&1 | tee "$OUT/make_data.log"

status=0
timeout "$LIMIT" "$PY" tools/benchmark.py --device "$DEVICE" "${BENCH[@]}" --data "$WORK/synthetic" \
  --rows model,momentum,data,e2e --output "$OUT/moco_benchmark.json" 2>&1 | tee "$OUT/moco_benchmark.log" || status=$?

C4=configs/detection/pascal_voc_R_50_C4_24k_moco.yaml
timeout "$DET_LIMIT" "$PY" tools/benchmark.py --device "$DEVICE" --rows none \
  --detection-config "$C4" \
  "${DET[@]}" --output "$OUT/detectron2_c4.json" 2>&1 | tee "$OUT/detectron2_c4.log" || status=$?
if [ "$MODE" = "run" ]; then
  timeout "$DET_LIMIT" "$PY" tools/benchmark.py --device "$DEVICE" --rows none \
    --detection-config "$C4" \
    "${DET_BIG[@]}" --output "$OUT/detectron2_c4_16.json" 2>&1 | tee "$OUT/detectron2_c4_16.log" || status=$?
fi

echo "== summary ($MODE, exit status of the last failing step: $status) =="
grep -h -A 20 "^group " "$OUT/moco_benchmark.log" || true
grep -h "^detectron2" "$OUT"/detectron2_c4*.log || true
exit "$status"
