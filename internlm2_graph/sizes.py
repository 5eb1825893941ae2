"""What a checkpoint is and costs: parameters, weight bytes, KV cache (`internlm2-graph inspect`).

Sizes are read off the graph a build would make (its skeleton: shapes and dtypes, no data), so
they count exactly what the build writes for a target: block size, zero points, lm-head
precision and rotary tables included. No tensor list or qkv arithmetic is written again here.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from internlm2_graph.config import InternLM2Config
from internlm2_graph.graph import build_graph
from internlm2_graph.hub import resolve_checkpoint
from internlm2_graph.precision import Target, resolve_target, supported_targets
from internlm2_graph.prequantized import read_layout
from internlm2_graph.progress import human_bytes, human_count

DEFAULT_CONTEXT = 4096
PARTS = ("embedding", "attention", "feed_forward", "norms", "lm_head")
# og.Engine keeps this share of the free GPU memory back for fragmentation before it applies
# gpu_utilization_factor (onnxruntime-genai src/engine/paged_key_value_cache.cpp).
ENGINE_FRAGMENTATION = 0.9
# GPU memory sizes inspect works the paged pool out for (H100 80 GB, H200 141 GB).
GPU_BYTES = {"80 GB": 80e9, "141 GB": 141e9}


def initializers(config: InternLM2Config, target: Target) -> dict[str, ir.Value]:
    """The graph's initializers for `target`, by name, without data."""
    model, _ = build_graph(config, target)
    return dict(model.graph.initializers)


def parameter_breakdown(config: InternLM2Config) -> dict[str, int]:
    """Parameters by part of the model, counted on the fp32 graph (rotary tables are not
    parameters: they are computed from the config)."""
    counts = dict.fromkeys(PARTS, 0)
    for name, value in initializers(config, resolve_target("fp32", "cpu")).items():
        part = _part(name)
        if part is not None:
            counts[part] += int(np.prod(value.shape.numpy(), dtype=np.int64))
    return counts


def parameter_count(config: InternLM2Config) -> int:
    return sum(parameter_breakdown(config).values())


def weight_bytes(config: InternLM2Config, target: Target) -> int:
    """Bytes of the weights a build for `target` writes (and a session holds in memory)."""
    return graph_bytes(build_graph(config, target)[0])


def graph_bytes(model: ir.Model) -> int:
    """Bytes of a graph's initializers, from their shapes and dtypes (no data needed)."""
    return sum(
        int(np.prod(v.shape.numpy(), dtype=np.int64)) * v.dtype.itemsize
        for v in model.graph.initializers.values()
    )


def tensor_formats(config: InternLM2Config, target: Target) -> list[str]:
    """Lines saying how a build for `target` stores each weight matrix: the embedding, the
    lm_head, and each decoder linear with the layers that share a format."""
    from internlm2_graph import modules
    from internlm2_graph.tensor_precision import format_name

    model, module = build_graph(config, target)
    sizes = {
        name: int(np.prod(v.shape.numpy(), dtype=np.int64)) * v.dtype.itemsize
        for name, v in model.graph.initializers.items()
    }
    float_name = target.io_dtype.name.lower()
    lines, layers = [], {}
    for path, sub in module.named_modules():
        if isinstance(sub, (modules.QuantizedLinear, modules.QuantizedEmbedding)):
            fmt = format_name(sub.spec)
        elif isinstance(sub, (modules.Linear, modules.Embedding)):
            fmt = float_name
        else:
            continue
        size = sum(n for name, n in sizes.items() if name.startswith(f"{path}."))
        if path.startswith("model.layers."):
            _, _, n, name = path.split(".", 3)
            layers.setdefault(name, {}).setdefault(fmt, []).append((int(n), size))
        else:
            lines.append(f"{path}: {fmt}, {human_bytes(size)}")
    if target.can_tie:
        lines.append("  (a checkpoint that ties output to tok_embeddings: one copy, shared)")
    for name, by_format in layers.items():
        parts = [
            f"{fmt} in layers {_ranges([n for n, _ in found])}, "
            f"{human_bytes(sum(b for _, b in found))}"
            for fmt, found in by_format.items()
        ]
        lines.append(f"{name}: " + "; ".join(parts))
    return lines


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"{start}-{n}" if n != start else f"{n}")
            start = None
    return ", ".join(out)


def kv_cache_bytes(config: InternLM2Config, tokens: int, bytes_per_value: float) -> int:
    """Keys and values of every layer: 2 * layers * kv_heads * head_dim values per token."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return int(per_token * bytes_per_value * tokens)


def paged_block_bytes(config: InternLM2Config, target: Target) -> int:
    """One block of og.Engine's paged KV cache, keys and values of every layer."""
    return kv_cache_bytes(config, target.paged.block_size, target.kv_bytes_per_value)


