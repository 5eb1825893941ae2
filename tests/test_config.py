import json

import pytest

from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.synthetic import SIZES, make_config


@pytest.mark.parametrize("size", sorted(SIZES))
def test_real_sizes_derive_head_dim_and_group(size):
    config = InternLM2Config.from_dict(make_config(size))
    assert config.head_dim * config.num_attention_heads == config.hidden_size
    assert config.group * config.num_key_value_heads == config.num_attention_heads


def test_published_sizes():
    # The numbers in the model cards, from the config alone.
    expected = {"1.8b": (128, 2), "7b": (128, 4), "20b": (128, 6)}
    for size, (head_dim, group) in expected.items():
        config = InternLM2Config.from_dict(make_config(size))
        assert (config.head_dim, config.group) == (head_dim, group)


def test_generation_config_supplies_eos_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(make_config("tiny")))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1022]}))
    assert InternLM2Config.from_dir(tmp_path).eos_token_id == (2, 1022)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "expected InternLM2ForCausalLM"),
        ({"num_attention_heads": 5}, "not divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "not divisible by num_key_value_heads"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn'"),
        ({"rope_scaling": {"type": "linear"}}, "factor must be a positive number"),
        ({"hidden_size": 0}, "'hidden_size' must be a positive integer"),
        ({"max_position_embeddings": 2**24 + 1}, "more than the 16777216 the graph counts"),
        (
            {"max_position_embeddings": 2**23, "rope_scaling": {"type": "dynamic", "factor": 4}},
            "gives 33554432 positions",
        ),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(InternLM2GraphError, match=message):
        InternLM2Config.from_dict(make_config("tiny", **overrides), source="x/config.json")


def test_missing_config(tmp_path):
    with pytest.raises(InternLM2GraphError, match="config.json: not found"):
        InternLM2Config.from_dir(tmp_path)


def test_sampling_settings_fall_back_to_hugging_face_defaults():
    generation = {"temperature": 0.8, "top_p": None, "top_k": 0, "do_sample": True}
    sampling = InternLM2Config.from_dict(make_config("tiny"), generation).sampling
    assert sampling["temperature"] == 0.8 and sampling["do_sample"] is True
    assert sampling["top_p"] == 1.0  # null: the default
    assert sampling["top_k"] == 0  # "no top-k filter", kept: onnxruntime-genai reads it so too
    assert InternLM2Config.from_dict(make_config("tiny")).sampling["top_k"] == 50
