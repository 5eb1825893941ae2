"""calibration/compute.py: calibration's products on onnxruntime give numpy's results (in
another float order), and GPTQ's column loop run there as one graph per lazy batch is gptq's.

onnxruntime's CPU execution provider runs here the very code the GPU machine runs with CUDA;
only the provider name differs.
"""

import numpy as np
import pytest
from helpers import SPECS, calibration_sequences, correlated_inputs

from internlm2_graph.calibration import compute, drivers
from internlm2_graph.calibration import gptq as cal
from internlm2_graph.calibration.recipes import RECIPES
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import QuantSpec
from internlm2_graph.quantize import dequantize, quantize

ORT = compute.OnnxRuntime("CPUExecutionProvider")


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_the_products_are_numpys():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 70)).astype(np.float32)
    w = rng.standard_normal((50, 70)).astype(np.float32)
    a = rng.standard_normal((70, 40)).astype(np.float32)
    assert relative(ORT.linear(x, w), x @ w.T) < 1e-5
    assert relative(ORT.matmul(x, a), x @ a) < 1e-5
    assert relative(ORT.matmul(x, w, transpose_b=True), x @ w.T) < 1e-5
    assert relative(ORT.matmul(x, x, transpose_a=True), x.T @ x) < 1e-5
    assert relative(compute.NUMPY.matmul(x, x, transpose_a=True), x.T @ x) == 0
    assert relative(ORT.gram(x), compute.NUMPY.gram(x)) < 1e-5


def test_the_hessian_factor_is_numpys():
    x = correlated_inputs(0, 1500, 700)  # 700: the recursion splits unevenly, on the device
    hessian = compute.NUMPY.gram(x)
    want = cal.hessian_factor(hessian)
    got = cal.hessian_factor(ORT.gram(x), device=ORT)
    assert np.array_equal(got, np.triu(got))
    assert relative(got, want) < 1e-3


def test_the_float_aims_are_numpys():
    x = correlated_inputs(2, 1500, 600)  # 600: the ridge's Cholesky inverse recurses
    xq = x + 0.05 * correlated_inputs(3, 1500, 600)
    w = np.random.default_rng(4).standard_normal((40, 600)).astype(np.float32)
    gram = compute.NUMPY.gram(xq)
    want = cal.float_aim_map(x, xq, gram)
    assert relative(cal.float_aim_map(x, xq, gram, ORT), want) < 1e-3
    want = cal.float_aim_weight(w, x @ w.T, xq, gram)
    assert relative(cal.float_aim_weight(w, x @ w.T, xq, gram, ORT), want) < 1e-3


