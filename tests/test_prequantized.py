"""Published 4-bit checkpoints (AWQ "gemm", GPTQ v1, compressed-tensors pack-quantized) import
code for code: round trips through each format's own unpacking, exact logits against the float
model of the dequantized weights, mixed configs, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from internlm2_graph import build
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.cli import main
from internlm2_graph.prequantized import read_codes, read_layout
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.synthetic.checkpoint import write_safetensors
from internlm2_graph.synthetic.prequantized import (
    act_order_g_idx,
    dequantize_groups,
    pack_awq,
    pack_compressed_tensors,
    pack_gptq,
    write_prequantized,
)

# --- the format authors' unpacking code, ported line by line to numpy ----------------------


def autoawq_dequantize_gemm(qweight, qzeros, scales, bits, group_size):
    """casper-hansen/AutoAWQ awq/utils/packing_utils.py @ 7ee28736ab85f95724eeab2598bf49b13b86439f:
    unpack_awq, reverse_awq_order and dequantize_gemm. Returns [K, N] (AutoAWQ's layout)."""
    awq_reverse_order = [0, 4, 1, 5, 2, 6, 3, 7]
    shifts = np.arange(0, 32, bits, dtype=np.int32)
    iweights = (qweight[:, :, None] >> shifts[None, None, :]).astype(np.int8)
    iweights = iweights.reshape(iweights.shape[0], -1)
    izeros = (qzeros[:, :, None] >> shifts[None, None, :]).astype(np.int8)
    izeros = izeros.reshape(izeros.shape[0], -1)
    reverse_order_tensor = np.arange(izeros.shape[-1], dtype=np.int32)
    reverse_order_tensor = reverse_order_tensor.reshape(-1, 32 // bits)
    reverse_order_tensor = reverse_order_tensor[:, awq_reverse_order].reshape(-1)
    izeros = izeros[:, reverse_order_tensor]
    iweights = iweights[:, reverse_order_tensor]
    iweights = iweights & (2**bits - 1)
    izeros = izeros & (2**bits - 1)
    scales = np.repeat(scales.astype(np.float32), group_size, axis=0)
    izeros = np.repeat(izeros, group_size, axis=0)
    return (iweights.astype(np.float32) - izeros) * scales, iweights


def autogptq_dequantize(qweight, qzeros, scales, g_idx, bits=4):
    """AutoGPTQ/AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py @
    179776bd1d97a2e7f84b72318630f43719647a11, QuantLinear.forward's torch path (zeros + 1,
    shifts by wf); scales and zeros picked per input channel by g_idx as qlinear_cuda.py and
    GPTQModel's torch kernel do for act-order. Returns [K, N] and the codes [K, N]."""
    wf = np.arange(0, 32, bits, dtype=np.int32)[None, :]
    zeros = (np.repeat(qzeros[:, :, None], 32 // bits, axis=2) >> wf[None]).astype(np.int8)
    zeros = zeros & (2**bits - 1)
    zeros = zeros.astype(np.int32) + 1
    zeros = zeros.reshape(zeros.shape[0], zeros.shape[1] * zeros.shape[2])
    weight = (np.repeat(qweight[:, None, :], 32 // bits, axis=1) >> wf[..., None]).astype(np.int8)
    weight = weight & (2**bits - 1)
    weight = weight.reshape(-1, weight.shape[2]).astype(np.int32)
    return scales.astype(np.float32)[g_idx] * (weight - zeros[g_idx]), weight


def compressed_tensors_unpack(value, num_bits, shape, packed_dim=1):
    """neuralmagic/compressed-tensors src/compressed_tensors/compressors/quantized_compressors/
    pack_quantized.py @ 0199c6e7f96f7ac581138849ed8c7140f9842fe1, unpack_from_int32: signed."""
    pack_factor = 32 // num_bits
    mask = (1 << num_bits) - 1
    if packed_dim == 1:
        unpacked = np.zeros((value.shape[0], value.shape[1] * pack_factor), np.int32)
        for i in range(pack_factor):
            unpacked[:, i::pack_factor] = (value >> (num_bits * i)) & mask
        unpacked = unpacked[:, : int(shape[1])]
    else:
        unpacked = np.zeros((value.shape[0] * pack_factor, value.shape[1]), np.int32)
        for i in range(pack_factor):
            unpacked[i::pack_factor, :] = (value >> (num_bits * i)) & mask
        unpacked = unpacked[: int(shape[0]), :]
    offset = pow(2, num_bits) // 2
    return (unpacked - offset).astype(np.int8)


def compressed_tensors_dequantize(packed: dict, group: int, symmetric: bool):
    """The same file's decompress_weight: unpack, then compressed-tensors' dequantize
    ((x_q - zp) * scale, each column's group by g_idx). Returns [N, K]."""
    n, k = packed["weight_shape"]
    q = compressed_tensors_unpack(packed["weight_packed"], 4, (n, k)).astype(np.float32)
    scale = packed["weight_scale"].astype(np.float32)
    zp = np.zeros(scale.shape, np.float32)
    if not symmetric:
        zp = compressed_tensors_unpack(
            packed["weight_zero_point"], 4, (n, scale.shape[1]), packed_dim=0
        ).astype(np.float32)
    g_idx = packed.get("weight_g_idx", np.arange(k) // group)
    return (q - zp[:, g_idx]) * scale[:, g_idx], q


# --- known codes ----------------------------------------------------------------------------


@st.composite
def layers(draw):
    """Codes, zero points and scales of one linear layer, and its g_idx (maybe act-order)."""
    group = draw(st.sampled_from([16, 32, 64]))
    n = 8 * draw(st.integers(1, 6))
    k = group * draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    zeros = rng.integers(1, 16, (n, k // group), dtype=np.uint8)  # GPTQ v1 cannot store 0
    scales = rng.uniform(1e-3, 1, (n, k // group)).astype(np.float16)
    g_idx = act_order_g_idx(k, group, rng) if draw(st.booleans()) else np.arange(k) // group
    return codes, zeros, scales, np.asarray(g_idx), group


def _as_checkpoint(folder: Path, module: str, tensors: dict) -> Checkpoint:
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(
        folder / "model.safetensors",
        {f"{module}.{k}": (_code(v), v.shape, lambda v=v: iter([v])) for k, v in tensors.items()},
    )
    return Checkpoint(folder)


def _code(array: np.ndarray) -> str:
    return {"int32": "I32", "int64": "I64", "float16": "F16", "bfloat16": "BF16"}[array.dtype.name]


@given(layers())
def test_awq_packer_agrees_with_autoawq(layer):
    codes, zeros, scales, _, group = layer
    packed = pack_awq(codes, zeros, scales)
    weight, iweights = autoawq_dequantize_gemm(
        packed["qweight"], packed["qzeros"], packed["scales"], 4, group
    )
    assert np.array_equal(iweights.T, codes)
    assert np.array_equal(weight.T, dequantize_groups(codes, zeros, scales))


@given(layers())
def test_gptq_packer_agrees_with_autogptq(layer):
    codes, zeros, scales, g_idx, _ = layer
    packed = pack_gptq(codes, zeros, scales, g_idx)
    weight, iweights = autogptq_dequantize(
        packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"]
    )
    assert np.array_equal(iweights.T, codes)
    assert np.array_equal(weight.T, dequantize_groups(codes, zeros, scales, g_idx))


@given(layers(), st.booleans())
def test_compressed_tensors_packer_agrees_with_compressed_tensors(layer, symmetric):
    codes, zeros, scales, g_idx, group = layer
    if symmetric:
        zeros = np.full_like(zeros, 8)
    packed = pack_compressed_tensors(codes, zeros, scales, g_idx, symmetric)
    weight, signed = compressed_tensors_dequantize(packed, group, symmetric)
    assert np.array_equal(signed + 8, codes)
    assert np.array_equal(weight, dequantize_groups(codes, zeros, packed["weight_scale"], g_idx))


@pytest.mark.parametrize("fmt", ["awq", "gptq", "compressed-tensors"])
@given(layer=layers())
def test_reader_returns_the_packed_codes(fmt, layer, tmp_path_factory):
    """What the build reads from a file is exactly the codes, zero points and scales packed."""
    from internlm2_graph.prequantized import Layout, Scheme

    codes, zeros, scales, g_idx, group = layer
    if fmt == "awq":
        g_idx = np.arange(codes.shape[1]) // group  # AWQ has no act-order
    packed = {
        "awq": lambda: pack_awq(codes, zeros, scales),
        "gptq": lambda: pack_gptq(codes, zeros, scales, g_idx),
        "compressed-tensors": lambda: pack_compressed_tensors(codes, zeros, scales, g_idx, False),
    }[fmt]()
    checkpoint = _as_checkpoint(tmp_path_factory.mktemp("layer"), "m", packed)
    layout = Layout(fmt, "test", Scheme(4, group, symmetric=False))
    got = read_codes(checkpoint, layout, "m", layout.default, *codes.shape)
    assert np.array_equal(got.codes, codes)
    assert np.array_equal(got.zeros, zeros)
    stored_scales = scales.astype(ml_dtypes.bfloat16) if fmt == "compressed-tensors" else scales
    assert np.array_equal(got.scales, stored_scales.astype(np.float32))
    assert np.array_equal(got.groups(), g_idx)
    assert np.array_equal(got.dequantized(), dequantize_groups(codes, zeros, got.scales, g_idx))


# --- whole models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> Path:
    config = make_config(
        "tiny", max_position_embeddings=128, hidden_size=128, intermediate_size=256
    )
    return write_checkpoint(tmp_path_factory.mktemp("float"), config, seed=3)


def _logits(folder: Path, ids=(1, 5, 9, 33, 100, 7, 2, 64)) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"))
    ids = np.array([ids], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values"):
            shape = [1, value.shape[1], 0, value.shape[3]]
            feeds[value.name] = np.zeros(shape, np.float32)
    return session.run(["logits"], feeds)[0]


VARIANTS = [
    ("awq", False, False),
    ("gptq", True, False),
    ("gptq", False, True),
    ("compressed-tensors", True, True),
    ("compressed-tensors", False, False),
]


@pytest.mark.model
@pytest.mark.parametrize(("fmt", "symmetric", "act_order"), VARIANTS)
def test_int4_logits_equal_the_dequantized_float_model(
    fmt, symmetric, act_order, float_checkpoint, tmp_path
):
    """int4 (the file's codes in MatMulNBits, accuracy_level 0) against an fp32 build of a
    float checkpoint holding (q - z) * s computed from the codes by the packer's side; and the
    fp32 build of the 4-bit file itself (dequantized by the reader) against the same."""
    packed = write_prequantized(
        float_checkpoint,
        tmp_path / "packed",
        fmt,
        group=32,
        symmetric=symmetric,
        act_order=act_order,
        dequantized=tmp_path / "dequantized",
    )
    summary = build(packed, tmp_path / "int4", "int4", "cpu", {"accuracy_level": "0"})
    build(packed, tmp_path / "fp32", "fp32", "cpu")
    build(tmp_path / "dequantized", tmp_path / "oracle", "fp32", "cpu")
    assert read_layout(packed).name in str(summary)
    oracle = _logits(tmp_path / "oracle")
    np.testing.assert_allclose(_logits(tmp_path / "fp32"), oracle, rtol=0, atol=2e-5)
    np.testing.assert_allclose(_logits(tmp_path / "int4"), oracle, rtol=0, atol=1e-4)
    # the codes were imported, not requantized: every layer is MatMulNBits with the group size
    import onnx

    graph = onnx.load(tmp_path / "int4" / "model.onnx", load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 5  # layers x linears; the output layer stays float
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {32}
    gathers = [n for n in graph.node if n.op_type == "Gather" and "input_order" in n.input[1]]
    assert len(gathers) == (10 if act_order else 0)


@pytest.mark.model
def test_modules_left_in_float_are_honoured(float_checkpoint, tmp_path):
    """GPTQModel's `dynamic` "-:" rule, AWQ's modules_to_not_convert, compressed-tensors'
    ignore: those layers stay float MatMul (from their float tensors), the rest import."""
    for fmt in ("awq", "gptq", "compressed-tensors"):
        packed = write_prequantized(
            float_checkpoint,
            tmp_path / fmt,
            fmt,
            group=32,
            keep_float=("layers.1.feed_forward.w2",),
            dequantized=tmp_path / f"{fmt}-dequantized",
        )
        build(packed, tmp_path / f"{fmt}-int4", "int4", "cpu", {"accuracy_level": "0"})
        build(tmp_path / f"{fmt}-dequantized", tmp_path / f"{fmt}-oracle", "fp32", "cpu")
        import onnx

        graph = onnx.load(tmp_path / f"{fmt}-int4" / "model.onnx", load_external_data=False)
        nbits = [n.input[1] for n in graph.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 9 and not any("layers.1.feed_forward.w2" in n for n in nbits)
        np.testing.assert_allclose(
            _logits(tmp_path / f"{fmt}-int4"), _logits(tmp_path / f"{fmt}-oracle"), atol=1e-4
        )


def _edit_quant(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def awq_checkpoint(float_checkpoint, tmp_path_factory) -> Path:
    return write_prequantized(float_checkpoint, tmp_path_factory.mktemp("awq"), "awq", group=32)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["-p", "int4", "--extra_options", "int4_block_size=64"], "block_size"),
        (["-p", "int4", "--extra_options", "is_symmetric=false"], "is_symmetric"),
        (["-p", "int4", "--extra_options", "algo_config=gptq"], "algo_config"),
        (["-p", "int8"], "int8 would requantize"),
        (
            ["-p", "int4", "-e", "cuda", "--extra_options", "enable_cuda_fpa_intb_gemm=true"],
            "has asymmetric weights (zero points), and onnxruntime-gpu's fpA_intB",
        ),
    ],
)
def test_options_that_would_change_the_codes_are_refused(
    args, expect, awq_checkpoint, tmp_path, capsys
):
    code = main(["-i", str(awq_checkpoint), "-o", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and expect in err and "AWQ" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "expect"),
    [
        ({"bits": 3}, "bits 3 is not supported"),
        ({"version": "gemv"}, "version 'gemv'"),
        ({"quant_method": "gptq", "checkpoint_format": "gptq_v2"}, "gptq_v2"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "marlin"),
        ({"quant_method": "exl2"}, "quant_method 'exl2'"),
        ({"quant_method": "compressed-tensors", "format": "marlin-24"}, "marlin-24"),
        ({"group_size": 24}, "group_size 24"),
    ],
)
def test_unsupported_variants_are_refused_in_one_line(
    changes, expect, awq_checkpoint, tmp_path, capsys
):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(awq_checkpoint, folder)
    _edit_quant(folder, **changes)
    code = main(["-i", str(folder), "-o", str(tmp_path / "out"), "-p", "int4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and expect in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.model
def test_zero_point_sixteen_is_refused(float_checkpoint, tmp_path, capsys):
    """GPTQ v1 stores z - 1, so a zero point of 0 wraps to 16: no 4-bit zero point holds it."""
    import shutil

    folder = write_prequantized(float_checkpoint, tmp_path / "gptq", "gptq", group=32)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.feed_forward.w1.qzeros"
    checkpoint = Checkpoint(folder)
    ref = checkpoint[name]
    with open(ref.path, "r+b") as f:  # the first word's nibble 0: stored 15 -> zero 16
        f.seek(ref.offset)
        word = np.frombuffer(f.read(4), np.uint32)[0]
        f.seek(ref.offset)
        f.write(np.uint32(word | 0xF).tobytes())
    assert index[name]
    code = main(["-i", str(folder), "-o", str(tmp_path / "out"), "-p", "int4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "zero point of 16" in err and "feed_forward.w1" in err
    assert not (tmp_path / "out").exists()
    shutil.rmtree(folder)


def test_packed_tensors_without_a_quantization_config_are_refused(awq_checkpoint, tmp_path, capsys):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(awq_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["-i", str(folder), "-o", str(tmp_path / "out"), "-p", "int4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "packed 4-bit weights" in err and "quantization_config" in err


def test_inspect_names_the_format(awq_checkpoint, capsys):
    assert main(["inspect", str(awq_checkpoint)]) == 0
    assert 'pre-quantized: AWQ "gemm" (4-bit, group 32, asym)' in capsys.readouterr().out


@pytest.mark.model
def test_groups_larger_than_a_block_repeat_their_scales(tmp_path):
    """Group 512 (MatMulNBits blocks stop at 256): blocks of 256 sharing the group's scale and
    zero point, still the file's codes and still exact."""
    config = make_config(
        "tiny", hidden_size=512, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    )
    src = write_checkpoint(tmp_path / "float", config, seed=4)
    packed = write_prequantized(
        src, tmp_path / "gptq", "gptq", group=512, dequantized=tmp_path / "dequantized"
    )
    build(packed, tmp_path / "int4", "int4", "cpu", {"accuracy_level": "0"})
    build(tmp_path / "dequantized", tmp_path / "oracle", "fp32", "cpu")
    np.testing.assert_allclose(
        _logits(tmp_path / "int4"), _logits(tmp_path / "oracle"), rtol=0, atol=1e-4
    )
    import onnx

    graph = onnx.load(tmp_path / "int4" / "model.onnx", load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {256}
