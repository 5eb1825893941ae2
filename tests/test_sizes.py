"""Sizes come from the graph a build makes: they agree with what the build writes, and with the
synthetic checkpoint's own tensor list (written independently, the oracle)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from internlm2_graph import build
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import resolve_target, supported_targets
from internlm2_graph.sizes import parameter_breakdown, parameter_count, weight_bytes
from internlm2_graph.synthetic import SIZES, make_config
from internlm2_graph.synthetic.checkpoint import tensor_shapes


@pytest.mark.parametrize("size", sorted(SIZES))
def test_parameters_are_the_checkpoint_tensors(size):
    raw = make_config(size, bias=True) if size == "tiny" else make_config(size)
    expected = sum(int(np.prod(shape)) for shape in tensor_shapes(raw).values())
    assert parameter_count(InternLM2Config.from_dict(raw)) == expected


def test_published_parameter_counts():
    # The numbers in the model cards, from the config alone.
    expected = {"1.8b": 1.89e9, "7b": 7.74e9, "20b": 19.86e9}
    for size, params in expected.items():
        config = InternLM2Config.from_dict(make_config(size))
        assert parameter_count(config) == pytest.approx(params, rel=0.01)
        assert set(parameter_breakdown(config)) == {
            "embedding", "attention", "feed_forward", "norms", "lm_head"
        }  # fmt: skip


@pytest.mark.model
@pytest.mark.parametrize(
    "precision, provider, options",
    [
        ("fp32", "cpu", {}),
        ("int4", "cpu", {"block_size": "16", "is_symmetric": "false"}),
        ("int4", "cuda", {"block_size": "128", "lm_head_precision": "int8"}),
        ("int8", "cpu", {"lm_head_precision": "float"}),
    ],
)
def test_weight_bytes_are_what_the_build_writes(
    precision, provider, options, tiny_checkpoint, tmp_path
):
    """Block size, zero points and lm-head precision all count: the disk estimate is exact."""
    build(tiny_checkpoint, tmp_path / "m", precision, provider, options)
    model = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    written = sum(
        int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )
    config = InternLM2Config.from_dir(tiny_checkpoint)
    assert weight_bytes(config, resolve_target(precision, provider, options)) == written


def test_supported_targets_are_the_pairs_a_build_accepts():
    pairs = {(t.precision, t.execution_provider) for t in supported_targets()}
    assert ("bf16", "cpu") not in pairs and ("fp32", "cuda") not in pairs
    assert len(pairs) == 8
