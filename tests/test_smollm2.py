"""fixtures/smollm2.py without the download: llama.cpp's Q/K row permutation and its inverse,
wqkv packing, and a GGUF round trip of a tiny synthetic checkpoint (when `gguf` is installed)."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from fixtures.smollm2 import internlm2_name, pack_wqkv, permute_rows, unpermute_rows
from internlm2_graph.config import InternLM2Config
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.synthetic.checkpoint import tensor_shapes
from internlm2_graph.weights import split_wqkv

heads_and_dim = st.tuples(st.integers(1, 6), st.integers(1, 4), st.sampled_from([2, 4, 8, 16, 64]))


def rope_rotate_half(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Hugging Face / InternLM2 rotary on one head's rows: pairs (i, i + d/2)."""
    a, b = np.split(x, 2)
    return np.concatenate(
        [a * np.cos(theta) - b * np.sin(theta), b * np.cos(theta) + a * np.sin(theta)]
    )


def rope_interleaved(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """llama.cpp's LLAMA (normal) rotary: pairs (2i, 2i + 1)."""
    a, b = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = a * np.cos(theta) - b * np.sin(theta)
    out[1::2] = b * np.cos(theta) + a * np.sin(theta)
    return out


@given(heads_and_dim, st.integers(0, 2**31))
@example((9, 1, 64), 0)  # SmolLM2's query heads
@example((3, 1, 64), 0)  # and its KV heads
def test_unpermute_inverts_llama_cpp_permute(shape, seed):
    n_head, _, d = shape
    w = np.random.default_rng(seed).standard_normal((n_head * d, 5))
    assert np.array_equal(unpermute_rows(permute_rows(w, n_head), n_head), w)
    assert np.array_equal(permute_rows(unpermute_rows(w, n_head), n_head), w)


@given(heads_and_dim, st.integers(0, 2**31))
@example((9, 1, 64), 1)
def test_permutation_turns_rotate_half_into_interleaved_rotary(shape, seed):
    """Why llama.cpp permutes: its interleaved rotary on the permuted rows is the rotate-half
    rotary on the original rows. So unpermuting a GGUF's Q/K gives rotate-half weights."""
    n_head, _, d = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(n_head * d)  # one token's projected query, all heads
    theta = rng.uniform(0, 10, d // 2)
    hf = np.concatenate([rope_rotate_half(h, theta) for h in np.split(q, n_head)])
    gguf_q = permute_rows(q, n_head)
    gguf = np.concatenate([rope_interleaved(h, theta) for h in np.split(gguf_q, n_head)])
    np.testing.assert_allclose(unpermute_rows(gguf, n_head), hf, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 8), st.integers(1, 6), st.sampled_from([16, 64, 128]))
@example(3, 3, 64)  # SmolLM2-135M
@example(8, 2, 128)  # InternLM2-1.8B
@example(8, 6, 128)  # InternLM2-20B
def test_pack_wqkv_is_the_inverse_of_split_wqkv(kv_heads, group, head_dim):
    heads = kv_heads * group
    config = InternLM2Config.from_dict(
        make_config(
            "tiny",
            hidden_size=heads * head_dim,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
        )
    )
    rng = np.random.default_rng(0)
    q = rng.standard_normal((heads * head_dim, 3))
    k, v = rng.standard_normal((2, kv_heads * head_dim, 3))
    for got, want in zip(split_wqkv(pack_wqkv(q, k, v, kv_heads), config), (q, k, v)):
        assert np.array_equal(got, want)


def test_tensor_names():
    assert internlm2_name("token_embd.weight") == "model.tok_embeddings.weight"
    assert internlm2_name("output_norm.weight") == "model.norm.weight"
    assert internlm2_name("output.weight") == "output.weight"
    assert internlm2_name("blk.7.ffn_gate.weight") == "model.layers.7.feed_forward.w1.weight"
    assert internlm2_name("blk.7.ffn_up.weight") == "model.layers.7.feed_forward.w3.weight"
    assert internlm2_name("blk.7.ffn_down.weight") == "model.layers.7.feed_forward.w2.weight"
    assert internlm2_name("blk.0.attn_output.weight") == "model.layers.0.attention.wo.weight"
    assert internlm2_name("blk.0.attn_norm.weight") == "model.layers.0.attention_norm.weight"
    assert internlm2_name("blk.0.attn_q.weight") is None


# --- GGUF round trip ------------------------------------------------------------------------


def write_gguf(path, checkpoint, config: dict) -> dict[str, np.ndarray]:
    """A llama GGUF of an InternLM2 checkpoint, the way llama.cpp's converter writes one:
    q/k/v split and permuted, Llama names, F32, tied head (no output.weight)."""
    gguf = pytest.importorskip("gguf")
    tensors = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        tensors |= {k: v.astype(np.float32) for k, v in load_file(shard).items()}
    cfg = InternLM2Config.from_dict(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tensor("token_embd.weight", tensors["model.tok_embeddings.weight"])
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        q, k, v = split_wqkv(tensors[p + "attention.wqkv.weight"], cfg)
        writer.add_tensor(f"blk.{n}.attn_q.weight", permute_rows(q, cfg.num_attention_heads))
        writer.add_tensor(f"blk.{n}.attn_k.weight", permute_rows(k, cfg.num_key_value_heads))
        writer.add_tensor(f"blk.{n}.attn_v.weight", np.ascontiguousarray(v))
        for gguf_kind in ("attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"):
            name = f"blk.{n}.{gguf_kind}.weight"
            writer.add_tensor(name, tensors[internlm2_name(name)])
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_gguf_round_trip(tmp_path):
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from fixtures.smollm2 import gguf_metadata, internlm2_config, plan_tensors

    # The embedding doubles as the head, as in SmolLM2.
    config = make_config("tiny", num_attention_heads=4, num_key_value_heads=2)
    source = write_checkpoint(tmp_path / "src", config, seed=3)
    tensors = write_gguf(tmp_path / "tiny.gguf", source, config)
    reader = GGUFReader(tmp_path / "tiny.gguf")
    meta = gguf_metadata(reader)
    meta |= {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    converted = internlm2_config(meta)
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert converted[key] == config[key]
    assert converted["rms_norm_eps"] == config["rms_norm_eps"]
    plan = plan_tensors(reader, converted)
    assert [p.name for p in plan] == list(tensor_shapes(config))
    for item in plan:
        want = tensors["model.tok_embeddings.weight" if item.name == "output.weight" else item.name]
        got = item.values()
        assert got.shape == item.shape == want.shape, item.name
        assert np.array_equal(got.astype(ml_dtypes.bfloat16).astype(np.float32), want), item.name


def test_held_out_text_shares_nothing_with_calibration_or_selection_texts():
    """The third text quality_per_byte --held-out scores must be unseen: no 80-character
    stretch of it (sampled every 997 characters) in the calibration text or in the prose and
    code the layouts were chosen on."""
    from fixtures.smollm2 import code_text, eval_text, held_out_text
    from internlm2_graph.calibration.data import default_text

    held = held_out_text()
    assert len(held) > 100_000  # enough for the benchmark's 2048 tokens
    seen = "\n".join((default_text(), eval_text(), code_text()))
    stretches = [held[i : i + 80] for i in range(0, len(held) - 80, 997)]
    assert [s for s in stretches if s in seen] == []
