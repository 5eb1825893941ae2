"""MatMulNBits quantization: layout pinned by hand, checked against ORT's kernels and runtime."""

import tracemalloc

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import QuantSpec
from internlm2_graph.quantize import (
    QuantizedWeight,
    dequantize,
    matmul_nbits_initializers,
    quantize,
    quantize_ort,
)

EPS32 = float(np.finfo(np.float32).eps)

# A permutation of the int4 range: codes p + 8 are all distinct and not monotonic, so any
# nibble-order or element-order mistake changes the bytes.
PERM = np.array([-8, 7, -1, 0, 3, -4, 5, -6, 1, 2, -2, -3, 4, 6, -5, -7], np.float32)
# codes (0,15) (7,8) (11,4) (13,2) (9,10) (6,5) (12,14) (3,1), element 2j in the low nibble:
PERM_BYTES = [0xF0, 0x87, 0x4B, 0x2D, 0xA9, 0x56, 0xEC, 0x13]


# ---------------------------------------------------------------- helpers (independent of module)


def nibbles(packed: np.ndarray) -> np.ndarray:
    """Bytes -> codes, low nibble first, written out longhand for the tests."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed % 16
    out[..., 1::2] = packed // 16
    return out


def codes_and_zero_points(q: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] codes (padding dropped) and [N, k_blocks] zero points."""
    codes = q.packed if q.spec.bits == 8 else nibbles(q.packed)
    mid = 1 << (q.spec.bits - 1)
    if q.zero_points is None:
        zp = np.full((q.n, q.k_blocks), mid)
    else:
        zp = q.zero_points if q.spec.bits == 8 else nibbles(q.zero_points)
    return codes.reshape(q.n, -1)[:, : q.k], zp[:, : q.k_blocks]


def per_element(q: QuantizedWeight, per_block: np.ndarray) -> np.ndarray:
    return np.repeat(per_block, q.spec.block_size, axis=1)[:, : q.k]


