#!/usr/bin/env bash
# The CUDA numbers on a GPU machine with only this repo (and torch for the bandwidth and the
# kernel trace): export side by side, prompt/decode tok/s alternating, kernel breakdown.
#     bash benchmarks/gpu.sh 7b int4 [NAME] [K=V ...]   # results in benchmarks/results/*NAME*
# K=V options build one more folder of ours ("variant") from the same checkpoint, measured
# beside the other two. With $OUT set (the device tool), new result files are copied there.
set -euo pipefail
size=${1:-7b} precision=${2:-int4} name=${3:-h100-${1:-7b}-${2:-int4}}
shift $(($# < 3 ? $# : 3))
work=${WORKDIR:-/tmp/internlm2-bench}
python -m benchmarks.export --sizes "$size" --precisions "$precision" --ep cuda --keep \
    --workdir "$work" --machine "$name"
models=("ours=$work/$size-$precision-cuda-ours" "builder=$work/$size-$precision-cuda-builder")
if [ $# -gt 0 ]; then
    variant="$work/$size-$precision-cuda-variant"
    rm -rf "$variant"
    python -m internlm2_graph -i "$work/$size-internlm2" -o "$variant" -p "$precision" -e cuda \
        --quiet --extra_options "$@"
    models+=("variant=$variant")
fi
python -m benchmarks.runtime "${models[@]}" --ep cuda --prompts 128,1024 --gen 128 --repeat 5 \
    --machine "$name"
python -m benchmarks.kernel_profile "${models[@]}" --prompt 128 --gen 64 --machine "$name"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*"$name"* "$OUT"/; fi
