#!/usr/bin/env bash
# Calibrated int4 on the GPU machine (kit from ../shared/gpu; 64 GiB disk):
#   bash benchmarks/calibrated_gpu.sh checkpoint-7b  # the synthetic 7B (15.5 GB), if missing
#   bash benchmarks/calibrated_gpu.sh gptq-7b        # GPTQ and RTN CUDA builds of it, KL to float
#   bash benchmarks/calibrated_gpu.sh gptaq-7b       # the GPTAQ CUDA build of it, KL to float
#   bash benchmarks/calibrated_gpu.sh profile-7b     # where a GPTAQ layer's time goes (2 layers)
# A CUDA build's GPTQ runs its products (layer forwards, Gram matrices, their inverses, the lazy
# updates) on the GPU through onnxruntime (internlm2_graph/calibration/compute.py); the rest is numpy on
# the machine's cores. Each build's progress: /tmp/internlm2-bench/calibrated-7b-*-cuda.log.
set -euo pipefail
cd "$(dirname "$0")/.."
source /tmp/kit/env.sh
export PYTHONUNBUFFERED=1
W=/tmp/internlm2-bench
mkdir -p "$W"

case "${1:-}" in
checkpoint-7b)
    python3 -c "from pathlib import Path; from benchmarks.calibrated_synthetic import \
synthetic_checkpoint as s; print(s(Path('$W'), '7b'))"
    ;;
gptq-7b)
    nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m benchmarks.calibrated_synthetic --size 7b --ep cuda --methods gptq,rtn \
        --workdir $W --machine h200
    tr '\r' '\n' < $W/calibrated-7b-gptq-32-sym-cuda.log | grep -E "layer|lm_head" | tail -40
    ;;
gptaq-7b)
    nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m benchmarks.calibrated_synthetic --size 7b --ep cuda --methods gptaq \
        --workdir $W --machine h200-gptaq
    tr '\r' '\n' < $W/calibrated-7b-gptaq-32-sym-cuda.log | grep -E "layer|lm_head" | tail -40
    ;;
profile-7b)
    python3 -m benchmarks.calibrate_profile --size 7b --layers 2 --algorithm gptaq --ep cuda \
        --workdir $W
    ;;
*)
    sed -n '2,6p' "$0"
    exit 2
    ;;
esac
if [ -n "${OUT:-}" ]; then cp benchmarks/results/calibrated-7b-h200* "$OUT"/ 2>/dev/null || true; fi
