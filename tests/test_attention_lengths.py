"""The mask count GroupQueryAttention reads (seqlens_k): exact up to config.MAX_POSITIONS."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxscript import GraphBuilder

from internlm2_graph.config import MAX_POSITIONS
from internlm2_graph.modules import attention_lengths


@pytest.fixture(scope="module")
def lengths():
    """attention_lengths alone, as a CPU session: mask -> (seqlens_k, total length)."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 21}, name="lengths")
    builder = GraphBuilder(graph)
    mask = builder.input("attention_mask", ir.DataType.INT64, ["batch", "total"])
    for value, name in zip(attention_lengths(builder.op, mask), ("seqlens_k", "total")):
        builder.add_output(value, name)
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda m: session.run(None, {"attention_mask": m})


def test_left_padded_rows_and_a_static_buffer(lengths):
    mask = np.array([[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0]], np.int64)
    seqlens_k, total = lengths(mask)
    assert seqlens_k.dtype == np.int32 and seqlens_k.tolist() == [2, 5]
    assert int(total) == 7


def test_the_longest_row_counts_exactly(lengths):
    # float32 holds every integer up to 2**24; one more position would round.
    mask = np.ones((1, MAX_POSITIONS), np.int64)
    mask[0, -2:] = 0
    seqlens_k, total = lengths(mask)
    assert seqlens_k.tolist() == [MAX_POSITIONS - 3] and int(total) == MAX_POSITIONS
    mask[0, -2:] = 1
    assert lengths(mask)[0].tolist() == [MAX_POSITIONS - 1]
