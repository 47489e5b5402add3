#!/usr/bin/env bash
# The GPU check, one command on a bare GPU machine that has python3 with torch and torchvision:
#
#   bash bench/gpu.sh [OUT_DIR]
#
# pytorch-ignite and tensorboardX come from wheels in .whl/ if the machine lacks them. It runs
# `python -m bench` on CUDA, writes a synthetic full-size CIFAR-100 (50,000 + 10,000 images) in the
# real format, and trains the recipe on it with the real application (EPOCHS epochs, 100 by default,
# stopped after LIMIT seconds), so the log has epoch times, images/s, the bf16 peak share and, when
# it finishes in time, the end-to-end time of the recipe. Settings: EPOCHS, LIMIT, N_TRAIN, N_TEST,
# DEVICE (cuda; cpu only to try the script), COMPILE_EPOCHS (also train that many epochs with
# torch.compile; 0 = skip).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-check}}
EPOCHS=${EPOCHS:-100} LIMIT=${LIMIT:-260} N_TRAIN=${N_TRAIN:-50000} N_TEST=${N_TEST:-10000}
DEVICE=${DEVICE:-cuda} COMPILE_EPOCHS=${COMPILE_EPOCHS:-0}
WORK=$(mktemp -d)
mkdir -p "$OUT"
if ! python3 -c "import ignite, tensorboardX" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  python3 -c "import sys, torch, ignite, tensorboardX; print('python', sys.version.split()[0], 'torch', torch.__version__, 'ignite', ignite.__version__, 'tensorboardX', tensorboardX.__version__)"
  echo "== CUDA checks: augmentation matches the CPU, graph replay matches eager steps"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py tests/test_augment.py -k cuda 2>&1 | tail -15
  echo "== python -m bench --device $DEVICE"
  timeout 200 python3 -m bench --device "$DEVICE" ${BENCH_ARGS:-}
  echo "== synthetic data"
  python3 -m bench.synthetic "$WORK/data" --train "$N_TRAIN" --test "$N_TEST"
  python3 - "$WORK" "$DEVICE" <<'PY'
import json, sys
from app.config import Config, override, to_dict
work, device = sys.argv[1], sys.argv[2]
base = {"data.root": f"{work}/data", "data.download": False, "train.device": device,
        "logging.output_dir": f"{work}/runs", "logging.log_every_iters": 100}
for name, extra in (("recipe", {}), ("compiled", {"train.compile": True})):
    json.dump(to_dict(override(Config(), {**base, **extra})), open(f"{work}/{name}.json", "w"), indent=2)
PY
  echo "== recipe: $EPOCHS epochs (limit ${LIMIT}s)"
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
} 2>&1 | tee "$OUT/gpu_check.log"
