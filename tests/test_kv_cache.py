"""Quantized KV caches (kv_cache_quant_scheme): the graph, the scales, and what they cost.

onnxruntime's CPU GroupQueryAttention runs int8 and int4 caches, so the mechanics are tested
here; teacher-forced logits are compared with the float cache's, fed one token at a time so
that every step reads the quantized cache back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from internlm2_graph import build
from internlm2_graph.cli import main
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.kv_scales import attention_path, scale_file, scales_from_thresholds, thresholds
from internlm2_graph.precision import KVCacheSpec, resolve_target
from internlm2_graph.reference import Reference
from internlm2_graph.verify import og_greedy

IDS = np.array([1, *np.random.default_rng(1).integers(3, 1000, 96)])


def reference_kv(checkpoint, ids) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each layer's keys (before rotary) and values [tokens, kv_heads, head_dim] from the
    independent reference, by reading its wqkv output in InternLM2's grouped layout."""
    reference = Reference(checkpoint)
    group = reference.heads // reference.kv_heads
    captured, linear = {}, reference.linear

    def spy(x, name):
        y = linear(x, name)
        if name.endswith("attention.wqkv"):
            grouped = y.reshape(len(x), reference.kv_heads, group + 2, reference.d)
            captured[int(name.split(".")[2])] = (grouped[:, :, group], grouped[:, :, group + 1])
        return y

    reference.linear = spy
    reference.forward(ids)
    return captured


