"""Bytes where they matter: a quantized embedding (GatherBlockQuantized), an lm_head that reads
its codes where the checkpoint ties them, per-tensor formats and the named presets.

Exactness is checked as in test_precisions.py: the built graph against the numpy reference
running on the same dequantized weights (quantize.dequantize, an independent numpy decoding of
the codes), at accuracy_level=0 so the only difference is fp32 rounding.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

from internlm2_graph import InternLM2GraphError, build
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import resolve_target
from internlm2_graph.presets import PRESETS
from internlm2_graph.quantize import dequantize, quantize
from internlm2_graph.reference import quantized_reference
from internlm2_graph.sizes import weight_bytes
from internlm2_graph.tensor_precision import format_name
from internlm2_graph.verify import eos_ids, og_greedy

PROMPT = [1, 17, 230, 5, 981, 44, 12, 600, 73]
STEPS = 4
EMBEDDING, HEAD = "model.tok_embeddings.weight", "output.weight"


def options_dict(options):
    return dict(o.split("=", 1) for o in options)


def assert_exact(checkpoint, model_dir, precision, options):
    target = resolve_target(precision, "cpu", options_dict(options))
    want_tokens, want = quantized_reference(checkpoint, target).greedy(
        PROMPT, STEPS, eos_ids(model_dir)
    )
    (tokens,), logits = og_greedy(model_dir, [PROMPT], STEPS)
    errors = [float(np.max(np.abs(g[0] - w))) for g, w in zip(logits, want)]
    assert max(errors) <= 1e-4, errors
    assert tokens == want_tokens


def initializers(model_dir):
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return {i.name: i for i in model.graph.initializer}, model.graph.node


@pytest.fixture(scope="module")
def tied_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with its lm_head replaced by a copy of the embedding (how a tied
    model such as SmolLM2 converts into InternLM2's layout)."""
    folder = tmp_path_factory.mktemp("tied")
    shutil.copytree(tiny_checkpoint, folder, dirs_exist_ok=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    table = load_file(folder / index[EMBEDDING])[EMBEDDING]
    shard = folder / index[HEAD]
    tensors = load_file(shard)
    tensors[HEAD] = table
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "options",
    [
        ["embedding_precision=int8"],
        ["embedding_precision=int4-b16-asym", "lm_head_precision=int8-b64"],
        ["tensor_precision=feed_forward.w2@last1:int8,attention.wqkv@0:int8-b16-asym"],
    ],
)
@pytest.mark.model
def test_quantized_embedding_and_tensor_formats_compute_exactly(tiny_checkpoint, tmp_path, options):
    options = ["accuracy_level=0", *options]
    build(tiny_checkpoint, tmp_path / "m", "int4", "cpu", options)
    assert_exact(tiny_checkpoint, tmp_path / "m", "int4", options)


@pytest.mark.model
def test_embedding_codes_are_the_numpy_quantizer_codes(tiny_checkpoint, tmp_path):
    build(tiny_checkpoint, tmp_path / "m", "int4", "cpu", ["embedding_precision=int4-asym"])
    inits, nodes = initializers(tmp_path / "m")
    model = onnx.load(str(tmp_path / "m" / "model.onnx"))
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    table = load_file_any(tiny_checkpoint, EMBEDDING).astype(np.float32)
    spec = resolve_target("int4", "cpu", {"embedding_precision": "int4-asym"}).embedding_quant
    q = quantize(table, spec)
    np.testing.assert_array_equal(arrays[f"{EMBEDDING}"], q.packed)
    np.testing.assert_array_equal(arrays["model.tok_embeddings.scales"], q.scales.reshape(-1))
    assert [n.op_type for n in nodes].count("GatherBlockQuantized") == 1
    assert not [n for n in nodes if n.op_type == "Gather" and EMBEDDING in n.input]
    # What the runtime gathers is the numpy dequantization of those codes.
    assert_close_rows(tmp_path / "m", dequantize(q))


def load_file_any(checkpoint, name):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    return load_file(checkpoint / index[name])[name]