def make_weight(seed: int, kind: str, n: int, k: int, magnitude: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "grid":  # exact ties: equal |max| and |min|, and codes landing on x.5
        w = rng.integers(-16, 17, (n, k)) * 0.125
    elif kind == "outliers":
        w = rng.standard_normal((n, k)) * np.where(rng.random((n, k)) < 0.01, 50.0, 1.0)
    elif kind == "sparse":  # whole zero blocks and one-sign blocks
        w = np.abs(rng.standard_normal((n, k))) * (rng.random((n, k)) < 0.05)
    elif kind == "constant":
        w = np.broadcast_to(rng.standard_normal((n, 1)), (n, k))
    else:
        w = rng.standard_normal((n, k))
    return (w * magnitude).astype(np.float32)


def matmul_nbits_session(
    q: QuantizedWeight, initializers: list[np.ndarray] | None = None
) -> ort.InferenceSession:
    """A one-node fp32 graph Y = MatMulNBits(A, B, scales[, zero_points])."""
    arrays = initializers if initializers is not None else matmul_nbits_initializers(q)
    names = ["B", "scales", "zero_points"][: len(arrays)]
    node = helper.make_node(
        "MatMulNBits", ["A", *names], ["Y"], domain="com.microsoft", **q.spec.attributes(q.k, q.n)
    )
    graph = helper.make_graph(
        [node],
        "matmul_nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", q.k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", q.n])],
        [numpy_helper.from_array(a, name) for a, name in zip(arrays, names, strict=True)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_graph(q: QuantizedWeight, x: np.ndarray, initializers=None) -> np.ndarray:
    return matmul_nbits_session(q, initializers).run(None, {"A": x})[0]


def excess_error(q: QuantizedWeight, x: np.ndarray, y: np.ndarray) -> float:
    """max |y - x @ deq.T| / tolerance; <= 1 passes.

    accuracy_level 0 computes in fp32: any summation order is within (K+2) eps of the float64
    product, relative to sum |x| |w| (K adds, plus one rounding each in dequant and multiply).
    accuracy_level 4 first rounds A to int8 per block of block_size along K with scale
    amax/127, so each a_k moves by at most amax_block/254; that moves y[m, n] by at most
    sum_b amax[m, b] / 254 * sum_{k in b} |w[n, k]| (plus 1% for the fp32 scale arithmetic).
    """
    w = dequantize(q).astype(np.float64)
    x64 = x.astype(np.float64)
    tol = (q.k + 2) * EPS32 * (np.abs(x64) @ np.abs(w).T) + 1e-30
    if q.spec.accuracy_level == 4:
        pad = q.k_blocks * q.spec.block_size - q.k

        def blocks(a: np.ndarray) -> np.ndarray:
            return np.pad(a, ((0, 0), (0, pad))).reshape(len(a), q.k_blocks, -1)

        a_step = np.abs(blocks(x64)).max(axis=-1) / 254  # [M, k_blocks]
        w_sum = np.abs(blocks(w)).sum(axis=-1)  # [N, k_blocks]
        tol += 1.01 * a_step @ w_sum.T
    return float((np.abs(y - x64 @ w.T) / tol).max())


shapes = st.tuples(st.integers(1, 24), st.integers(1, 600))
specs = st.builds(
    QuantSpec,
    bits=st.sampled_from([4, 8]),
    block_size=st.sampled_from([16, 32, 64, 128, 256]),
    symmetric=st.booleans(),
)
weights = st.tuples(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["normal", "grid", "outliers", "sparse", "constant"]),
    st.sampled_from([1e-3, 1.0, 1e3]),
)


# ------------------------------------------------------------------------------ the layout by hand


def hand_weight() -> np.ndarray:
    """[2, 32], two blocks of 16 per row, every block on its int4 grid; scales 0.5, -0.25, 2, -1
    (negative when the block's extreme is positive, so that extreme gets code 0)."""
    return np.stack([np.concatenate([0.5 * PERM, -0.25 * PERM]), np.concatenate([2 * PERM, -PERM])])


@pytest.mark.parametrize("impl", [quantize, quantize_ort])
def test_symmetric_int4_layout_by_hand(impl):
    w = hand_weight()
    q = impl(w, QuantSpec(bits=4, block_size=16))
    assert q.packed.dtype == np.uint8 and q.packed.shape == (2, 2, 8)
    assert (q.packed == np.array(PERM_BYTES, np.uint8)).all()
    assert q.scales.dtype == np.float32
    np.testing.assert_array_equal(q.scales, [[0.5, -0.25], [2.0, -1.0]])
    assert q.zero_points is None
    np.testing.assert_array_equal(dequantize(q), w)


@pytest.mark.parametrize("impl", [quantize, quantize_ort])
def test_asymmetric_int4_layout_by_hand(impl):
    # 0.5 * codes - 2: range [-2, 5.5] -> scale 7.5 / 15 = 0.5, zero point 2 / 0.5 = 4.
    w = (0.5 * (PERM + 8) - 2)[None, :]
    q = impl(w, QuantSpec(bits=4, block_size=16, symmetric=False))
    assert list(q.packed[0, 0]) == PERM_BYTES
    np.testing.assert_array_equal(q.scales, [[0.5]])
    # One block: zero point 4 in the low nibble, the spare high nibble is the midpoint 8.
    np.testing.assert_array_equal(q.zero_points, [[0x84]])
    np.testing.assert_array_equal(dequantize(q), w)


@pytest.mark.parametrize("impl", [quantize, quantize_ort])
def test_int8_layout_by_hand(impl):
    w = np.array([[-128.0, 127.0, 0.0, 1.0] + [0.0] * 12], np.float32)
    q = impl(w, QuantSpec(bits=8, block_size=16))
    assert q.packed.shape == (1, 1, 16)
    assert list(q.packed[0, 0, :4]) == [0, 255, 128, 129]  # code = w / 1 + 128
    np.testing.assert_array_equal(q.scales, [[1.0]])
    np.testing.assert_array_equal(dequantize(q), w)


def test_runtime_reads_hand_layout_exactly():
    """One-hot rows of A read single weights through the real kernel: Y[k, n] = W[n, k]."""
    w = hand_weight()
    q = quantize(w, QuantSpec(bits=4, block_size=16))
    np.testing.assert_array_equal(run_graph(q, np.eye(32, dtype=np.float32)).T, w)


def test_wrong_nibble_order_or_transposed_scales_are_caught():
    w = hand_weight()
    q = quantize(w, QuantSpec(bits=4, block_size=16))
    eye = np.eye(32, dtype=np.float32)
    swapped = (q.packed >> 4) | (q.packed << 4)
    scales_t = np.ascontiguousarray(q.scales.T).reshape(q.scales.shape)
    for wrong in ([swapped, q.scales], [q.packed, scales_t]):
        assert not np.array_equal(run_graph(q, eye, wrong).T, w)
    # The same mutants also fail the tolerance check used by the randomized graph tests.
    rng = np.random.default_rng(0)
    big = quantize(make_weight(1, "normal", 40, 96, 1.0), QuantSpec(bits=4, block_size=32))
    x = rng.standard_normal((4, 96)).astype(np.float32)
    assert excess_error(big, x, run_graph(big, x)) <= 1
    swapped = (big.packed >> 4) | (big.packed << 4)
    scales_t = np.ascontiguousarray(big.scales.T).reshape(big.scales.shape)
    for wrong in ([swapped, big.scales], [big.packed, scales_t]):
        assert excess_error(big, x, run_graph(big, x, wrong)) > 100


# ------------------------------------------------------------------------ randomized properties


@settings(max_examples=max(40, settings.default.max_examples))
@given(shapes, specs, weights)
def test_roundtrip_is_nearest_grid_point(shape, spec, weight_args):
    """dequantize(quantize(w)) is the grid point nearest to w, on each block's grid
    {(c - zp) * scale : c in 0..2**bits-1}: within half a step unless clipped at the grid's end.
    Symmetric grids stop one step short on the side opposite the block's extreme (MLAS maps
    the extreme to code 0), so there the error reaches one step; asymmetric never exceeds half.
    """
    w = make_weight(*weight_args[:2], *shape, weight_args[2])
    q = quantize(w, spec)
    codes, zp = codes_and_zero_points(q)
    scale = per_element(q, q.scales).astype(np.float64)
    zp = per_element(q, zp).astype(np.float64)
    qmax = (1 << spec.bits) - 1
    w64 = w.astype(np.float64)
    err = np.abs(dequantize(q) - w64)
    f32 = np.float32
    np.testing.assert_array_equal(dequantize(q), (codes.astype(f32) - zp.astype(f32)) * f32(scale))

    tiny = 1e-4 * np.abs(scale) + 1e-30  # float32 rounding of w * (1 / scale) + zp
    safe = np.where(scale == 0, 1.0, scale)
    nearest = np.clip(np.round(w64 / safe + zp), 0, qmax)
    nearest_dist = np.where(scale == 0, np.abs(w64), np.abs(w64 - (nearest - zp) * scale))
    assert (err <= nearest_dist + tiny).all()
    step = np.abs(scale)
    if spec.symmetric:
        assert (err <= step + tiny).all()
        inside = np.abs(w64 / safe) <= (qmax - 1) / 2 + 0.5  # e.g. |w| <= 7.5 steps for int4
        assert (err[inside] <= step[inside] / 2 + tiny[inside]).all()
    else:
        assert (err <= step / 2 + tiny).all()
    assert (scale[w64 != 0] != 0).all()  # a block with a nonzero weight has a nonzero scale


@settings(max_examples=max(40, settings.default.max_examples))
@given(shapes, specs, weights)
def test_matches_ort_quantizer_bit_for_bit(shape, spec, weight_args):
    w = make_weight(*weight_args[:2], *shape, weight_args[2])
    ours, theirs = quantize(w, spec), quantize_ort(w, spec)
    np.testing.assert_array_equal(ours.scales, theirs.scales)
    codes_ours, zp_ours = codes_and_zero_points(ours)
    codes_theirs, zp_theirs = codes_and_zero_points(theirs)
    np.testing.assert_array_equal(codes_ours, codes_theirs)
    if spec.symmetric:
        assert ours.zero_points is None and theirs.zero_points is None
    else:
        np.testing.assert_array_equal(ours.zero_points, theirs.zero_points)  # spare nibble too
    if shape[1] % spec.block_size == 0:  # no padding: every byte is the same
        np.testing.assert_array_equal(ours.packed, theirs.packed)


@pytest.mark.parametrize("bits", [4, 8])
def test_chunks_and_threads_do_not_change_the_result(monkeypatch, bits):
    """The randomized tests fit in one chunk; here 7-row chunks go through a 3-thread pool."""
    w = make_weight(9, "outliers", 300, 200, 1.0)  # k_blocks = 13: odd, ragged
    spec = QuantSpec(bits=bits, block_size=16, symmetric=False)
    whole = quantize(w, spec)
    monkeypatch.setattr("internlm2_graph.quantize.CHUNK_ELEMENTS", 7 * 208)
    monkeypatch.setattr("internlm2_graph.quantize.num_threads", lambda: 3)
    chunked = quantize(w, spec)
    for a, b in [(whole.packed, chunked.packed), (whole.scales, chunked.scales)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.zero_points, chunked.zero_points)
    theirs = quantize_ort(w, spec)  # chunked the same way
    np.testing.assert_array_equal(
        codes_and_zero_points(chunked)[0], codes_and_zero_points(theirs)[0]
    )
    np.testing.assert_array_equal(chunked.zero_points, theirs.zero_points)


@pytest.mark.parametrize("accuracy_level", [0, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block_size,n,k", [(16, 24, 200), (32, 40, 96), (128, 8, 300)])
def test_runtime_matmul_matches_dequantized_weight(
    bits, symmetric, accuracy_level, block_size, n, k
):
    """The real ORT CPU kernel, K ragged in two of three shapes (odd k_blocks too)."""
    spec = QuantSpec(
        bits=bits, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level
    )
    rng = np.random.default_rng(bits * 1000 + k)
    q = quantize(make_weight(k, "outliers", n, k, 0.1), spec)
    x = rng.standard_normal((5, k)).astype(np.float32)
    assert excess_error(q, x, run_graph(q, x)) <= 1


def test_flat_scales_are_accepted_too():
    """Older docs give scales as [N * k_blocks]; the CPU kernel reads either shape."""
    q = quantize(make_weight(3, "normal", 16, 64, 1.0), QuantSpec(bits=4, block_size=32))
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    flat = [q.packed, q.scales.reshape(-1)]
    np.testing.assert_array_equal(run_graph(q, x, flat), run_graph(q, x))


# ----------------------------------------------------------------------------- inputs and options


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float64])
def test_other_float_dtypes_quantize_like_their_float32_value(dtype):
    w = make_weight(4, "normal", 33, 160, 1.0).astype(dtype)
    spec = QuantSpec(bits=4, block_size=32, symmetric=False)
    a, b = quantize(w, spec), quantize(w.astype(np.float32), spec)
    np.testing.assert_array_equal(a.packed, b.packed)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.zero_points, b.zero_points)


def test_non_contiguous_input_is_read_correctly():
    w = make_weight(5, "normal", 64, 48, 1.0)
    spec = QuantSpec(bits=4, block_size=16)
    view = np.asfortranarray(w)
    np.testing.assert_array_equal(quantize(view, spec).packed, quantize(w, spec).packed)
    np.testing.assert_array_equal(quantize_ort(view, spec).packed, quantize(w, spec).packed)


def test_nan_is_rejected():
    w = make_weight(6, "normal", 8, 64, 1.0)
    w[5, 7] = np.nan
    with pytest.raises(InternLM2GraphError, match="rows 0..7 contain NaN"):
        quantize(w, QuantSpec())


def test_tiny_blocks_do_not_produce_garbage():
    w = np.zeros((2, 32), np.float32)
    w[0, :16] = 1e-39  # subnormal: 1 / scale overflows
    q = quantize(w, QuantSpec(bits=4, block_size=16, symmetric=False))
    assert np.abs(dequantize(q) - w).max() <= 1e-37


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"block_size": 8}, "int4_block_size"),
        ({"block_size": 48}, "int4_block_size"),
        ({"block_size": 512}, "int4_block_size"),
        ({"bits": 3}, "bits must be 4 or 8"),
        ({"accuracy_level": 5}, "int4_accuracy_level"),
    ],
)
def test_spec_rejects_bad_options(kwargs, option):
    with pytest.raises(ValueError, match=option):
        QuantSpec(**kwargs)


