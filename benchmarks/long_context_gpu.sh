#!/usr/bin/env bash
# Long context and quantized KV caches on the GPU machine (kit from ../shared/gpu; 64 GiB disk:
# run one subcommand per fresh machine, or clear /tmp/internlm2-bench between them).
#   bash benchmarks/long_context_gpu.sh kv-speed     # 7B int4: fp16 vs int8_per_channel KV, 1k-32k
#   bash benchmarks/long_context_gpu.sh kv-builder   # 1.8B int4, int8 KV: ours beside the builder's
#   bash benchmarks/long_context_gpu.sh one-million  # a 7B-1M-shaped model, max_length 1048576
# 7B int4, ours beside the builder, KV fp16/int8/fp8/int4 (SCHEMES="..." picks; one machine,
# these in order):
#   bash benchmarks/long_context_gpu.sh kv-7b-build     # checkpoint, Llama copy, ours + builder
#   bash benchmarks/long_context_gpu.sh kv-7b-trace     # CUPTI trace at 32k; memory probes
#   bash benchmarks/long_context_gpu.sh kv-7b-time      # long_context.py, REPEAT alternating runs
#   bash benchmarks/long_context_gpu.sh kv-7b-capacity  # largest max_length
#   bash benchmarks/long_context_gpu.sh kv-7b-all       # mask_count, build, trace (overlapping
#                                                       # the builder's builds: CPU work), time
# GPTQ's 7B build in the background (CPU work, cores of its own), then its decode beside RTN's:
#   bash benchmarks/long_context_gpu.sh gptq-7b-build   # returns at once; gptq-7b-decode waits
#   bash benchmarks/long_context_gpu.sh gptq-7b-decode
# Where a decode step's time goes with each KV layout (CUPTI kernel trace, 1.8B int4; the 7B's
# GQA group of 4 takes other kernels, see kv-7b-trace):
#   bash benchmarks/long_context_gpu.sh kv-trace
# Scales are a fixed threshold (8 / qmax): random weights, so speed and memory, not quality.
set -euo pipefail
cd "$(dirname "$0")/.."
source /tmp/kit/env.sh
export PYTHONUNBUFFERED=1
W=/tmp/internlm2-bench
mkdir -p "$W"

scales() {  # scales LAYERS FILE [QMAX]: per-channel scales (threshold 8) for 8 KV heads of 128
python3 - "$1" "$2" "${3:-128}" <<'PY'
import json, sys
s = [[8.0 / float(sys.argv[3])] * (8 * 128)] * int(sys.argv[1])
json.dump({"scales": {"k_scales": s, "v_scales": s}}, open(sys.argv[2], "w"))
PY
}

SCHEMES=${SCHEMES:-fp16 int8_per_channel fp8_per_channel int4_per_channel}
qmax() { case $1 in int8*) echo 127 ;; fp8*) echo 448 ;; int4*) echo 7 ;; esac; }
kv_options() {  # kv_options SCHEME: the --extra_options of a quantized KV cache
    [ "$1" = fp16 ] || echo "kv_cache_quant_scheme=$1 kv_cache_scale_file=/tmp/kv-$1.json"
}
dedupe() {  # dedupe FILE...: identical files become hard links of the first
    local first=$1 f; shift
    for f in "$@"; do
        if [ "$f" -ef "$first" ]; then continue; fi
        if cmp -s "$first" "$f"; then ln -f "$first" "$f"; fi
    done
}
builder_best() {  # the builder at its best: CUDA graph on (its default is off)
python3 - "$1" <<'PY'
import json, sys
path = sys.argv[1] + "/genai_config.json"
genai = json.load(open(path))
for options in genai["model"]["decoder"]["session_options"]["provider_options"]:
    options.get("cuda", {})["enable_cuda_graph"] = "1"
json.dump(genai, open(path, "w"), indent=4)
PY
}
timed() {  # timed NAME COMMAND...: wall seconds (and peak RSS where GNU time is installed)
    local name=$1; shift
    if [ -x /usr/bin/time ]; then /usr/bin/time -f "$name: %e s, peak %M kB" "$@"
    else local t0=$SECONDS; "$@"; local rc=$?; echo "$name: $((SECONDS - t0)) s"; return $rc; fi
}
GPU_CORES="" CPU_CORES=""  # the timings on cores 0-3, the GPTQ build beside them on 4-15
if command -v taskset > /dev/null; then GPU_CORES="taskset -c 0-3" CPU_CORES="taskset -c 4-15"; fi
folders() {  # folders: TOOL:SCHEME=FOLDER for each 7B build that exists
    local s tool
    for s in $SCHEMES; do
        for tool in ours builder; do
            if [ -f $W/$tool-$s/genai_config.json ]; then echo "$tool:$s=$W/$tool-$s"; fi
        done
    done
}
CK=$W/7b-1m  # 7B shapes, InternLM2.5-7B-Chat-1M's rotary settings
checkpoint_1m() {  # writes $CK once
    [ -f $CK/config.json ] || python3 -m internlm2_graph.synthetic $CK --size 7b --set \
        max_position_embeddings=262144 'rope_scaling={"type": "dynamic", "factor": 2.5}' \
        rope_theta=50000000
}
OURS_MAX=4194304  # ours: max_length past max_position_embeddings x factor (dynamic NTK)

