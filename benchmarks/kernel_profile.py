"""Where a CUDA decode step's time goes: GPU kernels by kind, per generated token.

    python -m benchmarks run kernels -e cuda --param study=kernel_profile \
        folders=ours=OUT_DIR,builder=BUILDER_DIR prompt=128 gen=64

Each folder runs one warm-up generation, then one profiled one: the prompt untraced, then `gen`
greedy decode steps traced with CUPTI through torch.profiler (it records every kernel the
process launches, onnxruntime's included, also inside CUDA graphs). Kernels are grouped by kind
from their names; per token we report each kind's GPU time, the sum (busy) against the wall time
of a step (the rest is the GPU idle: launch gaps, host work), and the bytes the MatMulNBits
weights take over the time their kernels ran, the bandwidth the int4/int8 GEMV reaches.

This answers "what would a faster graph gain?": the kernels both graphs share bound the ratio.
Needs torch with CUDA (present on the GPU machine). Rows per folder: tok/s, wall and busy
microseconds per token, kernels per token, each kind's microseconds per token, MatMulNBits'
GB/s, and the `top` kernels' microseconds per token (their names in params).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks import common, harness, runtime
from benchmarks.rows import Row

PARAMS = {"folders": "", "prompt": 128, "gen": 64, "top": 8}  # folders: NAME=DIR,...
SMOKE: dict = {}

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


def summary(name: str, folder: Path, wall: float, kernels: list, args) -> dict:
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


def run(ctx: harness.Context) -> list[Row]:
    common.require_genai()
    import torch

    torch.cuda.init()  # CUPTI and onnxruntime then share the device's primary context
    args = harness.settings(ctx, PARAMS)
    targets = harness.folders(ctx)
    vocab = min(runtime.vocab_size(f) for f in targets.values())
    prompt = np.random.default_rng(0).integers(3, vocab - 16, args.prompt).astype(np.int32)
    out = []
    for name, folder in targets.items():
        model = runtime.load(folder, "cuda")
        runtime.one_run(model, prompt, min(args.gen, 8))  # warm-up (and CUDA graph capture)
        wall, kernels = traced_decode(model, prompt, args.gen)
        if not kernels:
            raise SystemExit("error: the trace holds no CUDA kernels: is CUPTI available to torch?")
        variant = harness.built_variant(name, folder, "cuda")
        out += rows_of(ctx, variant, summary(name, folder, wall, kernels, args), args.prompt)
        del model
    return out


def rows_of(ctx: harness.Context, variant: str, found: dict, prompt: int) -> list[Row]:
    params = {"prompt": prompt, "gen": found["steps"]}

    def row(metric: str, value: float, unit: str, **more) -> Row:
        return ctx.row(
            variant=variant,
            tool=found["model"],
            metric=metric,
            value=value,
            unit=unit,
            params={**params, **more},
        )

    out = [
        row("gen_tok_s", found["gen_tok_s"], "tok/s"),
        row("wall_us_per_token", found["wall_us_per_token"], "us"),
        row("busy_us_per_token", found["busy_us_per_token"], "us"),
        row("kernels_per_token", found["kernels_per_token"], ""),
    ]
    out += [
        row("kind_us_per_token", us, "us", kind=k) for k, us in found["kinds_us_per_token"].items()
    ]
    if found["matmulnbits_gbps"]:
        out.append(row("matmulnbits_gbps", found["matmulnbits_gbps"], "GB/s"))
    for k in found["top_kernels"]:
        calls = k["calls_per_token"]
        out.append(
            row("kernel_us_per_token", k["us_per_token"], "us", kernel=k["name"], calls=calls)
        )
    return out
