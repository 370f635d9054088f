#!/usr/bin/env bash
# Every wheel profiling/gpu_check.sh needs on a bare torch + triton machine (the lent GPU machine:
# CPython 3.12, manylinux x86_64, no package registry), written to .whl/ (ignored by git), to be
# carried there: gpu_check.sh installs them into /tmp/site before its first stage.
#
#   bash profiling/gpu_wheels.sh [--python-version 3.12] [--no-decord]
#   bash profiling/gpu_wheels.sh --list           # the wheels it writes, NAME==VERSION, one a line
#   bash profiling/gpu_wheels.sh --machine-has    # what the lent machine already has (not carried)
#
# What the check imports that the lent machine lacks (tests/test_gpu_check.py derives the needed
# distributions from the imports of hvfm/, kernels/, profiling/ and tests/ and their Requires-Dist,
# and checks this list covers them):
#   deepspeed   the trainer's engine (bench_train, bench_zero, tests_sync, the step check). It
#               publishes only a source archive: its wheel is built here, pure Python, ops JIT-built
#               where they run. Needs hjson and pydantic (+ its pinned core, annotated-types,
#               typing-inspection, typing-extensions >= 4.14.1: carried in case the machine's is older)
#               beside what the machine has (einops, msgpack, ninja, numpy, packaging, psutil,
#               py-cpuinfo, tqdm).
#   av          PyAV: the built-in corpus and bench_data's clips are ENCODED with it; also a decoder
#   decord      the faster decoder (optional: the loader falls back to PyAV). --no-decord drops it.
#   webdataset, braceexpand   the shard loader (hvfm.data.loading.shards, prepare)
# Versions: those of requirements-cpu.txt (the CPU machine's tested set), the rest pinned here.
# Measured on 2026-12-06: 54.3 MB (51.8 MiB) in all, 11 wheels, av 35.8 MB and decord 13.6 MB of it; the
# limit this script enforces is 60 MiB (a call carries 64 MiB with the ~1.2 MB working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=60
WHEELS=(deepspeed==0.19.8 hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
        typing-inspection==0.4.2 typing-extensions==4.16.0 av==18.1.0 decord==0.6.0 webdataset==1.0.2
        braceexpand==0.1.7)
# the lent machine's packages that the check uses (/work/.library/device/KINDS.md, "Python
# packages already there", read 2026-11-17; torch 2.11 and triton 3.6 there)
MACHINE_HAS=(torch triton numpy pytest transformers tokenizers huggingface-hub safetensors pillow
             matplotlib ninja msgpack psutil py-cpuinfo einops tqdm packaging pyyaml nvidia-ml-py
             regex typer filelock fsspec requests)
PYV=3.12
DECORD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --list) for w in "${WHEELS[@]}"; do echo "$w"; done; exit 0 ;;
    --machine-has) for w in "${MACHINE_HAS[@]}"; do echo "$w"; done; exit 0 ;;
    --python-version) PYV="$2"; shift ;;
    --no-decord) DECORD=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python3}"
DEST=.whl
rm -rf "$DEST"  # one version of each: two of one name stop the whole install there
mkdir -p "$DEST"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
binary=()
for w in "${WHEELS[@]}"; do
  case "$w" in
    deepspeed==*) ;;
    decord==*) [ "$DECORD" = 1 ] && binary+=("$w") ;;
    *) binary+=("$w") ;;
  esac
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${plat[@]}" -d "$DEST" "${binary[@]}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ds=$(printf '%s\n' "${WHEELS[@]}" | grep '^deepspeed==')
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$ds"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-*.tar.gz
ls -l "$DEST"
bytes=$(cat "$DEST"/*.whl | wc -c)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "$(ls "$DEST"/*.whl | wc -l) wheels, ${mib} MiB (limit ${LIMIT_MIB} MiB)"
if [ "$bytes" -gt $(( LIMIT_MIB * 1048576 )) ]; then
  echo "gpu_wheels.sh: ${mib} MiB is over ${LIMIT_MIB} MiB; try --no-decord (PyAV decodes too)" >&2
  exit 1
fi
echo "carry .whl (device tool: carry [\".whl\"]); gpu_check.sh installs it into /tmp/site"
