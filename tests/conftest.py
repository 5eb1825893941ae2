import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI: few, fast examples. `HYPOTHESIS_PROFILE=thorough pytest` explores far more.
settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A chat-style tiny checkpoint, sharded like the hub's, with a real tokenizer."""
    from internlm2_graph.synthetic import make_config, write_checkpoint

    folder = tmp_path_factory.mktemp("tiny-ckpt")
    config = make_config("tiny", max_position_embeddings=256)
    return write_checkpoint(folder, config, chat=True, seed=1, shard_bytes=200_000)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_checkpoint, tmp_path_factory) -> Path:
    from internlm2_graph import build

    out = tmp_path_factory.mktemp("built") / "fp32"
    build(tiny_checkpoint, out, "fp32", "cpu")
    return out
