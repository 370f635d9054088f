#!/usr/bin/env bash
# One command for a GPU machine: tests on CUDA, kernel benchmarks, training throughput (fused vs
# unfused), ZeRO memory, decode rate and the epoch projection, all written under one folder, in
# under 10 minutes (every stage runs under `timeout`, within a total budget).
#
#   bash profiling/gpu_check.sh [--dry-run] [--budget SECONDS] [--all-tests] [--out DIR]
#
# Results: $OUT if set, else --out, else profiling/results/<gpu-name>-<date>/ ; one log per stage
# under logs/, and gpu_check.md (each stage: ok / failed / timed out / skipped, and why).
# Works on a bare machine with torch + triton. Wheels in .whl/ (`bash profiling/gpu_wheels.sh` on a
# machine with the registry, then carry .whl) are installed into /tmp/site first. Without them: a
# missing pytest skips the test stages; a missing deepspeed skips tests_sync, bench_train (it
# drives the trainer) and bench_zero; missing decord and av skip bench_train (the trainer's loader)
# and bench_data (project_epoch then uses the committed results); missing matplotlib skips the
# PNGs. --dry-run prints the stages and their commands and runs nothing (works anywhere).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=580
ALL_TESTS=0
DEST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --all-tests) ALL_TESTS=1 ;;
    --out) DEST="$2"; shift ;;
    --out=*) DEST="${1#*=}" ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python}"
START=$(date +%s)
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HVFM_CACHE="${HVFM_CACHE:-/tmp/hvfm-cache}"           # synthetic corpus: not in the results
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/hvfm-torch-extensions}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if [ -z "$GPU" ]; then
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
fi
SLUG=$(printf '%s' "${GPU:-no-gpu}" | sed -e 's/^NVIDIA //' -e 's/[^A-Za-z0-9._-]\{1,\}/-/g')
RES="${OUT:-${DEST:-profiling/results/${SLUG}-$(date +%Y%m%d-%H%M)}}"

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check.sh: '$PY' cannot import torch (set PYTHON=/path/to/python)" >&2
  exit 2
fi
if [ -z "$GPU" ] && [ "$DRY" = 0 ]; then
  echo "gpu_check.sh: no CUDA GPU here (nvidia-smi and torch see none); use --dry-run to see the stages" >&2
  exit 2
fi

# carried wheels (profiling/gpu_wheels.sh): installed beside the machine's own packages
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "gpu_check.sh: the wheels in .whl/ did not install; going on without them" >&2
  fi
fi

# which optional modules are installed (found, not imported: one quick python start)
read -r -a missing <<< "$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pytest', 'deepspeed', 'decord', 'av', 'matplotlib', 'transformers', 'pynvml')
               if u.find_spec(m) is None))" 2>/dev/null)"
lacks() { [[ " ${missing[*]:-} " == *" $1 "* ]]; }
HAVE_PYTEST=1; lacks pytest && HAVE_PYTEST=0
HAVE_DS=1; lacks deepspeed && HAVE_DS=0
HAVE_DECODER=0; { ! lacks decord || ! lacks av; } && HAVE_DECODER=1

if [ "$DRY" = 0 ]; then
  mkdir -p "$RES/logs"
  SUMMARY="$RES/gpu_check.md"
  {
    echo "# gpu_check on ${GPU}"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); budget ${BUDGET} s"
    echo "python modules missing: ${missing[*]:-none}"
    echo
    echo "| stage | status | seconds | log |"
    echo "|---|---|---|---|"
  } > "$SUMMARY"
else
  echo "gpu_check.sh --dry-run: GPU '${GPU:-none}', results would go to $RES, budget ${BUDGET} s"
  echo "python modules missing here: ${missing[*]:-none}"
fi

record() {  # stage status seconds [log]
  if [ "$DRY" = 0 ]; then
    echo "| $1 | $2 | $3 | ${4:--} |" >> "$SUMMARY"
  fi
  echo "[$1] $2 (${3} s)"
}

skip() {  # stage reason
  if [ "$DRY" = 1 ]; then echo "[$1] would be skipped: $2"; return; fi
  record "$1" "skipped: $2" 0
}

stage() {  # name limit command...
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 5 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$DRY" = 1 ]; then
    echo "[$name] timeout ${limit}s: $*"
    return 0
  fi
  if [ "$limit" -lt 10 ]; then
    record "$name" "skipped: out of time (budget ${BUDGET} s)" 0
    return 0
  fi
  echo "== $name (up to ${limit} s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$RES/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  tail -n 8 "$RES/logs/$name.log" | sed "s/^/  $name| /"
  record "$name" "$status" $(( $(date +%s) - t0 )) "logs/$name.log"
}

stage env 20 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no cuda\")'"

KERNEL_TESTS="tests/test_kernels_attention.py tests/test_kernels_patch_embed.py tests/test_model_triton.py"
if [ "$HAVE_PYTEST" = 1 ]; then
  stage tests_kernels 90 "$PY" -m pytest -q $KERNEL_TESTS
  ignore=""
  for f in $KERNEL_TESTS; do ignore="$ignore --ignore=$f"; done
  marker=(-m "not slow")
  [ "$ALL_TESTS" = 1 ] && marker=()
  stage tests_rest 60 "$PY" -m pytest -q -x "${marker[@]}" $ignore tests
  if [ "$HAVE_DS" = 1 ]; then  # one whole training step under torch.cuda.set_sync_debug_mode("error")
    stage tests_sync 40 "$PY" -m pytest -q tests/test_train_step.py -k sync
  else
    skip tests_sync "deepspeed is not installed (bash profiling/gpu_wheels.sh, carry .whl)"
  fi
else
  skip tests_kernels "pytest is not installed (pip install pytest)"
  skip tests_rest "pytest is not installed (pip install pytest)"
  skip tests_sync "pytest is not installed (pip install pytest)"
fi

stage bench_kernels 40 "$PY" profiling/bench_kernels.py --out "$RES"
if [ "$HAVE_DS" = 1 ] && [ "$HAVE_DECODER" = 1 ]; then
  # the trainer's set-up, loader and step on the built-in corpus (generated once, ~10 s)
  stage bench_train 130 "$PY" profiling/bench_train.py --gpu-defaults --drop 0 0.5 0.9 0.1:0.5 \
    --steps 5 --warmup 2 --out "$RES"
else
  skip bench_train "it drives the trainer: needs deepspeed and decord or av (bash profiling/gpu_wheels.sh, carry .whl)"
fi
if [ "$HAVE_DS" = 1 ]; then
  stage bench_zero 120 "$PY" profiling/bench_zero.py --out "$RES"
else
  skip bench_zero "deepspeed is not installed (bash profiling/gpu_wheels.sh, carry .whl)"
fi
if [ "$HAVE_DECODER" = 1 ]; then
  # 640x360 clips of 10-30 s, generated once (4 here, to fit the budget): one file per clip
  # against tar shards
  stage bench_data 60 "$PY" profiling/bench_data.py --gen-clips 4 --copies 4 --clips 16 \
    --workers 1 2 4 --frames 8 --size 224 --out "$RES/bench_data.json"
else
  skip bench_data "neither decord nor av is installed; project_epoch uses profiling/results/bench_data.json"
fi
stage project_epoch 20 "$PY" profiling/project_epoch.py --results "$RES"

if [ "$DRY" = 0 ]; then
  echo
  cat "$SUMMARY"
  echo "results in $RES ($(( $(date +%s) - START )) s)"
fi
