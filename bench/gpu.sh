#!/usr/bin/env bash
# The GPU acceptance check, one command on a bare GPU machine that has python3 with torch, torchvision,
# pytest and tensorboard:
#
#   bash bench/gpu.sh [OUT_DIR]
#
# pytorch-ignite and tensorboardX come from wheels in .whl/ if the machine lacks them. Then:
#  1. python -m pytest -m gpu tests: does everything a user does work here? (the CUDA-graph and CUDA
#     augmentation tests, then tests/acceptance: learning graphed and eager, kill and resume, evaluate
#     on GPU and CPU, predict, checkpoints across devices, TensorBoard); a PASS/FAIL table and
#     OUT_DIR/gpu_check.json; about 3-4 minutes on one H200;
#  2. python -m bench on CUDA: augmentation, Ignite vs a plain loop, epoch time, share of bf16 peak;
#  3. the recipe on synthetic full-size data (50,000 + 10,000 images) with the real application, EPOCHS
#     epochs (100 by default), stopped after LIMIT seconds: end-to-end time from process start;
#  4. python -m bench.packing: `python -m app sweep` on GPU 0 with K = 1, 2, 4 runs at once (and under
#     CUDA MPS where it can be started): total training images/s and the K to use; OUT_DIR/packing.json.
# Exits 1 if any check of step 1 failed. Settings: EPOCHS, LIMIT, CHECK_EPOCHS (epochs of step 1's
# runs, 4), BENCH (0 skips step 2), COMPILE_EPOCHS (also train that many epochs with torch.compile),
# PACKING (0 skips step 4).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-check}}
EPOCHS=${EPOCHS:-100} LIMIT=${LIMIT:-150} CHECK_EPOCHS=${CHECK_EPOCHS:-4} BENCH=${BENCH:-1}
COMPILE_EPOCHS=${COMPILE_EPOCHS:-0} PACKING=${PACKING:-1}
WORK=$(mktemp -d)
mkdir -p "$OUT"
if ! python3 -c "import ignite, tensorboardX" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site"
fi
export PYTHONUNBUFFERED=1  # run from the project folder: python -m app and bench are found there
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  python3 -c "import sys, torch, ignite, tensorboardX; print('python', sys.version.split()[0], 'torch', torch.__version__, 'ignite', ignite.__version__, 'tensorboardX', tensorboardX.__version__)"
  echo "== 1. acceptance checks: python -m pytest -m gpu tests"
  python3 -m pytest -q -p no:cacheprovider -m gpu tests --acceptance-out "$OUT" \
    --acceptance-epochs "$CHECK_EPOCHS" --basetemp "$WORK/check"
  echo $? > "$WORK/check_rc"
  rm -rf "$WORK/check"
  if [ "$BENCH" != 0 ]; then
    echo "== 2. python -m bench --device cuda"
    timeout 200 python3 -m bench --device cuda ${BENCH_ARGS:-}
  fi
  echo "== 3. recipe: $EPOCHS epochs on synthetic full-size data (limit ${LIMIT}s)"
  python3 -m bench.synthetic "$WORK/data" --train 50000 --test 10000
  python3 - "$WORK" <<'PY'
import json, sys
from app.config import Config, override, to_dict
work = sys.argv[1]
base = {"data.root": f"{work}/data", "data.download": False, "train.device": "cuda",
        "logging.output_dir": f"{work}/runs", "logging.log_every_iters": 100}
for name, extra in (("recipe", {}), ("compiled", {"train.compile": True})):
    json.dump(to_dict(override(Config(), {**base, **extra})), open(f"{work}/{name}.json", "w"), indent=2)
PY
  start=$(date +%s.%N)
  timeout "$LIMIT" python3 -m app --config "$WORK/recipe.json" --run-name recipe --epochs "$EPOCHS"
  echo "exit $? after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s (process start to exit)"
  cp "$WORK/runs/recipe/results.json" "$OUT/results_recipe.json" 2>/dev/null
  if [ "$COMPILE_EPOCHS" -gt 0 ]; then
    echo "== torch.compile: $COMPILE_EPOCHS epochs"
    start=$(date +%s.%N)
    timeout 240 python3 -m app --config "$WORK/compiled.json" --run-name compiled --epochs "$COMPILE_EPOCHS"
    echo "exit $? after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s (process start to exit)"
    cp "$WORK/runs/compiled/results.json" "$OUT/results_compiled.json" 2>/dev/null
  fi
  if [ "$PACKING" != 0 ]; then
    echo "== 4. runs packed onto GPU 0: python -m bench.packing"
    mkdir -p "$WORK/packing" && ln -s "$WORK/data" "$WORK/packing/data"
    timeout 420 python3 -m bench.packing "$WORK/packing" --devices 0 --ks 1,2,4 --epochs 3 --mps
    cp "$WORK/packing/packing.json" "$OUT/packing.json" 2>/dev/null
  fi
} 2>&1 | tee "$OUT/gpu_check.log"
rc=$(cat "$WORK/check_rc" 2>/dev/null || echo 1)
rm -rf "$WORK"
exit "$rc"
