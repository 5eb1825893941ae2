"""GPTQ and GPTAQ (calibration/gptq.py, drivers.py), calibration data (data.py): the
MatMulNBits layout, less output error than RTN, builds, bad input.

The oracle for "better" is the quantity GPTQ minimises, the error of a layer's output on its
calibration inputs, and, for whole builds, the KL divergence of the built folder's logits to
the fp32 reference on text that calibration did not see.
"""

import ast
import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import SPECS, calibration_sequences, correlated_inputs, session_logits
from hypothesis import example, given
from hypothesis import strategies as st

from internlm2_graph import InternLM2GraphError, build
from internlm2_graph.calibration.compute import NUMPY
from internlm2_graph.calibration.data import default_text, docstrings
from internlm2_graph.calibration.gptq import (
    act_order,
    block_grid,
    float_aim_map,
    float_aim_weight,
    gptq,
    hessian_factor,
    searched_grid,
)
from internlm2_graph.calibration.recipes import RECIPES, recipe_for
from internlm2_graph.config import InternLM2Config
from internlm2_graph.quantize import dequantize, quantize
from internlm2_graph.reference import Reference

# --- the algorithm ---------------------------------------------------------------------------


@given(
    spec=st.sampled_from(SPECS),
    n=st.integers(1, 24),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
@example(spec=SPECS[1], n=3, k=48, seed=0)  # odd number of blocks: the spare zero-point nibble
def test_with_a_diagonal_hessian_gptq_is_round_to_nearest_byte_for_byte(spec, n, k, seed):
    # No correlation between inputs means no error to feed forward: GPTQ must then write
    # exactly quantize()'s bytes, which pins its grid, rounding, padding and packing.
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    factor = hessian_factor(np.diag(rng.uniform(0.5, 2.0, k)))
    got, want = gptq(weight, factor, spec), quantize(weight, spec)
    assert np.array_equal(got.packed, want.packed)
    assert np.array_equal(got.scales, want.scales)
    if spec.symmetric:
        assert got.zero_points is None
    else:
        assert np.array_equal(got.zero_points, want.zero_points)


def test_hessian_factor_is_the_upper_cholesky_factor_of_the_dampened_inverse():
    x = correlated_inputs(0, 1200, 700).astype(np.float64)  # 700: the recursion splits unevenly
    hessian = x.T @ x
    factor = hessian_factor(hessian, damp=0.01).astype(np.float64)
    dampened = hessian + 0.01 * np.mean(np.diag(hessian)) * np.eye(len(hessian))
    inverse = np.linalg.inv(dampened)
    assert np.array_equal(factor, np.triu(factor))
    assert np.max(np.abs(factor.T @ factor - inverse)) <= 1e-5 * np.max(np.abs(inverse))


@pytest.mark.parametrize("ordered", [False, True], ids=["in order", "act_order"])
def test_a_consumed_hessian_gives_the_same_factor_byte_for_byte(ordered):
    # consume: permuted and reversed in place rather than copied (the build's peak memory).
    hessian = NUMPY.gram(correlated_inputs(2, 1500, 701))  # odd: a middle row
    order = act_order(hessian) if ordered else None
    want = hessian_factor(hessian, order=order)
    assert np.array_equal(hessian_factor(hessian.copy(), order=order, consume=True), want)


def test_a_dead_input_does_not_break_the_factor():
    x = correlated_inputs(1, 300, 64)
    x[:, 5] = 0  # an input that never fires
    factor = hessian_factor(x.T @ x)
    assert np.isfinite(factor).all()


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("ordered", [False, True], ids=["in order", "act_order"])
def test_gptq_lowers_the_layer_output_error_of_round_to_nearest(spec, ordered):
    x = correlated_inputs(2, 2048, 256)
    weight = np.random.default_rng(3).standard_normal((96, 256)).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    order = act_order(hessian) if ordered else None
    q = gptq(weight, hessian_factor(hessian, order=order), spec, order)
    assert q.packed.shape == quantize(weight, spec).packed.shape

    def output_error(restored):
        return np.linalg.norm(x @ (restored - weight).T)

    rtn = output_error(dequantize(quantize(weight, spec)))
    calibrated = output_error(dequantize(q))
    assert calibrated <= 0.9 * rtn, (calibrated, rtn)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_the_searched_grid_never_rounds_worse_than_the_range_grid(spec):
    rng = np.random.default_rng(4)
    block = (rng.standard_t(3, (spec.block_size, 500))).astype(np.float32)  # heavy tails
    importance = rng.uniform(0.1, 10, spec.block_size).astype(np.float32)
    qmax = (1 << spec.bits) - 1

    def error(scale, zp):
        codes = np.clip(np.floor(block / scale + zp + 0.5), 0, qmax)
        return importance @ ((codes - zp) * scale - block) ** 2

    plain, searched = (
        error(*block_grid(block, spec)),
        error(*searched_grid(block, spec, importance)),
    )
    assert (searched <= plain * (1 + 1e-5)).all()
    if spec.bits == 4:
        assert searched.sum() < 0.95 * plain.sum()  # heavy tails: clipping pays
    zp = searched_grid(block, spec, importance)[1]
    assert ((zp == np.round(zp)) & (zp >= 0) & (zp <= qmax)).all()  # a storable zero point


def test_float_aim_map_is_the_identity_when_the_inputs_agree():
    x = correlated_inputs(5, 1024, 96)
    got = float_aim_map(x, x, x.T @ x)
    np.testing.assert_allclose(got, np.eye(96), atol=1e-4)


def test_without_ridge_gptq_of_the_float_aim_minimises_the_error_to_the_float_output():
    # |X W^T - X~ Q^T|^2 = |X W^T - X~ W*^T|^2 + |X~ (W* - Q)^T|^2 for every Q: the error to
    # the float output is GPTQ's own objective on W* plus a constant.
    x = correlated_inputs(6, 2048, 64).astype(np.float64)
    drift = np.eye(64) + 0.1 * np.random.default_rng(7).standard_normal((64, 64))
    xq = x @ drift + 0.05 * correlated_inputs(8, 2048, 64)  # earlier layers' error
    w = np.random.default_rng(9).standard_normal((12, 64))
    w_star = w @ float_aim_map(x, xq, xq.T @ xq, ridge=1e-9).T
    for q in (w, np.round(w * 4) / 4, np.zeros_like(w)):
        whole = np.sum((x @ w.T - xq @ q.T) ** 2)
        parts = np.sum((x @ w.T - xq @ w_star.T) ** 2) + np.sum((xq @ (w_star - q).T) ** 2)
        assert abs(whole - parts) <= 1e-6 * whole


def test_the_float_aim_hands_the_gram_matrix_back_as_it_was():
    x = correlated_inputs(3, 2048, 600)  # 600: its Cholesky inverse recurses
    xq = x + 0.05 * correlated_inputs(4, 2048, 600)
    gram = NUMPY.gram(xq)
    before = gram.copy()
    float_aim_map(x, xq, gram)
    float_aim_weight(np.ones((8, 600), np.float32), x[:, :8], xq, gram)
    assert np.array_equal(gram, before)  # GPTQ's own factor is taken from it next


def test_the_float_aim_from_outputs_is_the_float_aim_from_inputs():
    # w2's route (N < K): the float model's outputs X W^T and N right-hand sides.
    x = correlated_inputs(12, 2048, 96).astype(np.float64)
    rng = np.random.default_rng(13)
    drift = np.eye(96) + 0.05 * rng.standard_normal((96, 96))
    xq = x @ drift + 0.02 * rng.standard_normal(x.shape)
    w = rng.standard_normal((24, 96))
    gram = xq.T @ xq
    from_inputs = w @ float_aim_map(x, xq, gram).T
    from_outputs = float_aim_weight(w, x @ w.T, xq, gram)
    # Numpy.gram sums in float32: equal to float32's precision.
    assert np.abs(from_outputs - from_inputs).max() <= 1e-5 * np.abs(from_inputs).max()
    assert np.abs(from_inputs - w).max() > 1e-2  # the inputs differ: a real map


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
def test_gptq_of_the_float_aim_is_closer_to_the_float_output(spec):
    x = correlated_inputs(10, 2048, 256)
    rng = np.random.default_rng(11)
    xq = (x @ (np.eye(256) + 0.05 * rng.standard_normal((256, 256)))).astype(np.float32)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    gram = xq.T @ xq
    order = act_order(gram)
    factor = hessian_factor(gram, order=order)

    def error(rounded):
        q = dequantize(gptq(rounded, factor, spec, order))
        return np.linalg.norm(x @ w.T - xq @ q.T)

    assert error(w @ float_aim_map(x, xq, gram).T) < 0.9 * error(w)


# --- calibration data ------------------------------------------------------------------------


def test_default_calibration_text_is_prose_from_this_python(tiny_checkpoint):
    text = default_text()
    assert len(text) > 100_000 and text == default_text()  # the same text every time
    config = InternLM2Config.from_dir(tiny_checkpoint)
    sequences = calibration_sequences(tiny_checkpoint, 4096)
    assert sum(map(len, sequences)) <= 4096
    everything = calibration_sequences(tiny_checkpoint, 1 << 30)
    assert sequences[-1].tolist() == everything[-1].tolist()  # spread over the whole text
    assert all(s[0] == config.bos_token_id for s in sequences)
    assert all(len(s) <= config.max_position_embeddings for s in sequences)


def test_default_calibration_prose_takes_every_docstring_in_order():
    tree = ast.parse('"""Module."""\nclass A:\n    """Class."""\n    def f(self):\n'
                     '        """Method."""\ndef g():\n    pass\n')  # fmt: skip
    assert docstrings(tree) == "Module.\n\nClass.\n\nMethod."


def test_calibration_data_as_token_id_lists(tiny_checkpoint, tmp_path):
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([[1, 5, 6, 7], list(range(1, 600))]))
    sequences = calibration_sequences(tiny_checkpoint, 8192, str(path))
    assert [len(s) for s in sequences] == [4, 256, 256, 87]  # cut to the context length
    assert sequences[0].tolist() == [1, 5, 6, 7]


