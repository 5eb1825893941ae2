"""The built graph against the numpy reference: prompt, KV-cache decode, batches, any config."""

import json

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from internlm2_graph import build
from internlm2_graph.reference import Reference
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.verify import eos_ids, og_greedy

FP32_TOLERANCE = 1e-4
PROMPT = [1, 17, 230, 5, 981, 44, 12, 600, 73]


@pytest.mark.model
def test_prompt_and_decode_steps_match_reference(tiny_fp32, tiny_checkpoint):
    steps = 12
    expected_tokens, expected_logits = Reference(tiny_checkpoint).greedy(
        PROMPT, steps, eos_ids(tiny_fp32)
    )
    (tokens,), logits = og_greedy(tiny_fp32, [PROMPT], steps)
    assert len(expected_tokens) == steps, "the prompt must decode >= 8 steps before an eos"
    for step, (got, want) in enumerate(zip(logits, expected_logits)):
        error = np.max(np.abs(got[0] - want))
        assert error <= FP32_TOLERANCE, f"step {step}: max |logit difference| {error}"
    assert tokens == expected_tokens


@pytest.mark.model
def test_batch_of_different_lengths_gives_each_prompt_its_own_tokens(tiny_fp32, tiny_checkpoint):
    reference = Reference(tiny_checkpoint)
    prompts = [PROMPT, [1, 900, 31, 4]]
    tokens, _ = og_greedy(tiny_fp32, prompts, 8)
    for prompt, got in zip(prompts, tokens):
        want = reference.greedy(prompt, 8, eos_ids(tiny_fp32))[0]
        assert got[: len(want)] == want


@pytest.mark.model
def test_genai_config_describes_the_model(tiny_fp32, tiny_checkpoint):
    genai = json.loads((tiny_fp32 / "genai_config.json").read_text())
    ckpt = json.loads((tiny_checkpoint / "config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert genai["model"]["type"] == "internlm2"
    assert decoder["num_key_value_heads"] == ckpt["num_key_value_heads"]
    assert decoder["head_size"] == ckpt["hidden_size"] // ckpt["num_attention_heads"]
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert genai["model"]["eos_token_id"] == generation["eos_token_id"]
    assert genai["search"]["past_present_share_buffer"] is True


@st.composite
def configs(draw):
    kv_heads = draw(st.integers(1, 4))
    group = draw(st.sampled_from([1, 2, 3, 4, 6, 7]))
    head_dim = draw(st.sampled_from([16, 32, 64]))
    heads = kv_heads * group
    scaling = draw(st.sampled_from([None, "linear", "dynamic"]))
    return make_config(
        "tiny",
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=draw(st.sampled_from([32, 96, 136])),
        num_hidden_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([10000.0, 1e6])),
        # Dynamic NTK: small enough that decoding crosses it and switches bases mid-generation.
        max_position_embeddings=16 if scaling == "dynamic" else 32,
        rope_scaling=None if scaling is None else {"type": scaling, "factor": 2.0},
    )


@pytest.mark.model
@given(config=configs())
@example(config=make_config("tiny", num_attention_heads=4, num_key_value_heads=4))  # MHA
@example(config=make_config("tiny", num_attention_heads=4, num_key_value_heads=1))  # MQA
@example(
    config=make_config(
        "tiny",
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=1,
        bias=True,
        max_position_embeddings=16,
        rope_scaling={"type": "dynamic", "factor": 3.0},
    )
)
def test_any_config_matches_reference(config, tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    checkpoint = write_checkpoint(root / "ckpt", config, chat=False)
    build(checkpoint, root / "model", "fp32", "cpu")
    prompt = [1, 7, 300, 42, 9, 77, 5, 11, 401, 3]
    steps = 12  # 10 + 12 tokens: past max_position_embeddings=16
    expected_tokens, expected_logits = Reference(checkpoint).greedy(
        prompt, steps, eos_ids(root / "model")
    )
    (tokens,), logits = og_greedy(root / "model", [prompt], steps)
    errors = [float(np.max(np.abs(g[0] - w))) for g, w in zip(logits, expected_logits)]
    assert max(errors) <= FP32_TOLERANCE, errors
    assert tokens == expected_tokens


@pytest.mark.model
def test_prompt_longer_than_trained_window_matches_token_by_token_decoding(tmp_path):
    """Dynamic NTK past max_position_embeddings: the graph's per-position table equals what the
    reference computes when it is fed one token at a time (see rope.py for why)."""
    config = make_config(
        "tiny",
        max_position_embeddings=8,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    checkpoint = write_checkpoint(tmp_path / "ckpt", config, chat=False)
    build(checkpoint, tmp_path / "model", "fp32", "cpu")
    prompt = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 12 > 8
    reference = Reference(checkpoint)
    cache, want = None, None
    for token in prompt:
        want, cache = reference.forward([token], cache)
    _, logits = og_greedy(tmp_path / "model", [prompt], 1)
    assert np.max(np.abs(logits[0][0] - want[-1])) <= FP32_TOLERANCE


@pytest.mark.parametrize("bad_steps", [0])
def test_reference_greedy_without_steps_returns_prompt_logits(tiny_checkpoint, bad_steps):
    tokens, logits = Reference(tiny_checkpoint).greedy(PROMPT, bad_steps)
    assert tokens == [] and len(logits) == 1


@pytest.mark.model
def test_dynamic_ntk_decodes_past_the_trained_context(tmp_path):
    """max_length beyond max_position_embeddings x factor is honoured for dynamic NTK (defined
    at any length): the rotary table grows to it, and decoding past the old end still matches
    token-by-token decoding in the reference."""
    config = make_config(
        "tiny",
        num_hidden_layers=1,
        max_position_embeddings=32,
        rope_scaling={"type": "dynamic", "factor": 2.0},
    )
    checkpoint = write_checkpoint(tmp_path / "ckpt", config, chat=False, seed=4)
    build(checkpoint, tmp_path / "m", "fp32", "cpu", {"max_length": "160"})
    genai = json.loads((tmp_path / "m" / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == 160
    steps = 160 - len(PROMPT)  # to the very last position, 2.5x the trained 64
    want_tokens, want_logits = Reference(checkpoint).greedy(PROMPT, steps)
    (tokens,), logits = og_greedy(tmp_path / "m", [PROMPT], steps)
    assert len(logits) == len(want_logits) == steps + 1
    errors = [np.max(np.abs(got[0] - want)) for got, want in zip(logits, want_logits)]
    assert max(errors) <= FP32_TOLERANCE
    assert tokens == want_tokens
