#!/usr/bin/env bash
# Issue 12 on the GPU machine: `roadcascade bench gpu` on q75 / native / 1920x1080 / 4032x3024 payloads (the sized
# sets are made there from the native photos), with decode-only ceilings; or the GPU tests (`tests`).
# Run from a folder holding src/, tests/, stage1/ (the quickstart stage-1 bundle with "squares": 1 in bundle.json:
# with its own 3 square views the tier is not one model on one resized tensor, so it gets no GPU engine and the
# bench would time its CPU code), pay/{q75,native} (from
# `python -m roadcascade.bench.gpurun payloads --out pay`) and optionally nv09.tgz (nvImageCodec 0.9 + libnvjpeg,
# stripped: nvidia/nvimgcodec/{__init__.py, the cp312 module, libnvimgcodec.so.0, extensions/libnvjpeg_ext,
# extensions/libjpeg_turbo_ext}, nvidia/cu13/lib/libnvjpeg.so.13). Writes under $OUT.
#   bash scripts/issue12_gpu.sh bench [bench gpu options...]
#   bash scripts/issue12_gpu.sh tests [pytest options...]
set -o pipefail
what=${1:-bench}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -f nv09.tgz ]; then
  mkdir -p /tmp/site && tar xzf nv09.tgz -C /tmp/site
  export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
if [ "$what" = tests ]; then
  ROADCASCADE_GPU_BUNDLE=$PWD/stage1 ROADCASCADE_GPU_IMAGES=$PWD/pay/q75 \
    python3 -m pytest -q -p no:cacheprovider -s tests/test_gpu.py tests/test_procdecode.py "$@" 2>&1 | tee "$OUT/tests.log"
else
  python3 -m roadcascade.bench.gpurun bench --bundle stage1 --images pay/q75 --native pay/native --json "$OUT/bench.json" \
    "$@" 2>&1 | tee "$OUT/bench.log"
fi