# --- whole builds ----------------------------------------------------------------------------


def mean_kl(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """KL(reference || other) per token, averaged."""

    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    kls = [
        (np.exp(log_softmax(p)) * (log_softmax(p) - log_softmax(q))).sum(axis=-1)
        for p, q in zip(reference, other)
    ]
    return float(np.mean(np.concatenate(kls)))


@pytest.fixture(scope="module")
def split_text(tiny_checkpoint, tmp_path_factory):
    """Calibration and evaluation text from different parts of the default text."""
    sequences = calibration_sequences(tiny_checkpoint, 1 << 20)
    calibration = tmp_path_factory.mktemp("calibration") / "ids.json"
    calibration.write_text(json.dumps([s.tolist() for s in sequences[:16]]))
    return calibration, sequences[-4:]


@pytest.mark.model
@pytest.mark.parametrize(
    "options, algorithm",
    [
        (["block_size=32"], "gptq"),
        (["block_size=16", "is_symmetric=false"], "gptq"),
        (["block_size=64", "lm_head_precision=int8"], "gptq"),
        (["block_size=32"], "gptaq"),
        (["block_size=64", "lm_head_precision=int8"], "gptaq"),
        # tensor_precision: each linear calibrated in its own format
        (
            [
                "embedding_precision=int8",
                "tensor_precision=feed_forward.w2@1:int8,attention.wqkv@0:int4-b16-asym",
            ],
            "gptaq",
        ),  # fmt: skip
    ],
)
def test_a_gptq_build_runs_and_is_closer_to_fp32_than_round_to_nearest(
    tiny_checkpoint, split_text, tmp_path, options, algorithm
):
    calibration, held_out = split_text
    base = ["accuracy_level=0", *options]
    build(tiny_checkpoint, tmp_path / "rtn", "int4", "cpu", base)
    build(
        tiny_checkpoint,
        tmp_path / "gptq",
        "int4",
        "cpu",
        [*base, f"algo_config={algorithm}", f"calibration_data={calibration}"],
    )
    reference = Reference(tiny_checkpoint)
    fp32 = [reference.forward(ids)[0] for ids in held_out]
    rtn = [session_logits(tmp_path / "rtn", ids) for ids in held_out]
    calibrated = [session_logits(tmp_path / "gptq", ids) for ids in held_out]
    assert mean_kl(fp32, calibrated) < mean_kl(fp32, rtn)
    # Same layout as RTN: same initializers, shapes and MatMulNBits attributes.
    assert sorted(p.name for p in (tmp_path / "gptq").iterdir()) == sorted(
        p.name for p in (tmp_path / "rtn").iterdir()
    )


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, options, message",
    [
        ("fp16", ["algo_config=gptq"], "algo_config only apply to --precision int4/int8"),
        ("int4", ["algo_config=awq2"], "algo_config='awq2': use one of rtn, gptq, gptaq, awq"),
        ("int4", ["calibration_data=x.txt"], "calibration_data only applies with algo_config="),
        ("int4", ["algo_config=gptq", "calibration_data=/no/such.txt"], "no such file"),
    ],
)
def test_bad_calibration_options_fail_before_writing(
    tiny_checkpoint, tmp_path, precision, options, message
):
    with pytest.raises(InternLM2GraphError, match=message):
        build(tiny_checkpoint, tmp_path / "out", precision, "cpu", options)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "  \n", "the file is empty"),
        ("ids.json", "[[1, 5, 99999]]", "id 99999 in list 0 is outside the vocabulary"),
        ("neg.json", "[[1, -3]]", "id -3 in list 0 is outside the vocabulary"),
        ("flat.json", "[1, 2, 3]", "expected a JSON list of non-empty lists of token ids"),
        ("broken.json", "[[1, 2", "not valid JSON"),
    ],
)
def test_bad_calibration_data_is_one_line_naming_the_option(
    tiny_checkpoint, tmp_path, name, content, message
):
    data = tmp_path / "data"
    data.mkdir()
    (data / name).write_text(content)
    options = ["algo_config=gptq", f"calibration_data={data / name}"]
    with pytest.raises(InternLM2GraphError, match=message) as info:
        build(tiny_checkpoint, tmp_path / "out", "int4", "cpu", options)
    assert "\n" not in str(info.value) and "calibration_data=" in str(info.value)
    assert not (tmp_path / "out").exists()


