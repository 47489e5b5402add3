#!/usr/bin/env bash
# One command for a lent GPU (an H200 lent for 15 minutes): at most TOTAL seconds (540, 9 minutes) from
# its start, every figure written under OUT as it is measured, so that a run cut short still returns
# what it measured:
#
#   bash bench/gpu.sh [OUT]
#
#  (i)   python -m bench.levers: a profile of one replayed step (kernel time by kind and the gaps) and the
#        ms per step of each lever of issue 20, alone and together, each with its same-math check
#        (OUT/levers.jsonl, OUT/profile.json); at most LEVERS_S (150 s);
#  (ii)  the acceptance check, python -m pytest -m gpu tests (the CUDA tests, then tests/acceptance, whose
#        runs go side by side): a PASS/FAIL table with each check's seconds, OUT/gpu_check.json; at most
#        CHECK_S (240 s), and never into (iii)'s time; about 2 minutes expected on an H200;
#  (iii) python -m bench.end_to_end: the recipe's EPOCHS (100) epochs on synthetic full-size data with the
#        fastest same-math settings that (i) measured, from process start to exit, compile included
#        (OUT/end_to_end.json); stopped gracefully after E2E_S (200 s), or less if less is left;
#  (iv)  if PACKING_MIN_S (60 s) or more is left: python -m bench.packing with K = 1, 2, 4 runs on the GPU
#        (under CUDA MPS too if 240 s are left), OUT/packing.json after every K.
# Everything printed also goes to OUT/gpu_check.log. Exits 1 if a check of (ii) failed.
#
# The CPU mode (DEVICE=cpu, or no CUDA): the same steps at tiny sizes, as the suite runs it
# (tests/test_gpu_acceptance_on_cpu.py). PYTHON (python3) runs every step; pytorch-ignite and
# tensorboardX come from wheels in .whl/ if the machine lacks them. (i) caches compiled code in
# TORCHINDUCTOR_CACHE_DIR (default: the work folder); (iii) runs the application, which keeps its own in
# its output folder (app/compiling.py), empty at the start: its figure includes the compile.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu-check}}
PYTHON=${PYTHON:-python3}
STARTED=$(date +%s)
WORK=$(mktemp -d)
mkdir -p "$OUT"
if ! "$PYTHON" -c "import ignite, tensorboardX" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
DEVICE=${DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
if [ "$DEVICE" = cuda ]; then
  TOTAL=${TOTAL:-540} LEVERS_S=${LEVERS_S:-150} CHECK_S=${CHECK_S:-240} E2E_S=${E2E_S:-200}
  EPOCHS=${EPOCHS:-100} PACKING_MIN_S=${PACKING_MIN_S:-60}
  CHECKS=tests CHECK_ARGS=() E2E_ARGS=() PACKING_ARGS=(--devices 0 --ks 1,2,4 --epochs 3)
else  # tiny sizes: 4 iterations of batch 8 per epoch; the budgets only stop a run that hangs
  TOTAL=${TOTAL:-1800} LEVERS_S=${LEVERS_S:-300} CHECK_S=${CHECK_S:-900} E2E_S=${E2E_S:-300}
  EPOCHS=${EPOCHS:-1} PACKING_MIN_S=${PACKING_MIN_S:-60}
  CHECKS=tests/acceptance  # the other gpu tests would only be skipped here, after collecting the whole suite
  CHECK_ARGS=(--acceptance-n-train 32 --acceptance-n-test 8 --acceptance-epochs 2 --acceptance-batch-size 8
              --acceptance-workers 2)
  E2E_ARGS=(--n-train 32 --n-test 8 --batch-size 8)
  PACKING_ARGS=(--devices cpu --ks 1 --epochs 1 --n-train 32 --n-test 8 --batch-size 8)
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/compile-cache}

left() { echo $(( TOTAL - ($(date +%s) - STARTED) )); }
smaller() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
step_start() { STEP_STARTED=$(date +%s); echo "== $1 (budget $2 s, $(left) s left of $TOTAL)"; }
step_end() { echo "== $1 done: exit $2 after $(( $(date +%s) - STEP_STARTED )) s"; }
{
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  "$PYTHON" -c "import sys, torch, ignite, tensorboardX; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'ignite', ignite.__version__, 'tensorboardX', tensorboardX.__version__)"

  budget=$(smaller "$LEVERS_S" "$(( $(left) - E2E_S - 60 ))")
  step_start "(i) levers: python -m bench.levers" "$budget"
  timeout -k 10 "$budget" "$PYTHON" -m bench.levers "$OUT" --device "$DEVICE" --work "$WORK/levers" \
    --budget "$(( budget - 20 ))"
  step_end "(i)" $?

  budget=$(smaller "$CHECK_S" "$(( $(left) - E2E_S ))")
  step_start "(ii) acceptance: python -m pytest -m gpu $CHECKS" "$budget"
  # SIGINT: pytest stops at the check in progress and still writes its table and gpu_check.json
  timeout -s INT -k 30 "$budget" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu "$CHECKS" --acceptance-out "$OUT" \
    --acceptance-device "$DEVICE" --basetemp "$WORK/check" "${CHECK_ARGS[@]}"
  rc=$?
  echo "$rc" > "$WORK/check_rc"
  step_end "(ii)" "$rc"
  rm -rf "$WORK/check"

  limit=$(smaller "$E2E_S" "$(( $(left) - 15 ))")
  step_start "(iii) end to end: python -m bench.end_to_end, $EPOCHS epochs" "$limit"
  "$PYTHON" -m bench.end_to_end "$OUT" --work "$WORK/e2e" --levers "$OUT/levers.jsonl" --device "$DEVICE" \
    --epochs "$EPOCHS" --limit "$(( limit > 30 ? limit - 10 : 20 ))" "${E2E_ARGS[@]}"
  step_end "(iii)" $?

  budget=$(( $(left) - 5 ))
  if [ "$budget" -ge "$PACKING_MIN_S" ]; then
    mps=(); if [ "$DEVICE" = cuda ] && [ "$budget" -ge 240 ]; then mps=(--mps); fi
    step_start "(iv) runs packed onto one device: python -m bench.packing" "$budget"
    mkdir -p "$WORK/packing"
    [ -d "$WORK/e2e/data" ] && ln -s "$WORK/e2e/data" "$WORK/packing/data"
    timeout -k 10 "$budget" "$PYTHON" -m bench.packing "$WORK/packing" --report "$OUT/packing.json" \
      "${PACKING_ARGS[@]}" "${mps[@]}"
    step_end "(iv)" $?
  else
    echo "== (iv) packing skipped: $budget s left, $PACKING_MIN_S needed"
  fi
  echo "== all steps: $(( $(date +%s) - STARTED )) s"
  "$PYTHON" -m bench.gpu_summary "$OUT"
} 2>&1 | tee "$OUT/gpu_check.log"
rc=$(cat "$WORK/check_rc" 2>/dev/null || echo 1)
rm -rf "$WORK"
exit "$rc"