def paged_blocks(config: InternLM2Config, target: Target, free_bytes: float) -> int:
    """The blocks og.Engine allocates for `target` with `free_bytes` of GPU memory free after
    the weights: num_blocks when set, else its share of that memory."""
    if target.paged.num_blocks is not None:
        return target.paged.num_blocks
    budget = free_bytes * ENGINE_FRAGMENTATION * target.paged.gpu_utilization_factor
    return max(0, int(budget // paged_block_bytes(config, target)))


def describe(source: str, context: int | None = None, target: Target | None = None) -> str:
    """A few lines for people: the config, the parameters and the memory each build needs;
    with a `target`, also how that build stores each weight matrix (tensor_formats)."""
    chosen = target
    folder = resolve_checkpoint(source, config_only=True)
    config = InternLM2Config.from_dir(folder)
    layout = read_layout(folder)
    context = context or min(config.context_length, DEFAULT_CONTEXT)
    parts = parameter_breakdown(config)
    lines = [
        f"{source}: InternLM2, {human_count(sum(parts.values()))} parameters",
        f"  hidden {config.hidden_size}, layers {config.num_hidden_layers}, heads "
        f"{config.num_attention_heads} (kv {config.num_key_value_heads}, GQA group "
        f"{config.group}), head_dim {config.head_dim}, intermediate {config.intermediate_size}, "
        f"vocab {config.vocab_size}",
        f"  rope_theta {config.rope_theta:g}, rope_scaling {config.rope_scaling}, "
        f"context {config.context_length}, bias {config.bias}",
        "  parameters: " + ", ".join(f"{k} {human_count(v)}" for k, v in parts.items()),
    ]
    if layout is not None:
        lines.append(
            f"  pre-quantized: {layout.name}; -p int4 carries its codes over unchanged, "
            "fp16/bf16/fp32 dequantize them exactly"
        )
    lines += [
        f"  memory for the weights and a KV cache of {context} tokens (batch 1):",
    ]
    for target in supported_targets():
        weights = weight_bytes(config, target)
        kv = kv_cache_bytes(config, context, target.kv_bytes_per_value)
        lines.append(
            f"    {target.precision} {target.execution_provider:4}  weights "
            f"{human_bytes(weights):>8} + KV cache {human_bytes(kv):>8} = "
            f"{human_bytes(weights + kv):>8}"
        )
    per_scheme = {"fp32": 4, "fp16/bf16": 2, "int8/fp8": 1, "int4": 0.5}
    lines.append(
        f"  KV cache of {context} tokens by kv_cache_quant_scheme: "
        + ", ".join(
            f"{k} {human_bytes(kv_cache_bytes(config, context, b))}" for k, b in per_scheme.items()
        )
    )
    if chosen is not None:
        weights = weight_bytes(config, chosen)
        lines.append(f"  weight formats of this {chosen.precision} build ({human_bytes(weights)}):")
        lines += [f"    {line}" for line in tensor_formats(config, chosen)]
    return "\n".join(lines + _describe_paged(config, context))


def _describe_paged(config: InternLM2Config, context: int) -> list[str]:
    """What og.Engine's paged cache holds at the builder's defaults, on the usual GPUs."""
    on = {"use_paged_attention": "true"}
    paged = {p: resolve_target(p, "cuda", on) for p in ("int4", "fp16")}
    spec = paged["int4"].paged
    block = human_bytes(paged_block_bytes(config, paged["int4"]))
    lines = [
        f"  paged KV cache (use_paged_attention=true): {block} a block of {spec.block_size} "
        f"tokens; og.Engine gives it {ENGINE_FRAGMENTATION:g} x gpu_utilization_factor "
        f"{spec.gpu_utilization_factor:g} of the GPU memory free after the weights, e.g.:"
    ]
    for gpu, total in GPU_BYTES.items():
        parts = []
        for precision, target in paged.items():
            blocks = paged_blocks(config, target, total - weight_bytes(config, target))
            tokens = blocks * target.paged.block_size
            parts.append(
                f"{precision} {blocks} blocks = {human_count(tokens)} tokens "
                f"({tokens // context} sequences of {context})"
            )
        lines.append(f"    {gpu} GPU: " + ", ".join(parts))
    return lines


def _part(name: str) -> str | None:
    """Which part of the model an initializer (named after its checkpoint tensor) belongs to."""
    if name.startswith("model.tok_embeddings."):
        return "embedding"
    if name.startswith("output."):
        return "lm_head"
    if name.endswith("norm.weight"):
        return "norms"
    if ".attention." in name:
        return "attention"
    if ".feed_forward." in name:
        return "feed_forward"
    return None  # rotary tables
