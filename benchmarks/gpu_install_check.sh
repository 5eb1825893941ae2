#!/usr/bin/env bash
# The README's "On an NVIDIA GPU" steps on a synthetic checkpoint, on a GPU machine that has the
# build dependencies preinstalled and onnxruntime-gpu + onnxruntime-genai-cuda from the kit
# (../shared/gpu/pack.sh, then stage.sh on the machine). From the repository root:
#     bash benchmarks/gpu_install_check.sh        # about a minute; WORKDIR=/tmp/gpu-install-check
# Prints the versions it ran with and what each command printed; exits non-zero when a build or
# a chat fails. verify compares with the fp32 numpy reference of the unquantized checkpoint:
# fp16 should say OK at --tolerance 0.05 (0.0075 on CPU); int4's random-weight logits are off by
# ~1, so it says MISMATCH by design, and its exit is only shown.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f /tmp/kit/env.sh ]; then source /tmp/kit/env.sh; fi
py=${PYTHON:-python3}
ep=${EP:-cuda}  # EP=cpu runs the same steps on a CPU machine (fp16 runs there too)
work=${WORKDIR:-/tmp/gpu-install-check}
rm -rf "$work" && mkdir -p "$work"
failed=0

step() {  # step TITLE COMMAND...: run it, show its output and exit status
    echo "=== $1"
    shift
    "$@"
    local status=$?
    echo "--- exit $status"
    return $status
}

step "versions" "$py" - <<'PY'
import importlib.metadata as md, platform
names = ["numpy", "ml_dtypes", "onnx", "onnx-ir", "onnxscript", "safetensors", "huggingface_hub",
         "tokenizers", "sentencepiece", "protobuf", "onnxruntime", "onnxruntime-gpu",
         "onnxruntime-genai", "onnxruntime-genai-cuda"]
found = {}
for name in names:
    try:
        found[name] = md.version(name)
    except md.PackageNotFoundError:
        pass
print("python", platform.python_version(), found)
import onnxruntime, onnxruntime_genai as og
print("providers", onnxruntime.get_available_providers(), "og cuda:", og.is_cuda_available())
PY
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null

# Heads of 64 (as benchmarks/cuda_parity.py): CUDA attention kernels want head sizes like real ones.
step "synthetic checkpoint" "$py" -m internlm2_graph.synthetic "$work/ckpt" --size tiny --set \
    hidden_size=256 num_attention_heads=4 num_key_value_heads=2 intermediate_size=512 \
    num_hidden_layers=3 max_position_embeddings=2048 || failed=1

for precision in int4 fp16; do
    out="$work/$precision-$ep"
    step "build $precision $ep" "$py" -m internlm2_graph -i "$work/ckpt" -o "$out" \
        -p "$precision" -e "$ep" || failed=1
    step "chat --prompt ($precision)" "$py" -m internlm2_graph chat "$out" \
        --prompt "Hello, who are you?" --max-new-tokens 24 || failed=1
    # Three turns from stdin: the second and third continue from the KV cache (rewind + append).
    step "chat, 3 turns on stdin ($precision)" "$py" -m internlm2_graph chat "$out" \
        --max-new-tokens 16 --system "Be brief." \
        <<< $'Hello\nTell me about rivers.\nAnd lakes?' || failed=1
    step "verify $precision" "$py" -m internlm2_graph verify "$out" --against "$work/ckpt" \
        --tolerance 0.05
done

# Whether this runtime can rewind a CUDA-graph generator (chat re-encodes the conversation when
# it cannot), and whether turns continued from the cache decode like the conversation encoded
# afresh (exact on fp32; fp16 may differ in a late token, its batched and one-token kernels round
# differently).
step "KV cache reuse (fp16)" "$py" - "$work/fp16-$ep" <<'PY'
import sys

from internlm2_graph import chat as chat_module
from internlm2_graph.chat import Chat

folder, turns = sys.argv[1], ["Hello there, how are you?", "Tell me about rivers.", "And lakes?"]
conversation = Chat(folder, search={"do_sample": False}, max_new_tokens=8)
cached = [conversation.reply(turns[0])]
try:
    conversation._generator.rewind_to(len(conversation._cached))  # what the next turn does
    print("rewind_to after a reply: works")
except Exception as err:
    print("rewind_to after a reply fails, so chat re-encodes each turn:", err)
cached += [conversation.reply(text) for text in turns[1:]]
chat_module._common_prefix = lambda cached, prompt: 0  # never reuse: encode it all each turn
fresh_conversation = Chat(folder, search={"do_sample": False}, max_new_tokens=8)
fresh = [fresh_conversation.reply(text) for text in turns]
print("replies from the cache equal a fresh encode:", cached == fresh)
print("cached:", cached)
print("fresh: ", fresh)
PY

# Optional: the console script, if an editable install works offline here.
if "$py" -m pip install -q --no-deps --no-build-isolation -e . > "$work/pip.log" 2>&1; then
    step "internlm2-graph chat --help (installed)" internlm2-graph chat --help
else
    echo "=== pip install --no-deps --no-build-isolation -e . failed here (so: python -m):"
    grep -i error "$work/pip.log" | tail -2
fi
echo "=== done: $([ $failed = 0 ] && echo all builds and chats passed || echo FAILURES above)"
exit $failed
