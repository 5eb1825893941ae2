"""Assemble the decoder graph with ONNX Runtime GenAI's usual input and output names."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import GraphBuilder

from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.modules import InternLM2ForCausalLM
from internlm2_graph.precision import Target

OPSET = 21
IR_VERSION = 10
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# What og.Engine feeds a paged graph besides input_ids and the caches, by og's default names.
PAGED_INPUTS = (
    "cumulative_sequence_lengths",
    "past_sequence_lengths",
    "block_table",
    "attention_metadata",
)
LOGITS_INDICES = "logits_indices"


def build_graph(config: InternLM2Config, target: Target) -> tuple[ir.Model, InternLM2ForCausalLM]:
    """The decoder as an ir.Model whose initializers have shapes but no data yet."""
    if config.head_dim % 16:
        raise InternLM2GraphError(
            f"{config.source}: head_dim {config.head_dim} (hidden_size / num_attention_heads) "
            "is not a multiple of 16, which onnxruntime's GroupQueryAttention requires"
        )
    target = target.for_layers(config.num_hidden_layers)  # tensor_precision's layer numbers
    graph = ir.Graph(
        [], [], nodes=[], opset_imports={"": OPSET, "com.microsoft": 1}, name="internlm2"
    )
    builder = GraphBuilder(graph)
    kv_shape, present_shape = _cache_shapes(config, target)
    if target.paged is None:
        input_ids = builder.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        attention = builder.input(
            "attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"]
        )
        rows, logits_rows = ["batch_size", "sequence_length"], None
    else:
        input_ids = builder.input("input_ids", ir.DataType.INT64, ["num_tokens"])
        attention = _paged_inputs(builder)
        pruned = target.paged.prune_lm_head
        rows = ["num_logits" if pruned else "num_tokens"]
        logits_rows = builder.input(LOGITS_INDICES, ir.DataType.INT32, rows) if pruned else None
    past = [
        (
            builder.input(PAST_KEY % i, target.kv_dtype, kv_shape),
            builder.input(PAST_VALUE % i, target.kv_dtype, kv_shape),
        )
        for i in range(config.num_hidden_layers)
    ]
    module = InternLM2ForCausalLM(config, target)
    logits, presents = module(builder.op, input_ids, attention, past, logits_rows)

    _output(builder, logits, "logits", target.io_dtype, [*rows, config.vocab_size])
    for i, (key, value) in enumerate(presents):
        _output(builder, key, PRESENT_KEY % i, target.kv_dtype, present_shape)
        _output(builder, value, PRESENT_VALUE % i, target.kv_dtype, present_shape)
    model = ir.Model(graph, ir_version=IR_VERSION, producer_name="internlm2_graph")
    return model, module


def _cache_shapes(config: InternLM2Config, target: Target) -> tuple[list, list]:
    """(past, present) cache shapes: one max_length buffer per sequence that present extends,
    or for a paged graph og.Engine's block pool, which the op updates in place."""
    kv_heads, head_size = config.num_key_value_heads, kv_head_size(config, target)
    if target.paged is not None:
        pool = ["num_blocks", target.paged.block_size, kv_heads, head_size]
        return pool, pool
    return (
        ["batch_size", kv_heads, "past_sequence_length", head_size],
        ["batch_size", kv_heads, "total_sequence_length", head_size],
    )


def _paged_inputs(builder: GraphBuilder) -> tuple[ir.Value, ...]:
    """og.Engine's view of a packed step, as PagedAttention takes it (PAGED_INPUTS order):
    token boundaries of each sequence, tokens each already has cached, its cache blocks, and
    [longest query, longest KV, a lower bound on the longest KV] in CPU memory."""
    shapes = (["batch_size + 1"], ["batch_size"], ["batch_size", "max_num_blocks"], [3])
    return tuple(
        builder.input(name, ir.DataType.INT32, shape)
        for name, shape in zip(PAGED_INPUTS, shapes, strict=True)
    )


def kv_head_size(config: InternLM2Config, target: Target) -> int:
    """The last dimension of the cache tensors: head_dim, or half of it for packed int4."""
    if target.kv_cache is None:
        return config.head_dim
    return target.kv_cache.stored_head_size(config.head_dim)


def _output(builder: GraphBuilder, value: ir.Value, name: str, dtype: ir.DataType, shape) -> None:
    value.dtype = dtype
    value.shape = ir.Shape(shape)
    builder.add_output(value, name)
