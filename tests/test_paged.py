"""Paged-attention graphs for og.Engine (use_paged_attention=true): options, I/O, genai_config,
and the index math, on the CPU.

onnxruntime has PagedAttention for CUDA only. Here the op's semantics are checked through a
numpy reference (reference.paged_attention: packed batch + block table == per-sequence
attention), and the graph around the op through that same reference run in its place as an
onnxruntime-extensions Python op: the whole paged graph then gives, for packed batches of
different lengths and the decode steps after them, the per-sequence reference's logits. The
CUDA op itself is compared with the reference on the GPU (benchmarks/paged_gpu.py).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from internlm2_graph import build
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.cli import main
from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.graph import LOGITS_INDICES, PAGED_INPUTS, build_graph
from internlm2_graph.package import genai_config, save_model
from internlm2_graph.precision import PagedSpec, resolve_target
from internlm2_graph.reference import Cache, Reference, paged_attention
from internlm2_graph.sizes import describe, paged_block_bytes, paged_blocks
from internlm2_graph.synthetic import make_config
from internlm2_graph.tensor_precision import LINEARS
from internlm2_graph.weights import WeightBinder

PAGED = {"use_paged_attention": "true"}
FPA = {"enable_cuda_fpa_intb_gemm": "true"}


def config_for(heads: int, kv_heads: int, head_dim: int = 16, layers: int = 2) -> InternLM2Config:
    return InternLM2Config.from_dict(
        make_config(
            "tiny",
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            hidden_size=heads * head_dim,
            num_hidden_layers=layers,
        )
    )


# --- the op's semantics -----------------------------------------------------------------------


def contiguous_attention(q, k, v, past_k, past_v, scale):
    """One sequence's causal attention over [past | new], written without blocks or packing:
    q [n, heads, d], k/v [n, kv_heads, d] (already rotated), past_k/v [p, kv_heads, d]."""
    keys, values = np.concatenate([past_k, k]), np.concatenate([past_v, v])
    group = q.shape[1] // k.shape[1]
    out = np.empty_like(q)
    for h in range(q.shape[1]):
        scores = q[:, h] @ keys[:, h // group].T * scale
        for row in range(len(q)):  # row sees the past and new tokens up to itself
            visible = scores[row, : len(past_k) + row + 1]
            weights = np.exp(visible - visible.max())
            out[row, h] = weights @ values[: len(visible), h // group] / weights.sum()
    return out


@st.composite
def packed_batches(draw):
    """A paged step: head shapes, a block size, and per sequence its cached and new lengths."""
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 3, 4, 6]))
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    lengths = draw(
        st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6)), min_size=1, max_size=5)
    )
    return kv_heads * group, kv_heads, block_size, lengths


@given(packed_batches(), st.integers(0, 2**32 - 1))
@example((32, 8, 4, [(7, 1), (0, 5), (12, 0), (3, 3)]), 0)  # 7B's group of 4
def test_reference_packed_blocks_are_per_sequence_attention(batch, seed):
    """Tokens of several sequences packed together, caches in shuffled blocks: each sequence's
    output is its own attention over its past and new tokens, and the blocks end up holding
    exactly its rotated keys and values."""
    heads, kv_heads, block_size, lengths = batch
    rng = np.random.default_rng(seed)
    d, positions = 16, 32
    angles = rng.uniform(0, np.pi, (positions, d // 2))
    cos_cache, sin_cache = np.cos(angles), np.sin(angles)
    blocks_per_sequence = [-(-(past + new) // block_size) for past, new in lengths]
    pool = rng.permutation(sum(blocks_per_sequence) + 3)  # 3 blocks nobody owns
    table = np.full((len(lengths), max(blocks_per_sequence + [1])), -1)
    taken = 0
    for i, n in enumerate(blocks_per_sequence):
        table[i, :n], taken = pool[taken : taken + n], taken + n
    shape = (len(pool), block_size, kv_heads, d)
    key_cache, value_cache = rng.normal(size=shape), rng.normal(size=shape)
    past_k = [rng.normal(size=(past, kv_heads, d)) for past, _ in lengths]
    past_v = [rng.normal(size=(past, kv_heads, d)) for past, _ in lengths]
    for i, (past, _) in enumerate(lengths):
        where = (table[i, np.arange(past) // block_size], np.arange(past) % block_size)
        key_cache[where], value_cache[where] = past_k[i], past_v[i]
    cumulative = np.cumsum([0] + [new for _, new in lengths])
    width = (heads + 2 * kv_heads) * d
    qkv = rng.normal(size=(cumulative[-1], width))
    scale = d**-0.5

    out, keys, values = paged_attention(
        qkv, key_cache, value_cache, cumulative, np.array([p for p, _ in lengths]), table,
        cos_cache, sin_cache, num_heads=heads, kv_num_heads=kv_heads, scale=scale,
    )  # fmt: skip

    for i, (past, new) in enumerate(lengths):
        rows = slice(cumulative[i], cumulative[i + 1])
        at = past + np.arange(new)
        cos, sin = np.tile(cos_cache[at], 2)[:, None], np.tile(sin_cache[at], 2)[:, None]
        q = qkv[rows, : heads * d].reshape(new, heads, d)
        k = qkv[rows, heads * d : (heads + kv_heads) * d].reshape(new, kv_heads, d)
        v = qkv[rows, (heads + kv_heads) * d :].reshape(new, kv_heads, d)
        q = q * cos + Reference.rotate_half(q) * sin
        k = k * cos + Reference.rotate_half(k) * sin
        expected = contiguous_attention(q, k, v, past_k[i], past_v[i], scale)
        np.testing.assert_allclose(out[rows].reshape(new, heads, d), expected, atol=1e-10)
        every = np.arange(past + new)
        where = (table[i, every // block_size], every % block_size)
        np.testing.assert_array_equal(keys[where], np.concatenate([past_k[i], k]))
        np.testing.assert_array_equal(values[where], np.concatenate([past_v[i], v]))
    owned = np.zeros(len(pool), bool)
    owned[table[table >= 0]] = True
    np.testing.assert_array_equal(keys[~owned], key_cache[~owned])  # nobody else's blocks


# --- the graph around the op --------------------------------------------------------------------

_registered = False


def register_reference_op() -> None:
    """reference.paged_attention as a CPU op (domain ai.onnx.contrib): fp32 only, which is all
    onnxruntime-extensions' Python ops take."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i32 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32
    i64 = PyCustomOpDef.dt_int64

    @onnx_op(
        op_type="PagedAttention",
        domain="ai.onnx.contrib",
        inputs=[f32, f32, f32, i32, i32, i32, f32, f32, i32],
        outputs=[f32, f32, f32],
        attrs={
            "num_heads": i64,
            "kv_num_heads": i64,
            "scale": PyCustomOpDef.dt_float,
            "do_rotary": i64,
            "rotary_interleaved": i64,
        },
    )
    def _paged(qkv, key_cache, value_cache, cumulative, past, table, cos, sin, metadata, **attrs):
        assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
        new = np.diff(cumulative)
        # The metadata's bounds must hold for the step (the CUDA op trusts them).
        assert metadata[0] >= new.max() and metadata[1] >= (past + new).max()
        return paged_attention(
            qkv, key_cache, value_cache, cumulative, past, table, cos, sin,
            num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_num_heads"],
            scale=attrs["scale"],
        )  # fmt: skip

    _registered = True


