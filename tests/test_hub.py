"""End-to-end tests of `resolve_checkpoint` against a local Hub stand-in (tests/hub_server.py).

Nothing is mocked on the huggingface_hub side: real `snapshot_download` calls go over HTTP to
127.0.0.1 and fill a real cache under tmp_path. huggingface_hub reads HF_ENDPOINT and
HF_HUB_OFFLINE once, at import, into `huggingface_hub.constants`, so in-process tests set the
environment variable *and* patch the constant; `test_environment_variables_alone_are_honoured`
runs a fresh interpreter to prove the plain variables work for a real user.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubServer
from huggingface_hub import constants
from safetensors.numpy import save_file

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.hub import resolve_checkpoint

TOKEN = "hf_test_gated_token"
RESOLVE_TEMPLATE = "/{repo_id}/resolve/{revision}/{filename}"  # as in huggingface_hub.constants
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
TOKENIZER = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
CONFIGS = ["config.json", "generation_config.json", "model.safetensors.index.json"]
NEEDED = {*CONFIGS, *SHARDS, *TOKENIZER}
# Served alongside the checkpoint, as on real repos, and never to be fetched (not even a HEAD).
UNWANTED = {
    "pytorch_model.bin",
    "consolidated.pth",
    "flax_model.msgpack",
    "tf_model.h5",
    "model.gguf",
    "README.md",
    "original/consolidated.safetensors",
}


def write_checkpoint(folder: Path, *, hidden: int = 8, safetensors: bool = True) -> Path:
    """A dummy InternLM2-shaped repo: real JSON and safetensors, stand-in bytes for the rest."""
    folder.mkdir(parents=True)
    _json(folder / "config.json", {"hidden_size": hidden})
    _json(folder / "generation_config.json", {"eos_token_id": 2})
    _json(folder / "tokenizer_config.json", {"tokenizer_class": "InternLM2Tokenizer"})
    _json(folder / "special_tokens_map.json", {"eos_token": "</s>"})
    (folder / "tokenizer.model").write_bytes(b"sentencepiece model stand-in")
    for name in UNWANTED - {"original/consolidated.safetensors"}:
        (folder / name).write_bytes(b"not for the converter: " + name.encode())
    if safetensors:
        names = ["model.tok_embeddings.weight", "output.weight"]
        for shard, name in zip(SHARDS, names, strict=True):
            save_file({name: np.full((4, hidden), 0.5, np.float32)}, str(folder / shard))
        weight_map = dict(zip(names, SHARDS, strict=True))
        _json(folder / "model.safetensors.index.json", {"weight_map": weight_map})
        (folder / "original").mkdir()
        save_file({"w": np.zeros(2, np.float32)}, str(folder / "original/consolidated.safetensors"))
    return folder


def _json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload))


def hidden_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["hidden_size"]


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point huggingface_hub at `url` the way HF_ENDPOINT would at import time."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + RESOLVE_TEMPLATE)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def closed_port_url() -> str:
    """A 127.0.0.1 URL nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may see the developer's token or cache, or reach the real Hub."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a CI's HTTP(S)_PROXY must not intercept us
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    use_endpoint(monkeypatch, closed_port_url())  # tests that want a Hub re-point it


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    served = tmp_path / "served"
    main = write_checkpoint(served / "main", hidden=8)
    repos = {
        "org/model": {"main": main, "v2": write_checkpoint(served / "v2", hidden=16)},
        "org/gated": {"main": main},
        # Only pickled weights on main; the safetensors conversion lives in a Hub PR.
        "org/bin-only": {
            "main": write_checkpoint(served / "bin", safetensors=False),
            "refs/pr/3": write_checkpoint(served / "pr3", hidden=32),
        },
    }
    with HubServer(repos, gated={"org/gated": TOKEN}) as server:
        use_endpoint(monkeypatch, server.url)
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


def test_downloads_only_what_the_build_needs(hub: HubServer, cache: str) -> None:
    folder = resolve_checkpoint("org/model", cache_dir=cache)

    assert hub.downloaded() == NEEDED
    assert not hub.touched() & UNWANTED
    assert {p.name for p in folder.iterdir()} == NEEDED
    assert folder.is_relative_to(cache)
    assert hidden_size(folder) == 8


def test_config_only_fetches_no_weights(hub: HubServer, cache: str) -> None:
    """What `internlm2-graph inspect HUB_ID` asks for: sizes, not gigabytes."""
    folder = resolve_checkpoint("org/model", cache_dir=cache, config_only=True)

    assert hub.downloaded() <= {"config.json", "generation_config.json"}
    assert "config.json" in hub.downloaded()
    assert hidden_size(folder) == 8