def act_order_problem(seed: int, tokens: int, k: int, n: int):
    """Inputs [tokens, k], a weight [n, k] (seed + 1), their Hessian, act_order and factor."""
    x = correlated_inputs(seed, tokens, k)
    weight = np.random.default_rng(seed + 1).standard_normal((n, k)).astype(np.float32)
    hessian = compute.NUMPY.gram(x)
    order = cal.act_order(hessian)
    return x, weight, hessian, order, cal.hessian_factor(hessian, order=order)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_one_batch_on_the_device_is_numpys_byte_for_byte(spec):
    # Within a lazy batch the graph does numpy's float operations in numpy's order.
    x, weight, hessian, order, factor = act_order_problem(5, 1024, 128, 80)
    importance = np.diagonal(hessian).copy()
    want = cal.gptq(weight, factor, spec, order, importance)
    got = cal.gptq(weight, factor, spec, order, importance, device=ORT)
    assert np.array_equal(got.packed, want.packed)
    assert np.array_equal(got.scales, want.scales)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_gptq_on_the_device_is_gptq(spec):
    # 640 columns: five lazy batches, four right-looking updates in another float order.
    x, weight, _, order, factor = act_order_problem(2, 2048, 640, 96)
    on_host = dequantize(cal.gptq(weight, factor, spec, order))
    on_device = dequantize(cal.gptq(weight, factor, spec, order, device=ORT))
    # Static grids: the same scales; a value on a rounding tie may go the other way, and its
    # error then feeds forward.
    assert np.mean(on_host == on_device) > 0.98

    def output_error(restored):
        return np.linalg.norm(x @ (restored - weight).T)

    rtn = output_error(dequantize(quantize(weight, spec)))
    assert output_error(on_device) == pytest.approx(output_error(on_host), rel=0.02)
    assert output_error(on_device) <= 0.9 * rtn


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_the_searched_grids_on_the_device_are_numpys(spec):
    k, n, bs = 256, 96, spec.block_size
    rng = np.random.default_rng(6)
    wt = (rng.standard_t(3, (k, n)) * 0.02).astype(np.float32)  # heavy tails: clipping pays
    importance = np.abs(correlated_inputs(7, 64, k)).mean(axis=0).astype(np.float32)
    qmax = (1 << spec.bits) - 1
    want = [
        cal.searched_grid(wt[b : b + bs], spec, importance[b : b + bs]) for b in range(0, k, bs)
    ]
    scales, zero_points = ORT.searched_grids(
        wt, importance, bs, qmax, spec.symmetric, cal.search_candidates(spec)
    )
    assert np.mean(scales == np.stack([w[0] for w in want])) > 0.99
    assert np.mean(zero_points == np.stack([w[1] for w in want])) > 0.99
    for i, b in enumerate(range(0, k, bs)):  # where they differ: a tie to float precision
        block, imp = wt[b : b + bs], importance[b : b + bs]
        mine = cal.grid_error(block, scales[i], zero_points[i], imp, qmax)
        theirs = cal.grid_error(block, *want[i], imp, qmax)
        np.testing.assert_allclose(mine, theirs, rtol=1e-5)


def test_attention_is_numpys():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 40, 16)).astype(np.float32)
    k, v = rng.standard_normal((2, 2, 40, 16)).astype(np.float32)
    want = compute.NUMPY.attention(q, k, v)
    assert relative(ORT.attention(q, k, v), want) < 1e-5
    # Causal: the first position attends to itself only.
    np.testing.assert_allclose(want[:, :, 0], np.broadcast_to(v[:, None, 0], (2, 3, 16)))


@pytest.mark.parametrize("algorithm", ["gptq", "gptaq"])
def test_a_model_calibrated_on_the_device_is_the_numpy_one(tiny_checkpoint, tmp_path, algorithm):
    config = InternLM2Config.from_dir(tiny_checkpoint)
    sequences = calibration_sequences(tiny_checkpoint, 512)
    spec = QuantSpec(bits=4, block_size=32, symmetric=True)
    results = {}
    for device in (compute.NUMPY, ORT):
        (tmp_path / device.name).mkdir()
        results[device.name] = drivers.gptq_model(
            Checkpoint(tiny_checkpoint), config, sequences, spec, spec,
            tmp_path / device.name, recipe=RECIPES[algorithm], device=device,
        )  # fmt: skip
    mine, theirs = results["onnxruntime"], results["numpy"]
    assert mine.paths == theirs.paths and "output" in mine
    for path in mine.paths:
        k = config.hidden_size if "w2" not in path else config.intermediate_size
        q, want = (r.load(path, k, spec) for r in (mine, theirs))
        a, b = dequantize(q), dequantize(want)
        if algorithm == "gptq":
            assert np.mean(np.isclose(a, b, rtol=1e-4, atol=0)) > 0.95, path
            continue
        # GPTAQ's weights move with the float order of their solve, so the grids move too:
        # weights land within one grid step of numpy's; the first linear (same inputs) nearly
        # all, the later ones as the two streams' inputs drift apart (a tiny model's 267 tokens).
        step = np.repeat(np.abs(want.scales.reshape(len(b), -1)), spec.block_size, axis=1)
        close = np.mean(np.abs(a - b) <= 1.01 * step[:, : b.shape[1]])
        assert close > (0.99 if path == "model.layers.0.attention.wqkv" else 0.9), path


def test_a_cpu_build_calibrates_in_numpy():
    assert compute.for_execution_provider("cpu") is compute.NUMPY
    # This machine's onnxruntime has no CUDA: a CUDA build calibrates in numpy too.
    assert compute.for_execution_provider("cuda") is compute.NUMPY
