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
    kv_heads, head_size = config.num_key_value_heads, kv_head_size(config, target)
    kv_shape = ["batch_size", kv_heads, "past_sequence_length", head_size]
    input_ids = builder.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    attention_mask = builder.input(
        "attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"]
    )
    past = [
        (
            builder.input(PAST_KEY % i, target.kv_dtype, kv_shape),
            builder.input(PAST_VALUE % i, target.kv_dtype, kv_shape),
        )
        for i in range(config.num_hidden_layers)
    ]
    module = InternLM2ForCausalLM(config, target)
    logits, presents = module(builder.op, input_ids, attention_mask, past)

    present_shape = ir.Shape(["batch_size", kv_heads, "total_sequence_length", head_size])
    _output(
        builder,
        logits,
        "logits",
        target.io_dtype,
        ["batch_size", "sequence_length", config.vocab_size],
    )
    for i, (key, value) in enumerate(presents):
        _output(builder, key, PRESENT_KEY % i, target.kv_dtype, present_shape)
        _output(builder, value, PRESENT_VALUE % i, target.kv_dtype, present_shape)
    model = ir.Model(graph, ir_version=IR_VERSION, producer_name="internlm2_graph")
    return model, module


def kv_head_size(config: InternLM2Config, target: Target) -> int:
    """The last dimension of the cache tensors: head_dim, or half of it for packed int4."""
    if target.kv_cache is None:
        return config.head_dim
    return target.kv_cache.stored_head_size(config.head_dim)


def _output(builder: GraphBuilder, value: ir.Value, name: str, dtype: ir.DataType, shape) -> None:
    value.dtype = dtype
    value.shape = ir.Shape(shape)
    builder.add_output(value, name)
