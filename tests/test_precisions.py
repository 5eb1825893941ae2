"""fp16, int4, int8 on CPU against the reference; what cannot run is refused with advice.

int4/int8 are checked two ways. Exactly: against the reference run on the same dequantized
weights, which catches any packing, scale or zero-point mistake down to fp32 rounding. And by
a statistic against the fp32 model, which shows how much quantization itself costs.
"""

import json

import numpy as np
import onnx
import pytest

from internlm2_graph import InternLM2GraphError, build
from internlm2_graph.precision import resolve_target
from internlm2_graph.reference import Reference, quantized_reference
from internlm2_graph.verify import eos_ids, og_greedy

PROMPT = [1, 17, 230, 5, 981, 44, 12, 600, 73]
STEPS = 6


def run(model_dir, steps=STEPS):
    (tokens,), logits = og_greedy(model_dir, [PROMPT], steps)
    return tokens, [step[0].astype(np.float64) for step in logits]


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.model
@pytest.mark.parametrize(
    "precision, options",
    [
        ("int4", ["int4_accuracy_level=0"]),
        ("int4", ["int4_accuracy_level=0", "int4_is_symmetric=false", "int4_block_size=16"]),
        ("int4", ["int4_accuracy_level=0", "int4_block_size=128", "lm_head_precision=float"]),
        ("int8", ["int4_accuracy_level=0"]),
        ("int8", ["int4_accuracy_level=0", "int4_is_symmetric=false"]),
    ],
)
def test_quantized_graph_computes_exactly_with_its_dequantized_weights(
    tiny_checkpoint, tmp_path, precision, options
):
    build(tiny_checkpoint, tmp_path / "m", precision, "cpu", options)
    target = resolve_target(precision, "cpu", dict(o.split("=") for o in options))
    expected_tokens, expected = quantized_reference(tiny_checkpoint, target).greedy(
        PROMPT, STEPS, eos_ids(tmp_path / "m")
    )
    tokens, logits = run(tmp_path / "m")
    errors = [np.max(np.abs(g - w)) for g, w in zip(logits, expected)]
    assert max(errors) <= 1e-4, errors
    assert tokens == expected_tokens


@pytest.mark.model
def test_int4_accuracy_level_4_quantizes_activations_within_int8_error(tiny_checkpoint, tmp_path):
    # Level 4 (the cpu default) rounds activations to int8 per block: relative error of order
    # 1/127 per product, a few percent of the logit range after a couple of layers.
    build(tiny_checkpoint, tmp_path / "m", "int4", "cpu")
    target = resolve_target("int4", "cpu")
    assert target.quant.accuracy_level == 4
    expected, _ = quantized_reference(tiny_checkpoint, target).forward(PROMPT)
    _, logits = run(tmp_path / "m", steps=1)
    scale = np.max(np.abs(expected[-1]))
    assert np.max(np.abs(logits[0] - expected[-1])) <= 0.05 * scale
    assert cosine(logits[0], expected[-1]) >= 0.999


@pytest.mark.model
def test_fp16_is_within_half_precision_rounding(tiny_checkpoint, tmp_path):
    # fp16 keeps 11 significant bits (unit roundoff 4.9e-4). Weights convert from bf16 exactly;
    # rounding of activations through ~20 ops per layer leaves a few 1e-3 of the logit range.
    build(tiny_checkpoint, tmp_path / "m", "fp16", "cpu")
    expected_tokens, expected = Reference(tiny_checkpoint).greedy(
        PROMPT, STEPS, eos_ids(tmp_path / "m")
    )
    tokens, logits = run(tmp_path / "m")
    for got, want in zip(logits, expected):
        assert np.max(np.abs(got - want)) <= 5e-3 * np.max(np.abs(want))
    assert tokens == expected_tokens


@pytest.mark.model
@pytest.mark.parametrize("precision, min_cosine", [("int8", 0.999), ("int4", 0.9)])
def test_quantization_cost_against_fp32(tiny_checkpoint, tmp_path, precision, min_cosine):
    """A swapped scale or nibble order drives the cosine towards 0; quantization noise does not."""
    build(tiny_checkpoint, tmp_path / "m", precision, "cpu", ["int4_accuracy_level=0"])
    expected, _ = Reference(tiny_checkpoint).forward(PROMPT)
    _, logits = run(tmp_path / "m", steps=1)
    assert cosine(logits[0], expected[-1]) >= min_cosine


@pytest.mark.parametrize(
    "precision, provider, advice",
    [
        ("bf16", "cpu", "use fp32 \\(exact\\) or int4"),
        ("fp32", "cuda", "use fp16, bf16 or int4 on cuda"),
    ],
)
def test_combinations_that_cannot_run_are_refused(precision, provider, advice):
    with pytest.raises(InternLM2GraphError, match=advice):
        resolve_target(precision, provider)


@pytest.mark.model
@pytest.mark.parametrize(
    "precision, options, io_type",
    [
        ("fp16", [], onnx.TensorProto.FLOAT16),
        ("bf16", [], onnx.TensorProto.BFLOAT16),
        ("int4", [], onnx.TensorProto.FLOAT16),
        ("int4", ["use_cuda_bf16=true"], onnx.TensorProto.BFLOAT16),
    ],
)
def test_cuda_builds_use_half_precision_io_and_cuda_settings(
    tiny_checkpoint, tmp_path, precision, options, io_type
):
    """CI has no GPU: check the CUDA builds' structure here; the device runs check numbers."""
    build(tiny_checkpoint, tmp_path / "m", precision, "cuda", options)
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    values = [*model.graph.input[2:], *model.graph.output]  # past/present KV and logits
    assert {v.type.tensor_type.elem_type for v in values} == {io_type}
    ops = {node.op_type for node in model.graph.node}
    assert "GroupQueryAttention" in ops
    assert ("MatMulNBits" in ops) == (precision == "int4")
    genai = json.loads((tmp_path / "m" / "genai_config.json").read_text())
    (provider,) = genai["model"]["decoder"]["session_options"]["provider_options"]
    assert "cuda" in provider