@pytest.fixture(scope="module")
def scale_files(tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    """A scale file per scheme, from the reference's keys and values on IDS."""
    folder = tmp_path_factory.mktemp("kv-scales")
    kv = reference_kv(tiny_checkpoint, IDS)
    files = {}
    for scheme in ("int8_per_channel", "int8_per_tensor", "int4_per_channel", "int4_per_tensor"):
        spec = KVCacheSpec(*scheme.split("_", 1))
        scales = {
            attention_path(layer): scales_from_thresholds(*thresholds(k, v), spec)
            for layer, (k, v) in kv.items()
        }
        path = folder / f"{scheme}.json"
        path.write_text(json.dumps(scale_file(scales, spec)))
        files[scheme] = str(path)
    return files


def teacher_forced(folder) -> np.ndarray:
    from internlm2_graph.evaluate import Decoder

    return Decoder(folder).logits(IDS, chunk=1)


@pytest.mark.model
@pytest.mark.parametrize(
    "scheme, tolerance",
    # Of logits ~10 in size (random weights amplify): int8 keeps ~7 bits of each key and
    # value, int4 ~3. Measured: medians 0.041, 0.052, 0.67; maxima 0.10, 0.13, 2.0.
    [("int8_per_channel", 0.2), ("int8_per_tensor", 0.2), ("int4_per_channel", 3.0)],
)
def test_quantized_cache_follows_the_float_one(
    scheme, tolerance, tiny_checkpoint, tiny_fp32, scale_files, tmp_path
):
    options = {"kv_cache_quant_scheme": scheme, "kv_cache_scale_file": scale_files[scheme]}
    build(tiny_checkpoint, tmp_path / "m", "fp32", "cpu", options)
    errors = np.abs(teacher_forced(tmp_path / "m") - teacher_forced(tiny_fp32)).max(axis=-1)
    assert np.median(errors) < tolerance / 3 and errors.max() < tolerance


@pytest.mark.model
def test_cache_tensors_are_codes_of_the_scheme(tiny_checkpoint, scale_files, tmp_path):
    options = {"kv_cache_quant_scheme": "int4_per_channel"}
    options["kv_cache_scale_file"] = scale_files["int4_per_channel"]
    build(tiny_checkpoint, tmp_path / "m", "fp32", "cpu", options)
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.UINT8  # two int4 codes a byte
    assert past.type.tensor_type.shape.dim[-1].dim_value == 16 // 2
    node = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["k_quant_type"] == b"PER_CHANNEL" and attributes["kv_cache_bit_width"] == 4


@pytest.mark.model
def test_runtime_and_chat_run_a_quantized_cache(tiny_checkpoint, scale_files, tmp_path, capsys):
    options = {"kv_cache_quant_scheme": "int8_per_channel"}
    options["kv_cache_scale_file"] = scale_files["int8_per_channel"]
    build(tiny_checkpoint, tmp_path / "m", "fp32", "cpu", options)
    (tokens,), _ = og_greedy(tmp_path / "m", [list(IDS[:9])], 8)
    assert len(tokens) >= 1
    assert main(["chat", str(tmp_path / "m"), "--prompt", "Hi", "--max-new-tokens", "4"]) == 0


def test_an_int8_file_serves_int4_through_its_qmax(tiny_checkpoint, scale_files, tmp_path):
    """Scale files carry the qmax they were made for; another scheme's is rescaled."""
    from internlm2_graph.config import InternLM2Config
    from internlm2_graph.kv_scales import read_scale_file

    config = InternLM2Config.from_dir(tiny_checkpoint)
    int8 = read_scale_file(
        scale_files["int8_per_channel"], KVCacheSpec("int8", "per_channel"), config, "model"
    )
    int4 = read_scale_file(
        scale_files["int8_per_channel"], KVCacheSpec("int4", "per_channel"), config, "model"
    )
    for path, (k, v) in int8.items():
        np.testing.assert_allclose(int4[path][0], k * 16, rtol=1e-6)
        np.testing.assert_allclose(int4[path][1], v * 16, rtol=1e-6)


@given(
    st.integers(0, 2**31 - 1),
    st.floats(0, 1e6, allow_nan=False),
)
def test_key_thresholds_hold_at_every_rotation(seed, angle_scale):
    """Rotary turns each channel pair by a position-dependent angle: the pair-norm threshold
    bounds every channel after any rotation, however long the context."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((20, 2, 8)) * rng.uniform(0.1, 10, (1, 2, 8))
    k_threshold, _ = thresholds(keys, keys)
    angles = rng.uniform(0, angle_scale, (20, 1, 4))
    half = np.split(keys, 2, axis=-1)
    rotated = np.concatenate(
        [half[0] * np.cos(angles) - half[1] * np.sin(angles),
         half[1] * np.cos(angles) + half[0] * np.sin(angles)], axis=-1,
    )  # fmt: skip
    assert (np.abs(rotated).max(axis=0).reshape(-1) <= k_threshold * (1 + 1e-12)).all()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kv_cache_quant_scheme": "int8_per_token"}, "per-token scales are not in onnxruntime"),
        ({"kv_cache_quant_scheme": "int3_per_channel"}, "use none or one of int8_per_tensor"),
        ({"kv_cache_quant_scheme": "fp8_per_channel"}, "cpu GroupQueryAttention has no fp8"),
        ({"kv_cache_scale_file": "x.json"}, "kv_cache_scale_file needs kv_cache_quant_scheme"),
    ],
)
def test_unrunnable_schemes_are_refused(options, message):
    with pytest.raises(InternLM2GraphError, match=message):
        resolve_target("fp32", "cpu", options)


def test_fp8_is_accepted_on_cuda():
    assert resolve_target("fp16", "cuda", {"kv_cache_quant_scheme": "fp8_per_tensor"}).kv_cache


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("{", "not a JSON scale file"),
        ({"k_scales": []}, 'expected {"scales"'),
        ({"scales": {"k_scales": [[1.0]], "v_scales": [[1.0]]}}, "but the model has 2 layers"),
        ({"scales": {"k_scales": [[1.0]] * 2, "v_scales": [[1.0]] * 2}}, "needs 32"),
        ({"scales": {"k_scales": [[0.0] * 32] * 2, "v_scales": [[1.0] * 32] * 2}}, "positive"),
        (
            {"scales": {"k_scales": [[1.0] * 32] * 2, "v_scales": [[1.0] * 32] * 2}, "qmax": -1},
            "qmax",
        ),
    ],
)
def test_bad_scale_files_are_one_line(content, message, tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "scales.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    options = ["kv_cache_quant_scheme=int8_per_channel", f"kv_cache_scale_file={path}"]
    code = main(
        ["-i", str(tiny_checkpoint), "-o", str(tmp_path / "out"), "-q", "--extra_options", *options]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert "kv_cache_scale_file" in err and not (tmp_path / "out").exists()


@pytest.mark.model
def test_the_scales_are_what_the_kernel_uses(tiny_checkpoint, tiny_fp32, scale_files, tmp_path):
    """Coarser scales (x8) cost more: the scale inputs reach the kernel."""
    data = json.loads(Path(scale_files["int8_per_tensor"]).read_text())
    for side in ("k_scales", "v_scales"):
        data["scales"][side] = [[8 * s for s in layer] for layer in data["scales"][side]]
    (tmp_path / "coarse.json").write_text(json.dumps(data))
    errors = {}
    for name, path in (
        ("fine", scale_files["int8_per_tensor"]),
        ("coarse", tmp_path / "coarse.json"),
    ):
        options = {"kv_cache_quant_scheme": "int8_per_tensor", "kv_cache_scale_file": str(path)}
        build(tiny_checkpoint, tmp_path / name, "fp32", "cpu", options)
        diff = np.abs(teacher_forced(tmp_path / name) - teacher_forced(tiny_fp32))
        errors[name] = float(np.median(diff.max(axis=-1)))
    assert errors["coarse"] > 3 * errors["fine"]


def test_scales_calibrated_in_the_build_are_the_reference_ones(tiny_checkpoint):
    """Without a scale file the build runs the float model over calibration text, a layer at a
    time: its scales equal those from the independent reference's keys and values."""
    from internlm2_graph.calibration.kv import calibrate_kv_cache
    from internlm2_graph.checkpoint import Checkpoint
    from internlm2_graph.config import InternLM2Config

    spec = KVCacheSpec("int8", "per_channel")
    config = InternLM2Config.from_dir(tiny_checkpoint)
    got = calibrate_kv_cache(Checkpoint(tiny_checkpoint), config, [IDS], spec)
    for layer, (k, v) in reference_kv(tiny_checkpoint, IDS).items():
        want = scales_from_thresholds(*thresholds(k, v), spec)
        np.testing.assert_allclose(got[attention_path(layer)][0], want[0], rtol=1e-4)
        np.testing.assert_allclose(got[attention_path(layer)][1], want[1], rtol=1e-4)


@pytest.mark.model
def test_one_command_gives_a_quantized_kv_model(tiny_checkpoint, tiny_fp32, tmp_path):
    """kv_cache_quant_scheme alone: scales calibrated on calibration_data (here id lists drawn
    like IDS but others; by default text every Python install ships), no scale file."""
    rng = np.random.default_rng(7)
    ids = [[1, *map(int, rng.integers(3, 1000, 255))] for _ in range(4)]
    (tmp_path / "calibration.json").write_text(json.dumps(ids))
    options = {"kv_cache_quant_scheme": "int8_per_channel"}
    options["calibration_data"] = str(tmp_path / "calibration.json")
    build(tiny_checkpoint, tmp_path / "m", "fp32", "cpu", options)
    errors = np.abs(teacher_forced(tmp_path / "m") - teacher_forced(tiny_fp32)).max(axis=-1)
    assert np.median(errors) < 0.1 and errors.max() < 0.4  # other tokens: a few values clip
    default = {"kv_cache_quant_scheme": "int8_per_tensor"}  # the default text, tokenized
    build(tiny_checkpoint, tmp_path / "d", "fp32", "cpu", default)
    assert (tmp_path / "d" / "model.onnx").is_file()


def test_calibration_data_needs_something_to_calibrate(tmp_path):
    with pytest.raises(InternLM2GraphError, match="calibration_data only applies"):
        resolve_target("int4", "cpu", {"calibration_data": "x.txt"})
    options = {"kv_cache_quant_scheme": "int8_per_tensor", "kv_cache_scale_file": "s.json"}
    with pytest.raises(InternLM2GraphError, match="calibration_data only applies"):
        resolve_target("int4", "cpu", {**options, "calibration_data": "x.txt"})
