"""Tensors the saver writes a slice of rows at a time: same bytes, bounded working set."""

import io

import numpy as np
import onnx_ir as ir
import pytest
from helpers import ArrayRows

from internlm2_graph import build, weights


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16])
def test_row_streamed_tensor_writes_the_whole_tensor_a_slice_at_a_time(dtype, monkeypatch):
    monkeypatch.setattr(weights, "SLICE_BYTES", 3 * 8 * 4)  # 3 rows of 8 float32 per slice
    data = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    rows = ArrayRows(data)
    param = ir.Value(name="t", shape=ir.Shape([10, 8]), type=ir.TensorType(dtype))
    tensor = weights.RowStreamedTensor(rows, param)
    written = io.BytesIO()
    tensor.tofile(written)
    assert rows.asked == [(0, 3), (3, 6), (6, 9), (9, 10)]
    expected = data.astype(weights.NUMPY_DTYPES[dtype]).tobytes()
    assert written.getvalue() == expected
    assert tensor.tobytes() == expected
    assert tensor.numpy().shape == (10, 8)


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16])
def test_transposed_tensor_is_written_a_band_of_columns_at_a_time(dtype, monkeypatch):
    monkeypatch.setattr(weights, "SLICE_BYTES", 4 * 6 * 4)  # 4 checkpoint rows of 6 per band
    data = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)  # [out, in]
    rows = ArrayRows(data)
    param = ir.Value(name="w", shape=ir.Shape([6, 10]), type=ir.TensorType(dtype))
    tensor = weights.TransposedStreamedTensor(rows, param)
    written = io.BytesIO()
    written.write(b"before")  # the saver places each tensor at its own offset
    tensor.tofile(written)
    assert rows.asked == [(0, 4), (4, 8), (8, 10)]
    expected = data.T.astype(weights.NUMPY_DTYPES[dtype]).tobytes()
    assert written.getvalue() == b"before" + expected
    assert written.tell() == len(b"before") + len(expected)
    assert tensor.tobytes() == expected


@pytest.mark.model
@pytest.mark.parametrize(
    "precision, provider, options",
    [("fp32", "cpu", {}), ("bf16", "cuda", {}), ("int4", "cuda", {"lm_head_precision": "float"})],
)
def test_a_model_saved_in_slices_is_byte_identical_to_one_saved_whole(
    precision, provider, options, tiny_checkpoint, tmp_path, monkeypatch
):
    """Building needs no GPU: the cuda folders are only written here, and compared."""
    build(tiny_checkpoint, tmp_path / "whole", precision, provider, options)
    monkeypatch.setattr(weights, "SLICE_BYTES", 256)  # a few rows per slice
    monkeypatch.setattr(weights, "STREAM_BYTES", 0)  # every transposed matrix streamed
    build(tiny_checkpoint, tmp_path / "sliced", precision, provider, options)
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "sliced" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