def reference_session(folder, block_size: int, prune: bool = False) -> ort.InferenceSession:
    """The paged graph (fp32, `block_size` tokens a block) of `folder`'s checkpoint, with the
    numpy PagedAttention in place of the CUDA one."""
    register_reference_op()
    from onnxruntime_extensions import get_library_path

    config = InternLM2Config.from_dir(folder)
    target = replace(
        resolve_target("fp32", "cpu"), paged=PagedSpec(block_size=block_size, prune_lm_head=prune)
    )
    model, module = build_graph(config, target)
    WeightBinder(Checkpoint(folder), config).bind(module)
    out = folder.parent / f"paged-{block_size}-{prune}"
    out.mkdir(exist_ok=True)
    save_model(model, out, "model.onnx")
    proto = onnx.load(out / "model.onnx")
    for node in proto.graph.node:
        if node.op_type == "PagedAttention":
            node.domain = "ai.onnx.contrib"
            kept = [name for name in node.input if name]  # the optional inputs left empty
            del node.input[:]
            node.input.extend(kept)
    proto.opset_import.append(onnx.helper.make_opsetid("ai.onnx.contrib", 1))
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(proto.SerializeToString(), options)


class Engine:
    """What og.Engine does around the graph, written out: sequences own blocks of a shared
    pool, each step packs the scheduled sequences' new tokens and feeds the block table."""

    def __init__(self, session, config: InternLM2Config, block_size: int, blocks: int) -> None:
        self.session, self.block_size = session, block_size
        shape = (blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.layers = config.num_hidden_layers
        self.pool = {
            f"past_key_values.{i}.{kind}": np.zeros(shape, np.float32)
            for i in range(self.layers)
            for kind in ("key", "value")
        }
        # Hand blocks out from the end, out of order, so no sequence's blocks are contiguous.
        self.free = list(np.random.default_rng(0).permutation(blocks))
        self.blocks: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, batch: list[tuple[str, list[int]]], logits_rows=None) -> np.ndarray:
        past = [self.lengths.setdefault(name, 0) for name, _ in batch]
        for (name, ids), cached in zip(batch, past):
            owned = self.blocks.setdefault(name, [])
            while len(owned) * self.block_size < cached + len(ids):
                owned.append(self.free.pop())
        width = max(len(self.blocks[name]) for name, _ in batch)
        table = np.full((len(batch), width), -1, np.int32)
        for i, (name, _) in enumerate(batch):
            table[i, : len(self.blocks[name])] = self.blocks[name]
        new = [len(ids) for _, ids in batch]
        feeds = {
            "input_ids": np.array([t for _, ids in batch for t in ids], np.int64),
            "cumulative_sequence_lengths": np.cumsum([0, *new]).astype(np.int32),
            "past_sequence_lengths": np.array(past, np.int32),
            "block_table": table,
            "attention_metadata": np.array(
                [max(new), max(p + n for p, n in zip(past, new)), 1], np.int32
            ),
            **self.pool,
        }
        if logits_rows is not None:
            feeds[LOGITS_INDICES] = np.array(logits_rows, np.int32)
        logits, *presents = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()[1:]]
        for name, present in zip(names, presents):
            self.pool[name.replace("present", "past_key_values")] = present
        for (name, ids), cached in zip(batch, past):
            self.lengths[name] = cached + len(ids)
        return logits


