"""Where a CUDA decode step's time goes: GPU kernels by kind, per generated token.

    python -m benchmarks.kernel_profile ours=OUT_DIR builder=BUILDER_DIR --prompt 128 --gen 64

Each folder runs one warm-up generation, then one profiled one: the prompt untraced, then --gen
greedy decode steps traced with CUPTI through torch.profiler (it records every kernel the
process launches, onnxruntime's included, also inside CUDA graphs). Kernels are grouped by kind
from their names; per token we report each kind's GPU time, the sum (busy) against the wall time
of a step (the rest is the GPU idle: launch gaps, host work), and the bytes the MatMulNBits
weights take over the time their kernels ran, the bandwidth the int4/int8 GEMV reaches.

This answers "what would a faster graph gain?": the kernels both graphs share bound the ratio.
Needs torch with CUDA (present on the GPU machine); results in
benchmarks/results/kernels-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks import common, runtime

# First match wins; names are CUDA kernel symbols (demangled) from onnxruntime and its libraries.
KINDS = (
    # A quantized KV cache is dequantized to fp16 before attention reads it (onnxruntime 1.31):
    # int8/fp8 in DequantizeKVPairKernel, int4 in the generic DequantizeKernel.
    ("kv dequantize", r"DequantizeKV|cuda::DequantizeKernel<"),
    ("matmul nbits", r"nbits|4bits|8bits|fpA_intB|dequantize"),
    ("attention", r"flash|attention|attn|mha|gqa|softmax|rotary|kv_cache|concat.*kv|unpack"),
    ("norm", r"layernorm|layer_norm|rmsnorm|skip"),
    ("gemm (dense)", r"gemm|cutlass|sm90|xmma|cublas|ampere|hopper|gemv"),
    ("elementwise", r"elementwise|binary|unary|sigmoid|silu|gelu|mul|add|cast|split|slice|copy"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", metavar="[NAME=]FOLDER", help="built model folders")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length before decoding")
    parser.add_argument("--gen", type=int, default=64, help="decode steps traced")
    parser.add_argument("--top", type=int, default=8, help="kernels listed per folder")
    parser.add_argument("--machine", default=None, help="name in the results file")
    return parser.parse_args(argv)


def matmulnbits_bytes(folder: Path) -> int:
    """Bytes of every MatMulNBits weight input (packed B, scales, zero points)."""
    graph = runtime.graph_of(folder)
    sizes = {init.name: runtime.initializer_bytes(init) for init in graph.initializer}
    names = {name for n in graph.node if n.op_type == "MatMulNBits" for name in n.input[1:] if name}
    return sum(sizes.get(name, 0) for name in names)


def traced_decode(model, prompt: np.ndarray, gen: int, settle: int = 8):
    """(wall seconds of `gen` decode steps, [(kernel name, microseconds)]) from one generation.

    The first `settle` steps are not traced: onnxruntime runs the step it captures into a CUDA
    graph more than once, which would count as extra kernels per token.
    """
    import onnxruntime_genai as og
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    params = og.GeneratorParams(model)
    total = len(prompt) + settle + gen + 1
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    for _ in range(1 + settle):
        generator.generate_next_token()
    generator.get_next_tokens()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(gen):
            generator.generate_next_token()
        generator.get_next_tokens()  # waits for the last step's logits
        wall = time.perf_counter() - start
    kernels = [
        (e.name, e.time_range.elapsed_us())
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    ]
    return wall, kernels


def report(name: str, folder: Path, wall: float, kernels: list, args) -> dict:
    per_kind = defaultdict(float)
    per_kernel = defaultdict(lambda: [0.0, 0])
    for kernel, us in kernels:
        per_kind[kind_of(kernel)] += us
        per_kernel[kernel][0] += us
        per_kernel[kernel][1] += 1
    steps = args.gen
    busy_us = sum(per_kind.values()) / steps
    nbits_us = per_kind.get("matmul nbits", 0.0) / steps
    nbits_bytes = matmulnbits_bytes(folder)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
    return {
        "model": name,
        "folder": str(folder),
        "steps": steps,
        "wall_us_per_token": wall / steps * 1e6,
        "gen_tok_s": steps / wall,
        "busy_us_per_token": busy_us,
        "kernels_per_token": len(kernels) / steps,
        "kinds_us_per_token": {k: v / steps for k, v in sorted(per_kind.items())},
        "matmulnbits_bytes": nbits_bytes,
        "matmulnbits_gbps": nbits_bytes / (nbits_us * 1e-6) / 1e9 if nbits_us else None,
        "top_kernels": [
            {"name": k[:160], "us_per_token": v[0] / steps, "calls_per_token": v[1] / steps}
            for k, v in top
        ],
    }


def markdown(rows: list[dict], info: dict) -> str:
    kinds = sorted({k for r in rows for k in r["kinds_us_per_token"]})
    header = ["model", "gen tok/s", "wall µs/token", "GPU busy µs", "kernels/token"]
    header += [f"{k} µs" for k in kinds] + ["MatMulNBits GB/s"]
    body = [
        [
            r["model"],
            f"{r['gen_tok_s']:.1f}",
            f"{r['wall_us_per_token']:.0f}",
            f"{r['busy_us_per_token']:.0f}",
            f"{r['kernels_per_token']:.0f}",
            *(f"{r['kinds_us_per_token'].get(k, 0.0):.0f}" for k in kinds),
            f"{r['matmulnbits_gbps']:.0f}" if r["matmulnbits_gbps"] else "-",
        ]
        for r in rows
    ]
    text = (
        f"Decode kernels ({info['gpu']}), onnxruntime-genai "
        f"{common.genai_version(info)}: per generated token, CUPTI trace\n\n"
        + common.markdown_table(header, body)
    )
    for r in rows:
        text += f"\n\n{r['model']}, top kernels (µs/token, calls/token):\n"
        text += "\n".join(
            f"- {k['us_per_token']:.0f} µs, {k['calls_per_token']:.0f}x  `{k['name'][:110]}`"
            for k in r["top_kernels"]
        )
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.require_genai()
    import torch

    torch.cuda.init()  # CUPTI and onnxruntime then share the device's primary context
    targets = runtime.parse_models(args.models)
    vocab = min(runtime.vocab_size(t.folder) for t in targets)
    prompt = np.random.default_rng(0).integers(3, vocab - 16, args.prompt).astype(np.int32)
    rows = []
    for t in targets:
        model = runtime.load(t.folder, "cuda")
        runtime.one_run(model, prompt, min(args.gen, 8))  # warm-up (and CUDA graph capture)
        wall, kernels = traced_decode(model, prompt, args.gen)
        if not kernels:
            raise SystemExit("the trace holds no CUDA kernels: is CUPTI available to torch?")
        rows.append(report(t.name, t.folder, wall, kernels, args))
        print(json.dumps(rows[-1], indent=1), flush=True)
        del model
    info = common.machine_info()
    text = markdown(rows, info)
    print("\n" + text)
    name = f"kernels-{args.machine or common.default_machine_name()}"
    payload = {"machine": info, "args": vars(args), "results": rows}
    print(f"\nwrote {common.write_results(name, payload, text)}")


if __name__ == "__main__":
    main()
