#!/usr/bin/env bash
# og.Engine on paged folders, on the GPU machine (kit from ../shared/gpu/pack.sh; a 7B takes
# ~45 GB of /tmp: checkpoint, Llama copy, three folders).
#   bash benchmarks/paged_gpu.sh check            # paged graph vs reference vs GQA, og.Engine greedy
#   bash benchmarks/paged_gpu.sh prepare 7b int4 [fp16]  # returns at once: builds in the background
#       (setsid, so it outlives the call): checkpoint, our paged and GQA folders, the builder's
#       paged folder (same weights, through the Llama copy) and a copy of it with its CUDA graph on
#   bash benchmarks/paged_gpu.sh load 7b int4 [engine_load args]   # waits for prepare, then
#       og.Engine closed loop + mixed traffic, ours / builder / builder + CUDA graph, and our
#       GQA folder's single-stream og.Generator decode
#   bash benchmarks/paged_gpu.sh clean 7b         # frees the disk for the next size
# Both tools' folders get the same pool: max_batch_size=128 num_blocks=$NUM_BLOCKS (400).
set -euo pipefail
cd "$(dirname "$0")/.."
source /tmp/kit/env.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
W=${WORKDIR:-/tmp/internlm2-bench}
mkdir -p "$W"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/ .*//' \
    | tr '[:upper:]' '[:lower:]')
POOL="max_batch_size=128 num_blocks=${NUM_BLOCKS:-400}"
copy_out() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/; fi; }

cuda_graph_copy() {  # cuda_graph_copy SRC DST: SRC's files linked, its CUDA graph switched on
python3 - "$1" "$2" <<'PY'
import json, os, sys
src, dst = sys.argv[1:]
os.makedirs(dst, exist_ok=True)
for name in os.listdir(src):
    if name != "genai_config.json" and not os.path.exists(f"{dst}/{name}"):
        os.symlink(f"{src}/{name}", f"{dst}/{name}")
genai = json.load(open(f"{src}/genai_config.json"))
for options in genai["model"]["decoder"]["session_options"]["provider_options"]:
    options.setdefault("cuda", {})["enable_cuda_graph"] = "1"
json.dump(genai, open(f"{dst}/genai_config.json", "w"), indent=4)
PY
}

timed() {  # timed LABEL COMMAND...
    local label=$1 t0; shift
    t0=$(date +%s)
    if "$@"; then echo "$label: $(( $(date +%s) - t0 )) s"; else echo "$label: FAILED"; fi
}

prepare_now() {  # prepare_now SIZE PRECISION...: one checkpoint, each precision's folders
    local size=$1 ck=$W/$1-internlm2 p
    shift
    [ -f "$ck/config.json" ] || timed "checkpoint $size" python3 -m internlm2_graph.synthetic \
        "$ck" --size "$size"
    (
        [ -f "$ck-llama/config.json" ] || timed "llama copy" python3 -c "from pathlib import Path
from fixtures.llama_layout import write_llama_copy
write_llama_copy(Path('$ck'), Path('$ck-llama'))"
        for p in "$@"; do
            timed "builder $size $p paged" python3 -m onnxruntime_genai.models.builder \
                -i "$ck-llama" -o "$W/$size-$p-builder" -p "$p" -e cuda -c "$W/cache-$size-$p" \
                --extra_options use_paged_attention=true $POOL > "$W/$size-$p-builder.log" 2>&1
            tail -3 "$W/$size-$p-builder.log"
            rm -rf "$W/cache-$size-$p"
            cuda_graph_copy "$W/$size-$p-builder" "$W/$size-$p-builder-cg"
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

wait_ready() {  # wait_ready SIZE PRECISION: until prepare is done (at most 9 minutes)
    local i
    for i in $(seq 540); do
        [ -f "$W/$1-$2.ready" ] && break
        sleep 1
    done
    cat "$W"/prepare-"$1"-*.log || true
    [ -f "$W/$1-$2.ready" ]
}

case "${1:-}" in
check)
    python3 -m benchmarks.paged_gpu --workdir "$W/check" --machine "$GPU"
    copy_out benchmarks/results/paged-check-"$GPU".*
    ;;
prepare)  # prepare SIZE PRECISION...
    size=$2
    shift 2
    # From a copy: the device tool replaces the carried tree at the next call, which took
    # `python -m internlm2_graph` away from a build still running (seen: the GQA build failed).
    rm -rf "$W/src" && cp -r . "$W/src"
    setsid nohup bash "$W/src/benchmarks/paged_gpu.sh" prepare-now "$size" "$@" \
        > "$W/prepare-$size-$1.log" 2>&1 < /dev/null &
    echo "preparing $size $* in the background: $W/prepare-$size-$1.log"
    ;;
prepare-now)
    shift
    prepare_now "$@"
    ;;
clean)  # clean SIZE: its checkpoint, Llama copy and folders (the disk holds one 7B at a time)
    rm -rf "$W/$2"-*
    ;;
load)
    size=$2 p=$3
    shift 3
    wait_ready "$size" "$p"
    python3 -m benchmarks.engine_load ours="$W/$size-$p-ours" builder="$W/$size-$p-builder" \
        builder_cg="$W/$size-$p-builder-cg" --generator ours_gqa="$W/$size-$p-gqa" \
        --machine "$GPU-$size-$p" "$@"
    copy_out benchmarks/results/engine-load-"$GPU-$size-$p".*
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