PROMPTS = {
    "a": [1, 17, 250, 3, 999, 42, 7],
    "b": [1, 500, 501],
    "c": [1, 88, 91, 93, 100, 7, 8, 9, 10, 11, 12],
}
# Step after step as an engine would schedule them: all prompts packed; one decode token each;
# a mixed step (b's next chunk of 4 ahead of a's decode token, c idle); then c and a decoding.
STEPS = [
    [(name, ids) for name, ids in PROMPTS.items()],
    [("a", [5]), ("b", [6]), ("c", [7])],
    [("b", [30, 31, 32, 33]), ("a", [40])],
    [("c", [50]), ("a", [51])],
]


@pytest.mark.parametrize("block_size", [4, 256])
def test_paged_graph_gives_per_sequence_logits(tiny_checkpoint, block_size):
    """Packed prompts of different lengths in scattered blocks, then decoding and a chunked
    continuation: every logits row is the per-sequence reference's."""
    config = InternLM2Config.from_dir(tiny_checkpoint)
    session = reference_session(tiny_checkpoint, block_size)
    engine = Engine(session, config, block_size, blocks=64)
    reference, caches = Reference(tiny_checkpoint), {name: Cache() for name in PROMPTS}
    for batch in STEPS:
        logits = engine.step(batch)
        assert logits.shape == (sum(len(ids) for _, ids in batch), config.vocab_size)
        row = 0
        for name, ids in batch:
            expected, caches[name] = reference.forward(ids, caches[name])
            np.testing.assert_allclose(logits[row : row + len(ids)], expected, atol=2e-4)
            row += len(ids)