builder_lanes() {  # the builder's 7B builds, two lanes at once (each one scheme after another)
    python3 -c "from fixtures.llama_layout import write_llama_copy as w; from pathlib import Path as P; w(P('$CK'), P('$CK-llama'))"
    lane() {
        for s in "$@"; do
            timed "builder $s" env HF_HUB_OFFLINE=1 $CPU_CORES python3 -m \
                onnxruntime_genai.models.builder -i $CK-llama -o $W/builder-$s -p int4 -e cuda \
                -c $W/cache-$s $( [ $s = fp16 ] || echo --extra_options $(kv_options $s) ) \
                > $W/builder-$s.log 2>&1 && builder_best $W/builder-$s || echo "builder $s FAILED"
            tail -1 $W/builder-$s.log
            rm -rf $W/cache-$s
            dedupe $W/builder-fp16/model.onnx.data $W/builder-*/model.onnx.data
        done
    }
    local half=$(( ($(echo $SCHEMES | wc -w) + 1) / 2 ))
    lane $(echo $SCHEMES | cut -d' ' -f1-$half) &
    lane $(echo $SCHEMES | cut -d' ' -f$((half + 1))- -s) &
    wait
    rm -rf $CK-llama
}
build_ours() {  # ours, one scheme after another (the weights are the same: hard links)
    for s in $SCHEMES; do
        timed "ours $s" python3 -m internlm2_graph -i $CK -o $W/ours-$s -p int4 -e cuda -q \
            --overwrite --extra_options max_length=$OURS_MAX $(kv_options $s) || echo "ours $s FAILED"
        dedupe $W/ours-fp16/model.onnx.data $W/ours-*/model.onnx.data
    done
}
trace_7b() {  # CUPTI kernel trace of our 7B folders at 32k (int4 KV left out: not XQA's)
    local traced="" s
    for s in $SCHEMES; do [ $s = int4_per_channel ] || traced="$traced $s=$W/ours-$s"; done
    $GPU_CORES python3 -m benchmarks.kernel_profile $traced --prompt 32768 --gen 32 --top 12 \
        --machine h200-7b-int4-kv-32768
}
probes_7b() {  # the GPU memory each cache takes at the last length that loads, why the next fails
    local s
    for s in fp16 int8_per_channel fp8_per_channel; do
        [ -d $W/ours-$s ] || continue
        local lengths=1179648,1245184
        [ $s = fp16 ] && lengths=1048576,1114112
        python3 -m benchmarks.long_context --capacity $s=$W/ours-$s --probe $lengths
    done
}
prepare_7b() {  # the checkpoint and the scale files every 7B build reads
    local s
    checkpoint_1m
    for s in $SCHEMES; do [ $s = fp16 ] || scales 32 /tmp/kv-$s.json $(qmax $s); done
}
time_7b() {  # --buffer: the builder's own max_length (262144), as its genai_config sets it
    $GPU_CORES python3 -m benchmarks.long_context $(folders) --contexts 4096,32768,131072 \
        --gen 64 --repeat ${REPEAT:-4} --buffer 262144 --machine h200-7b-int4-r${REPEAT:-4}
}

