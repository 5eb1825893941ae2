"""`internlm2-graph inspect`: what a checkpoint is and what it would cost to run."""

from __future__ import annotations

from internlm2_graph.config import InternLM2Config
from internlm2_graph.hub import resolve_checkpoint

# Bytes per weight: int4/int8 add one fp32 scale per 32-weight block (the default block size).
BYTES_PER_WEIGHT = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 4, "int4": 4}  # int4/int8 keep a float cache
DEFAULT_CONTEXT = 4096


def parameter_breakdown(config: InternLM2Config) -> dict[str, int]:
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    attention = h * qkv + config.num_attention_heads * config.head_dim * h
    if config.bias:
        attention += qkv + h
    layers = config.num_hidden_layers
    return {
        "embedding": v * h,
        "attention": layers * attention,
        "feed_forward": layers * 3 * h * i,
        "norms": layers * 2 * h + h,
        "lm_head": v * h,
    }


def weight_bytes(config: InternLM2Config, precision: str) -> int:
    """Embedding stays in the activation dtype (fp32 on cpu for int4/int8); the rest as chosen."""
    parts = parameter_breakdown(config)
    embed_bytes = 2 if precision in ("fp16", "bf16") else 4
    body = sum(parts.values()) - parts["embedding"] - parts["norms"]
    return int(body * BYTES_PER_WEIGHT[precision] + (parts["embedding"] + parts["norms"]) * embed_bytes)


def kv_cache_bytes(config: InternLM2Config, tokens: int, bytes_per_value: int) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bytes_per_value * tokens


def describe(source: str, context: int | None = None) -> str:
    config = InternLM2Config.from_dir(resolve_checkpoint(source))
    context = context or min(config.context_length, DEFAULT_CONTEXT)
    parts = parameter_breakdown(config)
    lines = [
        f"{source}: InternLM2, {sum(parts.values()) / 1e9:.3g}B parameters",
        f"  hidden {config.hidden_size}, layers {config.num_hidden_layers}, heads "
        f"{config.num_attention_heads} (kv {config.num_key_value_heads}, GQA group "
        f"{config.group}), head_dim {config.head_dim}, intermediate {config.intermediate_size}, "
        f"vocab {config.vocab_size}",
        f"  rope_theta {config.rope_theta:g}, rope_scaling {config.rope_scaling}, "
        f"context {config.context_length}, bias {config.bias}",
        "  parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in parts.items()),
        f"  memory at {context} tokens of KV cache (batch 1):",
    ]
    for precision in BYTES_PER_WEIGHT:
        weights = weight_bytes(config, precision)
        kv = kv_cache_bytes(config, context, KV_BYTES[precision])
        lines.append(
            f"    {precision:5} weights {weights / 2**30:7.2f} GiB + KV {kv / 2**30:6.2f} GiB "
            f"= {(weights + kv) / 2**30:7.2f} GiB"
        )
    return "\n".join(lines)