def test_pruned_lm_head_gives_the_rows_asked_for(tiny_checkpoint):
    """prune_lm_head: logits only for logits_indices' rows (each sequence's last token)."""
    config = InternLM2Config.from_dir(tiny_checkpoint)
    engine = Engine(reference_session(tiny_checkpoint, 4, prune=True), config, 4, blocks=64)
    reference, caches = Reference(tiny_checkpoint), {name: Cache() for name in PROMPTS}
    for batch in STEPS:
        last = np.cumsum([len(ids) for _, ids in batch]) - 1
        logits = engine.step(batch, logits_rows=last)
        assert logits.shape == (len(batch), config.vocab_size)
        for i, (name, ids) in enumerate(batch):
            expected, caches[name] = reference.forward(ids, caches[name])
            np.testing.assert_allclose(logits[i], expected[-1], atol=2e-4)


# --- I/O as og.Engine feeds it --------------------------------------------------------------


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# (precision, options, activation dtype)
FLAVOURS = {
    "fp16": ("fp16", PAGED, onnx.TensorProto.FLOAT16),
    "bf16": ("bf16", PAGED, onnx.TensorProto.BFLOAT16),
    "int4": ("int4", PAGED, onnx.TensorProto.FLOAT16),
    "int8-bf16": ("int8", {**PAGED, "use_cuda_bf16": "true"}, onnx.TensorProto.BFLOAT16),
}


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 4), (8, 2), (6, 1), (32, 8)])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_paged_graph_io_is_what_og_engine_feeds(heads, kv_heads, flavour):
    """Names, dtypes and shapes of og 0.18's paged decoder I/O; onnxruntime resolves the graph
    (types and shapes infer through every node) and stops only at the missing CPU kernel."""
    precision, options, io = FLAVOURS[flavour]
    config = config_for(heads, kv_heads)
    model, _ = build_graph(config, resolve_target(precision, "cuda", options))
    proto = onnx.shape_inference.infer_shapes(onnx.ModelProto.FromString(_serialize(model)))
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name: o for o in proto.graph.output}
    int32, int64 = onnx.TensorProto.INT32, onnx.TensorProto.INT64
    assert dims(inputs["input_ids"]) == ["num_tokens"]
    assert inputs["input_ids"].type.tensor_type.elem_type == int64
    assert "attention_mask" not in inputs and LOGITS_INDICES not in inputs
    expected = [["batch_size + 1"], ["batch_size"], ["batch_size", "max_num_blocks"], [3]]
    for name, shape in zip(PAGED_INPUTS, expected):
        assert inputs[name].type.tensor_type.elem_type == int32, name
        assert dims(inputs[name]) == shape, name
    pool = ["num_blocks", 256, kv_heads, config.head_dim]
    for i in range(config.num_hidden_layers):
        for kind in ("key", "value"):
            for value in (inputs[f"past_key_values.{i}.{kind}"], outputs[f"present.{i}.{kind}"]):
                assert value.type.tensor_type.elem_type == io
                assert dims(value) == pool
    assert dims(outputs["logits"]) == ["num_tokens", config.vocab_size]
    assert outputs["logits"].type.tensor_type.elem_type == io

    nodes = [n for n in proto.graph.node if n.op_type == "PagedAttention"]
    assert len(nodes) == config.num_hidden_layers
    for i, node in enumerate(nodes):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == heads and attrs["kv_num_heads"] == kv_heads
        assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 0
        assert attrs["scale"] == pytest.approx(config.head_dim**-0.5)
        assert list(node.input[3:8]) == [
            f"past_key_values.{i}.key",
            f"past_key_values.{i}.value",
            *PAGED_INPUTS[:3],
        ]
        assert node.input[16] == "attention_metadata" and not node.input[1] and not node.input[2]
        assert list(node.output[1:]) == [f"present.{i}.key", f"present.{i}.value"]
    # Kernels are looked up only once the whole graph has resolved; the CPU has none for
    # PagedAttention (nor for bf16 MatMul).
    with pytest.raises(Exception, match=r"NOT_IMPLEMENTED : Could not find an implementation"):
        ort.InferenceSession(_serialize(model), providers=["CPUExecutionProvider"])


def _serialize(model) -> bytes:
    """The graph with zeros for weights: enough for onnxruntime to resolve it."""
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        if value.const_value is None:
            zeros = np.zeros(value.shape.numpy(), dtype=value.dtype.numpy())
            value.const_value = ir.tensor(zeros, name=value.name)
    return ir.serde.serialize_model(model).SerializeToString()


