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

# The test being set up or run, for the guard below (set before its fixtures are).
_RUNNING: dict = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _RUNNING["item"] = item


@pytest.fixture(scope="session", autouse=True)
def models_only_in_model_tests():
    """`-m "not model"` must run only the fast numpy tests: a test (or a fixture it asks for)
    that writes a model folder or opens one in onnxruntime-genai without the `model` marker
    fails here, naming the marker. (Subprocesses are out of reach: tests that build through
    one carry the marker by hand.)"""
    import onnxruntime_genai as og

    from internlm2_graph import package

    def guarded(f, what):
        def checked(*args, **kwargs):
            item = _RUNNING.get("item")
            if item is not None and item.get_closest_marker("model") is None:
                raise AssertionError(f"{item.nodeid} {what}: mark it @pytest.mark.model")
            return f(*args, **kwargs)

        return checked

    save_model, og_model = package.save_model, og.Model
    package.save_model = guarded(save_model, "writes a model")
    og.Model = guarded(og_model, "runs a model")
    yield
    package.save_model, og.Model = save_model, og_model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A chat-style tiny checkpoint, sharded like the hub's, with a real tokenizer."""
    from internlm2_graph.synthetic import make_config, write_checkpoint

    folder = tmp_path_factory.mktemp("tiny-ckpt")
    config = make_config("tiny", max_position_embeddings=256)
    return write_checkpoint(folder, config, chat=True, seed=1, shard_bytes=200_000)


@pytest.fixture(scope="session")
def serving_folder(tmp_path_factory) -> Path:
    """A tiny chat model with a 2048-token context: room for a reply long enough to cancel
    (the serve and replicas tests)."""
    from internlm2_graph import build
    from internlm2_graph.synthetic import make_config, write_checkpoint

    root = tmp_path_factory.mktemp("serving")
    config = make_config("tiny", max_position_embeddings=2048)
    checkpoint = write_checkpoint(root / "ckpt", config, chat=True, seed=1)
    build(checkpoint, root / "fp32", "fp32", "cpu")
    return root / "fp32"


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