def test_node_attributes_and_inputs():
    spec = QuantSpec(bits=8, block_size=16, symmetric=False, accuracy_level=4)
    q = quantize(make_weight(7, "normal", 6, 40, 1.0), spec)
    expected = {"K": 40, "N": 6, "bits": 8, "block_size": 16, "accuracy_level": 4}
    assert spec.attributes(q.k, q.n) == expected
    b, scales, zp = matmul_nbits_initializers(q, np.float16)
    assert b.shape == (6, 3, 16) and scales.dtype == np.float16 and scales.shape == (6, 3)
    assert zp.shape == (6, 3) and zp.dtype == np.uint8
    sym = quantize(make_weight(7, "normal", 6, 40, 1.0), QuantSpec())
    # 0 means unset to onnxruntime; the graph still says it, explicitly.
    assert sym.spec.attributes(sym.k, sym.n)["accuracy_level"] == 0
    assert len(matmul_nbits_initializers(sym)) == 2  # no zero_points: kernel default midpoint


def test_peak_memory_stays_far_below_the_weight(monkeypatch):
    """Chunked: no whole-weight float32 copy, transposed or widened, ever exists."""
    # Each thread holds a few chunk-sized temporaries; pin the count so the bound is portable.
    monkeypatch.setattr("internlm2_graph.quantize.num_threads", lambda: 2)
    w = (
        np.random.default_rng(8)
        .standard_normal((4096, 4096), np.float32)
        .astype(ml_dtypes.bfloat16)
    )
    tracemalloc.start()
    try:
        q = quantize(w, QuantSpec(bits=4, block_size=32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output = q.packed.nbytes + q.scales.nbytes
    assert peak - output < w.size * 4 / 4  # a quarter of one float32 copy (64 MiB)
