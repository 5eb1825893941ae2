"""AWQ (calibration/awq.py, drivers.py): folding is exact, the search beats RTN where it must,
the build computes with exactly the folded, rounded weights, and bad input fails as for GPTQ.

The oracle for "better" is what AWQ minimises, a linear's output error on its calibration
inputs; for "exact", a numpy reference holding the weights the build should hold.
"""

import json

import numpy as np
import pytest
from helpers import SPECS, calibration_sequences, session_logits

from internlm2_graph import InternLM2GraphError, build
from internlm2_graph.calibration import awq, drivers
from internlm2_graph.calibration.forward import Batch, LayerWeights, decoder_layer, embed
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import QuantSpec, resolve_target
from internlm2_graph.quantize import dequantize, quantize
from internlm2_graph.reference import quantized_reference
from internlm2_graph.synthetic import make_config, write_checkpoint


def outlier_inputs(seed: int, tokens: int, k: int) -> np.ndarray:
    """Activations as AWQ finds them in LLMs: a few channels far larger than the rest."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)).astype(np.float32)
    x[:, rng.choice(k, max(1, k // 32), replace=False)] *= 30
    return x


@pytest.fixture(scope="module")
def bias_checkpoint(tmp_path_factory):
    """GQA (2 query heads per KV head) with wqkv and wo biases: every fold AWQ does."""
    config = make_config("tiny", bias=True, max_position_embeddings=256)
    return write_checkpoint(tmp_path_factory.mktemp("bias-ckpt"), config, chat=True, seed=2)


@pytest.fixture(scope="module")
def calibration(bias_checkpoint, tmp_path_factory):
    sequences = calibration_sequences(bias_checkpoint, 1024)
    path = tmp_path_factory.mktemp("awq-data") / "ids.json"
    path.write_text(json.dumps([s.tolist() for s in sequences]))
    return path, sequences


# --- the algorithm ---------------------------------------------------------------------------


def test_folding_the_scales_leaves_the_float_layer_unchanged(bias_checkpoint, calibration):
    config = InternLM2Config.from_dir(bias_checkpoint)
    sequences = calibration[1]
    batch = Batch.of(sequences, config)
    x = embed(Checkpoint(bias_checkpoint), np.concatenate(sequences))
    weights = LayerWeights.read(Checkpoint(bias_checkpoint), config, 0)
    rng = np.random.default_rng(0)
    scales = {}
    for names in awq.GROUPS:
        s = rng.uniform(0.1, 10, weights.linears[names[0]].shape[1]).astype(np.float32)
        scales[names] = awq.tied_per_kv_head(s, config) if names == ("attention.wo",) else s
    folded = awq.fold_scales(weights, scales, config)
    want = decoder_layer(weights, x, batch, weights.as_read)
    got = decoder_layer(folded, x, batch, folded.as_read)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert not np.allclose(folded.attention_norm, weights.attention_norm)  # it did fold


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_awq_lowers_the_output_error_of_round_to_nearest_on_outlier_channels(spec):
    x = outlier_inputs(1, 4096, 256)
    weights = [np.random.default_rng(2).standard_normal((96, 256)).astype(np.float32)]
    rows = awq.search_rows(x)
    s = awq.awq_scales(weights, rows, np.mean(np.abs(x), axis=0), spec)
    (w,) = weights

    def output_error(restored):
        return np.linalg.norm(x @ (restored - w).T)

    rtn = output_error(dequantize(quantize(w, spec)))
    scaled = output_error(dequantize(quantize(w * s, spec)) / s)
    clipped = output_error(dequantize(quantize(awq.awq_clip(w * s, rows / s, spec), spec)) / s)
    assert scaled <= (0.6 if spec.bits == 4 else 0.9) * rtn, (scaled, rtn)
    assert clipped <= scaled * (1 + 1e-5)


def test_search_rows_measure_the_output_error_of_all_tokens():
    x = outlier_inputs(3, 3000, 64)  # more tokens than awq.SEARCH_ROWS: the Gram square root
    d = np.random.default_rng(4).standard_normal((8, 64)).astype(np.float32)
    rows = awq.search_rows(x)
    assert rows.shape == (64, 64)
    want = np.linalg.norm(x.astype(np.float64) @ d.T) ** 2
    assert awq.output_error(d, rows) == pytest.approx(want, rel=1e-4)


# --- whole builds ----------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize(
    "precision, options",
    [
        ("int4", ["block_size=16", "is_symmetric=false"]),
        ("int8", ["block_size=32", "lm_head_precision=int4"]),
    ],
)
def test_an_awq_build_computes_with_its_folded_rounded_weights(
    bias_checkpoint, calibration, tmp_path, precision, options
):
    path, sequences = calibration
    options = ["accuracy_level=0", "algo_config=awq", f"calibration_data={path}", *options]
    build(bias_checkpoint, tmp_path / "awq", precision, "cpu", options)
    # The numpy reference: the same calibration run directly, its rounded linears (the lm_head
    # included) dequantized, its folded norms and biases as they are.
    target = resolve_target(precision, "cpu", dict(o.split("=", 1) for o in options))
    config = InternLM2Config.from_dir(bias_checkpoint)
    (tmp_path / "scratch").mkdir()
    result = drivers.awq_model(
        Checkpoint(bias_checkpoint), config, sequences, target.quant, target.lm_head_quant,
        tmp_path / "scratch",
    )  # fmt: skip
    reference = quantized_reference(bias_checkpoint, target)
    for path_ in result.paths:
        k = reference.w[path_ + ".weight"].shape[1]
        weight = dequantize(result.load(path_, k, target.linear_spec(path_)))
        reference.w[path_ + ".weight"] = weight.astype(np.float64)
    for name in result.floats:
        reference.w[name] = np.asarray(result.load_float(name), np.float64)
    assert any(name.endswith("wqkv.bias") for name in result.floats) and "output" in result
    ids = sequences[0][:40]
    got = session_logits(tmp_path / "awq", ids)
    want = reference.forward(ids)[0]
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))


def test_under_a_quantized_kv_cache_awq_leaves_the_values_alone(
    bias_checkpoint, calibration, tmp_path
):
    # The cache's scales are the float model's values': scaled value rows would overflow them.
    config = InternLM2Config.from_dir(bias_checkpoint)
    options = {"algo_config": "awq", "kv_cache_quant_scheme": "int8_per_channel"}
    target = resolve_target("int4", "cpu", options)
    result = drivers.calibrated_weights(
        Checkpoint(bias_checkpoint), config, calibration[1], target, tmp_path
    )
    assert "model.layers.0.attention_norm.weight" in result.floats
    assert not any(name.endswith("wqkv.bias") for name in result.floats)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, options, message",
    [
        ("fp32", ["algo_config=awq"], "algo_config only apply to --precision int4/int8"),
        ("int4", ["algo_config=awq", "calibration_data=/no/such.txt"], "no such file"),
    ],
)
def test_bad_awq_options_fail_before_writing(
    tiny_checkpoint, tmp_path, precision, options, message
):
    with pytest.raises(InternLM2GraphError, match=message) as info:
        build(tiny_checkpoint, tmp_path / "out", precision, "cpu", options)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_awq_is_on_the_block_grid_of_its_spec():
    spec = QuantSpec(bits=4, block_size=32, symmetric=True)
    w = np.random.default_rng(5).standard_normal((8, 70)).astype(np.float32)  # ragged K
    clipped = awq.awq_clip(w, outlier_inputs(6, 100, 70), spec)
    assert clipped.shape == w.shape and np.all(np.abs(clipped) <= np.abs(w).max())
