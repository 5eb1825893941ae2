"""`internlm2-graph inspect`: what a checkpoint is and what it would cost to run."""

from __future__ import annotations

from internlm2_graph.config import InternLM2Config
from internlm2_graph.hub import resolve_checkpoint
from internlm2_graph.progress import human_bytes, human_count

# The precision / execution provider pairs a build can make, as the memory table lists them.
TARGETS = (
    ("fp32", "cpu"),
    ("fp16", "cuda"),
    ("bf16", "cuda"),
    ("int8", "cpu"),
    ("int8", "cuda"),
    ("int4", "cpu"),
    ("int4", "cuda"),
)
BLOCK_SIZE = 32  # the default int4/int8 block: one scale per 32 weights
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


def activation_bytes(precision: str, execution_provider: str = "cpu") -> int:
    """Bytes per activation value: fp32 on cpu for int4/int8 (and fp32), fp16/bf16 otherwise."""
    if precision == "fp32" or (precision in ("int4", "int8") and execution_provider == "cpu"):
        return 4
    return 2


def weight_bytes(config: InternLM2Config, precision: str, execution_provider: str = "cpu") -> int:
    """Bytes of weights on disk and in memory, for the default options.

    Embedding and norms stay in the activation dtype; int4/int8 matrices (the lm head
    included) add one scale per block, stored in the activation dtype too.
    """
    parts = parameter_breakdown(config)
    act = activation_bytes(precision, execution_provider)
    kept = parts["embedding"] + parts["norms"]
    matrices = sum(parts.values()) - kept
    per_weight = {"int4": 0.5, "int8": 1.0}.get(precision)
    per_weight = act if per_weight is None else per_weight + act / BLOCK_SIZE
    return int(kept * act + matrices * per_weight)


def kv_cache_bytes(config: InternLM2Config, tokens: int, bytes_per_value: int) -> int:
    """Keys and values of every layer: 2 * layers * kv_heads * head_dim values per token."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * bytes_per_value * tokens


def describe(source: str, context: int | None = None) -> str:
    """A few lines for people: the config, the parameters and the memory each build needs."""
    config = InternLM2Config.from_dir(resolve_checkpoint(source, config_only=True))
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
        f"  memory for the weights and a KV cache of {context} tokens (batch 1):",
    ]
    for precision, provider in TARGETS:
        weights = weight_bytes(config, precision, provider)
        kv = kv_cache_bytes(config, context, activation_bytes(precision, provider))
        lines.append(
            f"    {precision} {provider:4}  weights {human_bytes(weights):>8} + KV cache "
            f"{human_bytes(kv):>8} = {human_bytes(weights + kv):>8}"
        )
    return "\n".join(lines)