def assert_close_rows(model_dir, table):
    """Run just the embedding part: input ids -> GatherBlockQuantized -> Reshape output."""
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(model_dir / "model.onnx"))
    graph = model.graph
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in graph.node if n.op_type == "Reshape" and gather.output[0] in n.input)
    wanted = {i for n in graph.node if n in (gather, reshape) for i in n.input}
    producers = [n for n in graph.node if set(n.output) & wanted and n not in (gather, reshape)]
    nodes = [*producers, gather, reshape]
    sub = helper.make_graph(
        nodes,
        "embedding",
        [i for i in graph.input if i.name == "input_ids"],
        [helper.make_tensor_value_info(reshape.output[0], onnx.TensorProto.FLOAT, None)],
        [i for i in graph.initializer if i.name in wanted or any(i.name in n.input for n in nodes)],
    )
    sub_model = helper.make_model(sub, opset_imports=model.opset_import)
    session = ort.InferenceSession(
        sub_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    ids = np.array([PROMPT], np.int64)
    (rows,) = session.run(None, {"input_ids": ids})
    np.testing.assert_array_equal(rows[0], table[PROMPT])


@pytest.mark.model
def test_tied_head_reads_the_embedding_codes(tied_checkpoint, tmp_path):
    options = ["accuracy_level=0", "embedding_precision=int8", "lm_head_precision=int8"]
    build(tied_checkpoint, tmp_path / "m", "int4", "cpu", options)
    inits, nodes = initializers(tmp_path / "m")
    assert not any(name.startswith("output.") for name in inits)
    head = next(n for n in nodes if n.op_type == "MatMulNBits" and n.input[1] == EMBEDDING)
    assert head.input[2] == "model.tok_embeddings.scales"
    assert_exact(tied_checkpoint, tmp_path / "m", "int4", options)
    config = InternLM2Config.from_dir(tied_checkpoint)
    untied = weight_bytes(config, resolve_target("int4", "cpu", options_dict(options[1:])))
    saved = untied - sum(_bytes(i) for i in inits.values())
    assert saved == config.vocab_size * config.hidden_size * (1 + 4 / 32)  # codes + scales


def _bytes(tensor):
    return (
        int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    )


@pytest.mark.model
def test_untied_checkpoint_keeps_its_own_head(tiny_checkpoint, tmp_path):
    options = ["embedding_precision=int8", "lm_head_precision=int8"]
    build(tiny_checkpoint, tmp_path / "m", "int4", "cpu", options)
    inits, _ = initializers(tmp_path / "m")
    assert "output.weight" in inits


@pytest.mark.model
def test_tied_formats_that_differ_are_stored_apart(tied_checkpoint, tmp_path):
    options = ["accuracy_level=0", "embedding_precision=int8", "lm_head_precision=int4"]
    build(tied_checkpoint, tmp_path / "m", "int4", "cpu", options)
    inits, _ = initializers(tmp_path / "m")
    assert "output.weight" in inits
    assert_exact(tied_checkpoint, tmp_path / "m", "int4", options)


# --- option resolution ------------------------------------------------------------------------


def test_tensor_rules_pick_formats_per_layer_and_later_rules_win():
    target = resolve_target(
        "int4",
        "cpu",
        {
            "tensor_precision": "feed_forward.w2:int8,feed_forward.w2@1+last1:int4-b16-asym",
            "block_size": "64",
        },
    ).for_layers(4)
    spec = target.linear_spec
    assert (
        spec("model.layers.0.feed_forward.w2").bits,
        spec("model.layers.0.feed_forward.w2").block_size,
    ) == (8, 64)
    for n in (1, 3):
        w2 = spec(f"model.layers.{n}.feed_forward.w2")
        assert (w2.bits, w2.block_size, w2.symmetric) == (4, 16, False)
    assert spec("model.layers.2.feed_forward.w1") == target.quant
    assert spec("output") == target.lm_head_quant


def test_preset_resolves_and_explicit_options_override():
    name = "q4_mixed"
    target = resolve_target("int4", "cpu", {"quant_preset": name})
    preset = PRESETS[name][2]
    assert format_name(target.embedding_quant) == preset["embedding_precision"]
    assert target.tensor_rules
    overridden = resolve_target(
        "int4", "cpu", {"quant_preset": name, "embedding_precision": "float", "block_size": "64"}
    )
    assert overridden.embedding_quant is None
    assert overridden.quant.block_size == 64
    assert (
        overridden.tensor_rules
        == resolve_target("int4", "cpu", {"quant_preset": name, "block_size": "64"}).tensor_rules
    )


@pytest.mark.parametrize("depth", [2, 5, 30])
def test_q4_mixed_names_the_same_layers_at_any_depth(depth):
    """The preset's layer picks are first/last counts, so one preset serves every depth: the
    w2 of the first two and last two layers int8 (all of them at depth 2), the rest int4."""
    linear = resolve_target("int4", "cpu", {"quant_preset": "q4_mixed"}).for_layers(depth)
    formats = {
        name: [format_name(linear.linear_spec(f"model.layers.{n}.{name}")) for n in range(depth)]
        for name in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2")
    }
    assert set(formats["attention.wqkv"]) == {"int8-b64-sym"}
    assert set(formats["attention.wo"]) == {"int4-b32-asym"}
    assert set(formats["feed_forward.w1"]) == {"int4-b64-asym"}
    ends = {0, 1, depth - 2, depth - 1}
    assert [n for n, f in enumerate(formats["feed_forward.w2"]) if f == "int8-b128-sym"] == sorted(
        ends
    )
    assert {f for n, f in enumerate(formats["feed_forward.w2"]) if n not in ends} <= {
        "int4-b32-asym"
    }


@pytest.mark.model
def test_q4_mixed_on_a_tied_checkpoint_shares_the_table_and_computes_exactly(
    tied_checkpoint, tmp_path
):
    options = ["accuracy_level=0", "quant_preset=q4_mixed"]
    build(tied_checkpoint, tmp_path / "m", "int4", "cpu", options)
    inits, nodes = initializers(tmp_path / "m")
    assert not any(name.startswith("output.") for name in inits)
    head = next(n for n in nodes if n.op_type == "MatMulNBits" and n.input[1] == EMBEDDING)
    assert head.input[2] == "model.tok_embeddings.scales"
    # asymmetric linears carry zero points, the int8 ones do not
    linears = [n for n in nodes if n.op_type == "MatMulNBits"]
    with_zero_points = {n.input[1] for n in linears if len(n.input) > 3 and n.input[3]}
    assert any("feed_forward.w1" in name for name in with_zero_points)
    assert not any("attention.wqkv" in name for name in with_zero_points)
    assert_exact(tied_checkpoint, tmp_path / "m", "int4", options)


@pytest.mark.parametrize(
    "precision, options, message",
    [
        ("int4", {"quant_preset": "q9_magic"}, "quant_preset='q9_magic': use one of"),
        ("int8", {"quant_preset": "q4_mixed"}, "--precision int4 layout"),
        ("fp32", {"embedding_precision": "int8"}, "only apply to --precision int4/int8"),
        ("int4", {"embedding_precision": "int3"}, "is not a weight format"),
        ("int4", {"lm_head_precision": "int8-b7"}, "power of two"),
        ("int4", {"tensor_precision": "feed_forward.w9:int8"}, "NAME one of"),
        ("int4", {"tensor_precision": "feed_forward.w2@3-1:int8"}, "runs backwards"),
        ("int4", {"tensor_precision": "feed_forward.w2@first0:int8"}, "LAYERS are"),
        ("int4", {"tensor_precision": "feed_forward.w2:float"}, "are int4 or int8"),
        ("int4", {"tensor_precision": "feed_forward.w2:int8", "algo_config": "awq"}, "gptaq"),
    ],
)
def test_refusals_name_the_option_and_the_fix(precision, options, message):
    with pytest.raises(InternLM2GraphError, match=message.replace("(", r"\(").replace("'", "'")):
        resolve_target(precision, "cpu", options)


def test_rule_beyond_the_model_is_refused_before_writing(tiny_checkpoint, tmp_path):
    with pytest.raises(InternLM2GraphError, match="beyond the model's 2"):
        build(
            tiny_checkpoint, tmp_path / "m", "int4", "cpu", ["tensor_precision=attention.wo@5:int8"]
        )
    assert not (tmp_path / "m").exists()


def test_embedding_block_must_divide_hidden(tiny_checkpoint, tmp_path):
    with pytest.raises(InternLM2GraphError, match="does not divide hidden_size 64"):
        build(tiny_checkpoint, tmp_path / "m", "int4", "cpu", ["embedding_precision=int8-b128"])
    assert not (tmp_path / "m").exists()


def test_inspect_lists_each_tensor_format(tiny_checkpoint, capsys):
    from internlm2_graph.cli import main

    options = ["embedding_precision=int8", "tensor_precision=feed_forward.w2@last1:int8"]
    assert main(["inspect", str(tiny_checkpoint), "-p", "int4", "--extra_options", *options]) == 0
    out = capsys.readouterr().out
    assert "model.tok_embeddings: int8-b32-sym" in out
    assert "output: int4-b32-sym" in out
    assert "feed_forward.w2: int4-b32-sym in layers 0, " in out
    assert "; int8-b32-sym in layers 1, " in out
    assert "attention.wqkv: int4-b32-sym in layers 0-1, " in out