def test_offline_second_call_is_served_from_the_cache(
    hub: HubServer, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = resolve_checkpoint("org/model", cache_dir=cache)
    requests_so_far = len(hub.requests)
    go_offline(monkeypatch)

    assert resolve_checkpoint("org/model", cache_dir=cache) == online
    assert len(hub.requests) == requests_so_far


def test_offline_with_nothing_cached_says_run_once_online(
    hub: HubServer, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    go_offline(monkeypatch)
    with pytest.raises(InternLM2GraphError, match="HF_HUB_OFFLINE.*run once online"):
        resolve_checkpoint("org/model", cache_dir=cache)
    assert hub.requests == []


def test_revision_selects_another_commit(hub: HubServer, cache: str) -> None:
    assert hidden_size(resolve_checkpoint("org/model", cache_dir=cache, revision="v2")) == 16
    main_sha = hub.refs["org/model"]["main"]
    pinned = resolve_checkpoint("org/model", cache_dir=cache, revision=main_sha)
    assert pinned.name == main_sha
    assert hidden_size(pinned) == 8


def test_unknown_revision_is_named(hub: HubServer, cache: str) -> None:
    with pytest.raises(InternLM2GraphError, match="revision 'nope' does not exist in org/model"):
        resolve_checkpoint("org/model", cache_dir=cache, revision="nope")


def test_gated_repo_needs_a_token(
    hub: HubServer, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InternLM2GraphError, match="gated.*HF_TOKEN.*hf auth login"):
        resolve_checkpoint("org/gated", cache_dir=cache)
    assert hub.downloaded() == set()

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hidden_size(resolve_checkpoint("org/gated", cache_dir=cache)) == 8


def test_gated_repo_accepts_an_explicit_token(hub: HubServer, cache: str) -> None:
    with pytest.raises(InternLM2GraphError, match="gated"):
        resolve_checkpoint("org/gated", cache_dir=cache, token="hf_wrong")
    assert hidden_size(resolve_checkpoint("org/gated", cache_dir=cache, token=TOKEN)) == 8


def test_unknown_repo_says_check_the_id(hub: HubServer, cache: str) -> None:
    with pytest.raises(InternLM2GraphError, match="'org/missing' is not a local folder.*check"):
        resolve_checkpoint("org/missing", cache_dir=cache)


def test_bin_only_repo_explains_how_to_get_safetensors(hub: HubServer, cache: str) -> None:
    with pytest.raises(InternLM2GraphError) as raised:
        resolve_checkpoint("org/bin-only", cache_dir=cache)
    message = str(raised.value)
    assert "no *.safetensors" in message and "pytorch_model.bin" in message
    assert "--revision refs/pr/N" in message and "safetensors.torch.save_file" in message
    assert not hub.touched() & UNWANTED

    # The suggested fix works: the conversion PR's ref is percent-encoded on the wire.
    converted = resolve_checkpoint("org/bin-only", cache_dir=cache, revision="refs/pr/3")
    assert hidden_size(converted) == 32


def test_unreachable_hub_is_reported(cache: str) -> None:
    # The autouse fixture points HF_ENDPOINT at a port nobody listens on.
    with pytest.raises(InternLM2GraphError, match="cannot reach the Hugging Face Hub"):
        resolve_checkpoint("org/model", cache_dir=cache)


def test_local_folder_is_used_without_network(hub: HubServer, tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "local")
    assert resolve_checkpoint(str(folder)) == folder
    assert hub.requests == []


def test_local_folder_wins_over_a_repo_id_of_the_same_name(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_checkpoint(tmp_path / "org" / "model")
    assert resolve_checkpoint("org/model") == Path("org/model")
    assert hub.requests == []


@pytest.mark.parametrize("missing", ["./nope", "/no/such/dir", "~/no-such-dir-xyz", "a/b/c"])
def test_missing_local_path_is_not_sent_to_the_hub(hub: HubServer, missing: str) -> None:
    with pytest.raises(InternLM2GraphError, match="does not exist"):
        resolve_checkpoint(missing)
    assert hub.requests == []


def test_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    weights = write_checkpoint(tmp_path / "ckpt") / SHARDS[0]
    with pytest.raises(InternLM2GraphError, match="is a file: pass the folder"):
        resolve_checkpoint(str(weights))


def test_invalid_repo_id(hub: HubServer) -> None:
    with pytest.raises(InternLM2GraphError, match="neither an existing folder nor a valid"):
        resolve_checkpoint("not a repo id!")
    assert hub.requests == []


def test_environment_variables_alone_are_honoured(hub: HubServer, tmp_path: Path) -> None:
    """A fresh interpreter sees only HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE, as a user would."""
    script = "from internlm2_graph.hub import resolve_checkpoint as r; print(r('org/model'))"
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def run(**extra: str) -> Path:
        out = subprocess.run(
            [sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return Path(out.stdout.strip())

    online = run()
    assert online.is_relative_to(tmp_path / "home" / "hub")
    requests_so_far = len(hub.requests)
    assert run(HF_HUB_OFFLINE="1") == online
    assert len(hub.requests) == requests_so_far
