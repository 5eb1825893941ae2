#!/usr/bin/env bash
# Long context and quantized KV caches on the GPU machine (kit from ../shared/gpu; 64 GiB disk:
# run one subcommand per fresh machine, or clear /tmp/internlm2-bench between them).
#   bash benchmarks/long_context_gpu.sh kv-speed     # 7B int4: fp16 vs int8_per_channel KV, 1k-32k
#   bash benchmarks/long_context_gpu.sh kv-builder   # 1.8B int4, int8 KV: ours beside the builder's
#   bash benchmarks/long_context_gpu.sh one-million  # a 7B-1M-shaped model, max_length 1048576
# Scales are a fixed threshold (8 / qmax): random weights, so speed and memory, not quality.
set -euo pipefail
cd "$(dirname "$0")/.."
source /tmp/kit/env.sh
export PYTHONUNBUFFERED=1
W=/tmp/internlm2-bench
mkdir -p "$W"

scales() {  # scales LAYERS FILE: int8 per-channel scales for 8 KV heads of 128
python3 - "$1" "$2" <<'PY'
import json, sys
s = [[8.0 / 128] * (8 * 128)] * int(sys.argv[1])
json.dump({"scales": {"k_scales": s, "v_scales": s}}, open(sys.argv[2], "w"))
PY
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
    python3 -m internlm2_graph.synthetic $W/7b-1m --size 7b --set max_position_embeddings=262144 \
        'rope_scaling={"type": "dynamic", "factor": 2.5}' rope_theta=50000000
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
*)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*h200-*kv* "$OUT"/ 2>/dev/null || true; fi