def test_pruned_graph_takes_logits_indices():
    target = resolve_target("fp16", "cuda", {**PAGED, "prune_lm_head": "true"})
    model, _ = build_graph(config_for(4, 2), target)
    inputs = {v.name: v for v in model.graph.inputs}
    assert inputs[LOGITS_INDICES].dtype.name == "INT32"
    assert list(inputs[LOGITS_INDICES].shape) == ["num_logits"]
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    assert list(logits.shape)[0] == "num_logits"


# --- genai_config and options ---------------------------------------------------------------


def test_genai_config_engine_section():
    config = config_for(4, 2, layers=3)
    target = resolve_target("int4", "cuda", PAGED)
    runtime = genai_config(config, target, [2])
    decoder = runtime["model"]["decoder"]
    builder_defaults = {"block_size": 256, "max_batch_size": 100, "gpu_utilization_factor": 0.6}
    assert runtime["engine"] == {"dynamic_batching": builder_defaults}
    assert decoder["state_groups"] == [{"kind": "paged_kv", "layer_ids": [0, 1, 2]}]
    assert "attention_mask" not in decoder["inputs"]
    for name in PAGED_INPUTS:
        assert decoder["inputs"][name] == name
    assert "chunk_size" not in runtime["search"] and runtime["search"]["past_present_share_buffer"]
    assert decoder["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]

    options = {
        **PAGED,
        "paged_block_size": "512",
        "max_batch_size": "64",
        "num_blocks": "900",
        "max_scheduled_tokens": "4096",
        "paged_chunk_size": "1024",
        "prune_lm_head": "true",
        "prefix_caching": "true",
        "enable_cuda_graph": "false",
    }
    runtime = genai_config(config, resolve_target("fp16", "cuda", options), [2])
    assert runtime["engine"]["dynamic_batching"] == {
        "block_size": 512,
        "max_batch_size": 64,
        "num_blocks": 900,
        "max_scheduled_tokens": 4096,
        "prefix_caching": True,
    }
    off = resolve_target("fp16", "cuda", {**PAGED, "prefix_caching": "false"})
    assert genai_config(config, off, [2])["engine"]["dynamic_batching"]["prefix_caching"] is False
    assert runtime["search"]["chunk_size"] == 1024
    assert runtime["model"]["decoder"]["inputs"][LOGITS_INDICES] == LOGITS_INDICES


def test_fpa_intb_gemm_is_a_session_option_off_by_default():
    config = config_for(4, 2)
    session = genai_config(config, resolve_target("int4", "cuda", PAGED), [2])["model"]["decoder"]
    assert "ep.cuda.fpa_intb_gemm" not in session["session_options"]
    on = resolve_target("int8", "cuda", {"enable_cuda_fpa_intb_gemm": "true"})
    session = genai_config(config, on, [2])["model"]["decoder"]["session_options"]
    assert session["ep.cuda.fpa_intb_gemm"] == "1"


def test_plain_graph_is_unchanged_by_paged_code():
    """Without use_paged_attention: attention_mask, no engine section, GroupQueryAttention."""
    config = config_for(4, 2)
    target = resolve_target("fp16", "cuda")
    assert target.paged is None
    runtime = genai_config(config, target, [2])
    assert "engine" not in runtime and "state_groups" not in runtime["model"]["decoder"]
    model, _ = build_graph(config, target)
    assert "attention_mask" in [v.name for v in model.graph.inputs]
    assert {n.op_type for n in model.graph} >= {"GroupQueryAttention"}


@pytest.mark.parametrize(
    ("precision", "provider", "options", "message"),
    [
        ("int4", "cpu", PAGED, "needs --execution_provider cuda: onnxruntime's PagedAttention"),
        ("fp16", "cuda", {"max_batch_size": "8"}, "only apply with use_paged_attention=true"),
        ("fp16", "cuda", {**PAGED, "paged_block_size": "128"}, "use a multiple of 256"),
        ("fp16", "cuda", {**PAGED, "paged_block_size": "0"}, "positive whole number"),
        ("fp16", "cuda", {**PAGED, "num_blocks": "9", "gpu_utilization_factor": "0.5"}, "keep one"),
        ("fp16", "cuda", {**PAGED, "gpu_utilization_factor": "1.5"}, r"in \(0, 1\]"),
        ("fp16", "cuda", {**PAGED, "gpu_utilization_factor": "lots"}, "expected a number"),
        ("fp16", "cuda", {**PAGED, "max_scheduled_tokens": "-1"}, "positive whole number"),
        ("fp16", "cuda", {**PAGED, "prune_lm_head": "maybe"}, "expected true or false"),
        ("fp16", "cuda", {"prefix_caching": "true"}, "only apply with use_paged_attention"),
        (
            "fp16",
            "cuda",
            {**PAGED, "kv_cache_quant_scheme": "int8_per_channel"},
            "with use_paged_attention=true is not built yet",
        ),
        ("fp16", "cuda", {**PAGED, "kv_cache_rotation": "hadamard"}, "has no KV rotation"),
        ("fp16", "cuda", {"kv_cache_quant_scheme": "int8_per_token"}, "per-token scales are not"),
        ("fp32", "cuda", PAGED, "CUDA GroupQueryAttention runs fp16/bf16 only"),
        ("int4", "cpu", {"enable_cuda_fpa_intb_gemm": "true"}, "only applies to --execution_pro"),
        ("fp16", "cuda", {"enable_cuda_fpa_intb_gemm": "true"}, "only apply to --precision int4"),
        ("int4", "cuda", {**FPA, "is_symmetric": "false"}, "not asymmetric weights"),
        ("int4", "cuda", {**FPA, "int4_block_size": "64"}, "not blocks of 64"),
        ("int8", "cuda", {**FPA, "int4_block_size": "128"}, "not blocks of 128"),
    ],
)
def test_refusals(precision, provider, options, message):
    with pytest.raises(InternLM2GraphError, match=message) as err:
        resolve_target(precision, provider, options)
    assert "\n" not in str(err.value)


def test_cpu_build_refused_in_one_line_before_any_write(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "paged-cpu"
    argv = ["-i", str(tiny_checkpoint), "-o", str(out), "-p", "int4", "-e", "cpu"]
    assert main([*argv, "--extra_options", "use_paged_attention=true"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "og.Engine runs a folder built without it" in error
    assert not out.exists()


@pytest.mark.model
def test_fpa_intb_refused_where_no_linear_could_take_it(tiny_checkpoint, tmp_path, capsys):
    """tensor_precision that moves every linear off fpA_intB's formats is refused like the
    options that do (one check over the build's layers); one eligible linear is enough."""
    asym = ",".join(f"{name}:int4-b32-asym" for name in LINEARS)
    argv = ["-i", str(tiny_checkpoint), "-p", "int4", "-e", "cuda", "--extra_options"]
    options = ["enable_cuda_fpa_intb_gemm=true", f"tensor_precision={asym}"]
    out = tmp_path / "none"
    assert main([*argv, *options, "lm_head_precision=int4-b64", "-o", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "every quantized linear built from" in error
    assert "has asymmetric weights (zero points)" in error and not out.exists()
    head_takes_it = tmp_path / "head"
    assert main([*argv, *options, "-o", str(head_takes_it), "-q"]) == 0


@pytest.mark.model
def test_cuda_build_writes_a_paged_folder(tiny_checkpoint, tmp_path):
    import onnxruntime_genai as og

    out = tmp_path / "paged"
    options = ["use_paged_attention=true", "max_batch_size=8", "paged_chunk_size=512"]
    build(tiny_checkpoint, out, "int4", "cuda", [*options, "enable_cuda_fpa_intb_gemm=true"])
    og.Config(str(out))  # og 0.18 parses genai_config strictly: an unknown field is an error
    runtime = json.loads((out / "genai_config.json").read_text())
    assert runtime["model"]["decoder"]["session_options"]["ep.cuda.fpa_intb_gemm"] == "1"
    assert runtime["engine"]["dynamic_batching"]["max_batch_size"] == 8
    proto = onnx.load(out / "model.onnx", load_external_data=False)
    assert sum(n.op_type == "PagedAttention" for n in proto.graph.node) == 2
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == 2 * 5 + 1


# --- inspect ---------------------------------------------------------------------------------


def test_paged_pool_arithmetic():
    """7B fp16: a 256-token block of 32 layers x 8 KV heads x 128 x 2 bytes x (k, v) = 32 MiB;
    og.Engine takes 0.9 x gpu_utilization_factor of the free memory in such blocks."""
    config = InternLM2Config.from_dict(make_config("7b"))
    target = resolve_target("fp16", "cuda", PAGED)
    assert paged_block_bytes(config, target) == 32 * 2**20
    assert paged_blocks(config, target, 100 * 2**30) == int(100 * 2**30 * 0.9 * 0.6 // 2**25)
    fixed = resolve_target("fp16", "cuda", {**PAGED, "num_blocks": "77"})
    assert paged_blocks(config, fixed, 100 * 2**30) == 77


def test_inspect_shows_the_paged_cache(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(make_config("7b")))
    text = describe(str(tmp_path), 4096)
    paged = text.splitlines()[-3:]
    assert "paged KV cache (use_paged_attention=true): 33.6 MB a block of 256 tokens" in paged[0]
    assert paged[1].startswith("    80 GB GPU: int4 ") and "sequences of 4096" in paged[1]
    assert paged[2].startswith("    141 GB GPU: int4 ")


# --- the load harness (benchmarks/engine_load.py), on the CPU's static engine ------------------


@pytest.mark.model
def test_engine_load_counts_every_token(tiny_checkpoint, tmp_path, capsys):
    """Closed loop and chat rows add up (streams x requests x output tokens), and greedy replies
    alone equal the same replies run together on the CPU's deterministic kernels. A model that
    fails is reported and costs the others nothing."""
    from benchmarks import engine_load

    folder = tmp_path / "int4"
    build(tiny_checkpoint, folder, "int4", "cpu")
    params = {
        "models": {"tiny": str(folder), "gone": str(tmp_path / "missing")},
        "streams": [1, 3],
        "prompt": 10,
        "output": 5,
        "requests": 2,
        "conversations": 1,  # the static engine continues one conversation at a time
        "turns": 2,
        "system": 20,
        "user_max": 20,
        "reply_max": 40,
        "identical": 3,
        "identical_output": 4,
    }
    rows = {(r["measurement"], r.get("streams")): r for r in engine_load.measure(params)}
    for streams in (1, 3):
        row = rows["closed_loop", streams]
        assert row["failed"] == 0 and row["turns"] == streams * 2
        assert row["output_tokens"] == streams * 2 * 5 and row["prompt_tokens"] == streams * 20
        assert row["output_tok_s"] == pytest.approx(row["output_tokens"] / row["seconds"])
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"]
    chat = rows["mixed", 1]
    assert chat["turns"] == 2 and chat["failed"] == 0 and chat["prompt_tokens"] > 20
    same = rows["identical", 3]
    assert same["identical_share"] == 1.0 and same["alone_repeatable"]
    assert "gone: FAILED" in capsys.readouterr().out

    # As HTTP clients send chat: each request carries the conversation so far, until a new one.
    model, engine = engine_load.open_engine(folder)
    a, b, c = (np.arange(100, 100 + n) for n in (7, 4, 5))
    turns = engine_load.drive(
        engine, [[(a, 3, True), (b, 2, False), (c, 2, True)]], False, resend=True
    )
    assert [t["prompt"] for t in turns] == [7, 7 + 3 + 4, 5]


def test_set_config_reaches_into_lists(tmp_path):
    """gpu_steps set-config: keys with dots stay keys, a number indexes a list (provider_options
    is one), JSON values parse and bare words stay strings."""
    import json

    from benchmarks import gpu_steps

    config = {"model": {"decoder": {"session_options": {"provider_options": [{"cuda": {}}]}}}}
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    options = "model/decoder/session_options"
    gpu_steps.main([
        "set-config", str(tmp_path),
        f'{options}/provider_options/0/cuda/enable_cuda_graph="0"',
        f'{options}/ep.cuda.fpa_intb_profile_m="1,2,4"',
        "search/max_length=4096",
        "search/note=bare",
    ])  # fmt: skip
    got = json.loads((tmp_path / "genai_config.json").read_text())
    session = got["model"]["decoder"]["session_options"]
    assert session["provider_options"] == [{"cuda": {"enable_cuda_graph": "0"}}]
    assert session["ep.cuda.fpa_intb_profile_m"] == "1,2,4"
    assert got["search"] == {"max_length": 4096, "note": "bare"}