case "${1:-}" in
kv-speed)
    [ -d $W/synthetic-7b ] || python3 -m internlm2_graph.synthetic $W/synthetic-7b --size 7b
    scales 32 /tmp/kv8.json
    python3 -m internlm2_graph -i $W/synthetic-7b -o $W/7b-int4 -p int4 -e cuda -q --overwrite \
        --extra_options max_length=32768
    python3 -m internlm2_graph -i $W/synthetic-7b -o $W/7b-int4-kv8 -p int4 -e cuda -q \
        --overwrite --extra_options max_length=32768 kv_cache_quant_scheme=int8_per_channel \
        kv_cache_scale_file=/tmp/kv8.json
    python3 -m benchmarks.runtime fp16kv=$W/7b-int4 int8kv=$W/7b-int4-kv8 --ep cuda \
        --prompts 1024,8192,32000 --gen 64 --repeat 3 --machine h200-7b-int4-kvcache --bandwidth 4800
    ;;
kv-builder)
    scales 24 /tmp/kv8-18.json
    kv="kv_cache_quant_scheme=int8_per_channel kv_cache_scale_file=/tmp/kv8-18.json"
    python3 -m benchmarks.export --sizes 1.8b --precisions int4 --ep cuda --keep --workdir $W \
        --machine h200-1.8b-int4-kv8 --repeat 1 --extra-options $kv
    builder=$W/1.8b-int4-cuda-builder
    # The builder at its best: CUDA graph on (its default is off), and the whole context allowed.
python3 - "$builder" <<'PY'
import json, sys
path = sys.argv[1] + "/genai_config.json"
genai = json.load(open(path))
for options in genai["model"]["decoder"]["session_options"]["provider_options"]:
    options.get("cuda", {})["enable_cuda_graph"] = "1"
genai["search"]["max_length"] = 32768
json.dump(genai, open(path, "w"), indent=4)
PY
    python3 -m internlm2_graph -i $W/1.8b-internlm2 -o $W/ours-kv8 -p int4 -e cuda -q \
        --overwrite --extra_options max_length=32768 $kv
    python3 -m internlm2_graph -i $W/1.8b-internlm2 -o $W/ours-fp16kv -p int4 -e cuda -q \
        --overwrite --extra_options max_length=32768
    python3 -m benchmarks.runtime ours_kv8=$W/ours-kv8 builder_kv8_graph=$builder \
        ours_fp16kv=$W/ours-fp16kv --ep cuda --prompts 1024,8192,30000 --gen 64 --repeat 3 \
        --machine h200-1.8b-int4-kv8 --bandwidth 4800
    ;;
one-million)  # InternLM2.5-7B-Chat-1M's rotary settings on 7B shapes, int8 KV for 1M tokens
    checkpoint_1m
    scales 32 /tmp/kv8.json
    python3 -m internlm2_graph -i $W/7b-1m -o $W/7b-1m-int4-kv8 -p int4 -e cuda -q --overwrite \
        --extra_options max_length=1048576 kv_cache_quant_scheme=int8_per_channel \
        kv_cache_scale_file=/tmp/kv8.json
    python3 -m internlm2_graph inspect $W/7b-1m --context 1048576 | tail -3
python3 - "$W/7b-1m-int4-kv8" <<'PY'
import json, subprocess, sys, time
import numpy as np
import onnxruntime_genai as og
folder = sys.argv[1]
genai = json.load(open(folder + "/genai_config.json"))
print("context_length", genai["model"]["context_length"], "max_length", genai["search"]["max_length"])
model = og.Model(folder)
for length in (1024, 131072):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=1048576, do_sample=False, min_length=length + 64)
    generator = og.Generator(model, params)
    ids = np.random.default_rng(0).integers(3, 90000, (1, length)).astype(np.int32)
    start = time.perf_counter()
    generator.append_tokens(ids)
    prompt_done = time.perf_counter()
    for _ in range(64):
        generator.generate_next_token()
    end = time.perf_counter()
    print(f"prompt {length}: prefill {length / (prompt_done - start):.0f} tok/s, decode "
          f"{64 / (end - prompt_done):.1f} tok/s (KV buffer for 1048576 tokens)")
    query = ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"]
    print(subprocess.run(query, capture_output=True, text=True).stdout.strip())
    del generator
