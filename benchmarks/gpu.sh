#!/usr/bin/env bash
# The CUDA numbers on a GPU machine with only this repo (and torch for the bandwidth and the
# kernel trace): export side by side, decode/prompt tok/s alternating, kernel breakdown.
#     bash benchmarks/gpu.sh 7b int4 [NAME]      # results in benchmarks/results/*-NAME*
# With $OUT set (the device tool), the new result files are copied there too.
set -euo pipefail
size=${1:-7b} precision=${2:-int4} name=${3:-h100-$1-$2}
work=${WORKDIR:-/tmp/internlm2-bench}
python -m benchmarks.export --sizes "$size" --precisions "$precision" --ep cuda --keep \
    --workdir "$work" --machine "$name"
models=("ours=$work/$size-$precision-cuda-ours" "builder=$work/$size-$precision-cuda-builder")
python -m benchmarks.runtime "${models[@]}" --ep cuda --prompts 128,1024 --gen 128 --repeat 5 \
    --machine "$name"
python -m benchmarks.kernel_profile "${models[@]}" --prompt 128 --gen 64 --machine "$name"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*"$name"* "$OUT"/; fi
