#!/usr/bin/env bash
# Wheels for the lent GPU machine, which has torch and triton but no deepspeed, no video decoder
# and no package registry (see the device README): written to .whl/ (ignored by git), to be
# carried there; profiling/gpu_check.sh installs them into /tmp/site when it finds them.
#
#   bash profiling/gpu_wheels.sh [--python-version 3.12]
#
# deepspeed publishes only a source archive: its wheel is built here (pure Python, ops JIT-built
# where they run). Its other needs there (einops, msgpack, ninja, numpy, packaging, psutil,
# py-cpuinfo, tqdm) are already installed; pydantic (with its pinned core), hjson, decord and
# webdataset are not. About 19 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=3.12
[ "${1:-}" = "--python-version" ] && PYV="$2"
PY="${PYTHON:-python3}"
DEST=.whl
mkdir -p "$DEST"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
pin() { grep -i "^$1==" requirements-cpu.txt | head -n 1; }
"$PY" -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
  -d "$DEST" pydantic hjson
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${plat[@]}" -d "$DEST" "$(pin decord)" "$(pin webdataset)" braceexpand
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$(pin deepspeed)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp"/deepspeed-*.tar.gz
rm -rf "$tmp"
ls -l "$DEST"
echo "carry .whl (device tool: carry [\".whl\"]); gpu_check.sh installs it into /tmp/site"