PY
    ;;
kv-trace)
    [ -f $W/1.8b/config.json ] || python3 -m internlm2_graph.synthetic $W/1.8b --size 1.8b
    traced=""
    for s in $SCHEMES; do
        kv=""
        if [ $s != fp16 ]; then
            scales 24 /tmp/kv18-$s.json $(qmax $s)
            kv="kv_cache_quant_scheme=$s kv_cache_scale_file=/tmp/kv18-$s.json"
        fi
        python3 -m internlm2_graph -i $W/1.8b -o $W/trace-$s -p int4 -e cuda -q --overwrite \
            --extra_options max_length=32768 $kv
        traced="$traced $s=$W/trace-$s"
    done
    for p in 1024 30000; do
        python3 -m benchmarks.kernel_profile $traced --prompt $p --gen 32 --top 12 \
            --machine h200-1.8b-int4-kv-$p
    done
    ;;
kv-7b-build)
    df -h /tmp | tail -1
    prepare_7b
    builder_lanes &
    build_ours
    wait
    du -sh $W/* | sort -h | tail; df -h /tmp | tail -1
    ;;
kv-7b-trace)
    trace_7b
    probes_7b
    ;;
kv-7b-time)
    time_7b
    ;;
kv-7b-all)  # the builder builds on CPU cores while our folders are built, then traced
    df -h /tmp | tail -1
    $GPU_CORES python3 -m benchmarks.mask_count --machine h200  # seconds, on an idle machine
    prepare_7b
    builder_lanes &
    build_ours
    trace_7b
    wait  # nothing else on the GPU while the timings run
    time_7b
    # A step with buffers for 1,048,576 tokens (the 7B-1M's context), after a 1k prompt.
    $GPU_CORES python3 -m benchmarks.long_context ours:int8_per_channel=$W/ours-int8_per_channel \
        --contexts 1024 --gen 64 --repeat 2 --buffer 1048576 --machine h200-7b-1m-int8
    df -h /tmp | tail -1
    ;;
kv-7b-capacity)
    $GPU_CORES python3 -m benchmarks.long_context --capacity $(folders) --contexts 131072 \
        --step 65536 --machine h200-7b-int4-capacity
    ;;
gptq-7b-build)
    # It outlives this call (setsid); gptq-7b-decode waits for it.
    setsid nohup bash -c "t0=\$(date +%s); $CPU_CORES python3 -m internlm2_graph -i $CK \
        -o $W/ours-gptq -p int4 -e cuda --overwrite --extra_options max_length=$OURS_MAX \
        algo_config=gptq; echo \"gptq build: rc \$?, \$((\$(date +%s) - t0)) s\"" \
        > $W/gptq.log 2>&1 < /dev/null &
    echo $! > $W/gptq.pid
    ;;
gptq-7b-decode)
    while kill -0 "$(cat $W/gptq.pid)" 2> /dev/null; do sleep 5; done
    tr '\r' '\n' < $W/gptq.log | grep -E "layer|gptq build" | tail -40
    python3 -m benchmarks.runtime rtn=$W/ours-fp16 gptq=$W/ours-gptq --ep cuda \
        --prompts 1024,8192 --gen 128 --repeat 3 --machine h200-7b-int4-gptq --bandwidth 4800
    ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/*h200-*kv* benchmarks/results/*h200-7b-int4* "$OUT"/ 2>/dev/null || true
    cp benchmarks/results/kernels-h200-*-int4-kv-* benchmarks/results/mask-count-* "$OUT"/ \
        2>/dev/null || true
fi
