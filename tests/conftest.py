import os
import shutil
from pathlib import Path

import pytest
from helpers import tokenizer_folder
from hypothesis import HealthCheck, settings

# Files shared between sessions, beside the repository (CI copies `shared/` next to its clone).
SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
INTERNLM_V1_PIECES = 103168

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


@pytest.fixture(scope="session")
def internlm_v1_tokenizer(tmp_path_factory) -> Path:
    """Tokenizer files built from InternLM v1's published tokenizer.model: a real vocabulary
    (103168 pieces) with InternLM2's settings. See ../shared/fixtures/README.md."""
    model = SHARED_FIXTURES / "internlm-v1-tokenizer.model"
    if not model.is_file():
        pytest.skip(f"{model} not found: the real vocabulary is kept in shared/ beside the repo")
    checkpoint = tmp_path_factory.mktemp("v1-checkpoint")
    shutil.copyfile(model, checkpoint / "tokenizer.model")
    return tokenizer_folder(checkpoint, tmp_path_factory.mktemp("v1-tokenizer"), INTERNLM_V1_PIECES)