# --- recipes ---------------------------------------------------------------------------------


@pytest.mark.model
def test_a_recipe_replaces_the_algo_configs_own(tiny_checkpoint, split_text, tmp_path):
    calibration, _ = split_text
    options = ["algo_config=gptq", f"calibration_data={calibration}"]

    def weights(name, recipe=None):
        build(tiny_checkpoint, tmp_path / name, "int4", "cpu", options, recipe=recipe)
        return (tmp_path / name / "model.onnx.data").read_bytes()

    default = weights("default")
    assert weights("same", recipe_for("gptq")) == default
    assert weights("ablation", replace(recipe_for("gptq"), act_order=False)) != default


@pytest.mark.parametrize(
    "options, recipe, message",
    [
        (["algo_config=gptq"], RECIPES["awq"], "recipe awq does not calibrate algo_config=gptq"),
        (["algo_config=gptaq"], RECIPES["gptq"], "pass algo_config=gptq"),
        ([], RECIPES["gptaq"], "recipe gptaq needs --extra_options algo_config=gptaq"),
    ],
)
def test_a_recipe_of_another_method_fails_before_writing(
    tiny_checkpoint, tmp_path, options, recipe, message
):
    with pytest.raises(InternLM2GraphError, match=message):
        build(tiny_checkpoint, tmp_path / "out", "int4", "cpu", options, recipe=recipe)
    assert list(tmp_path.iterdir()) == []
