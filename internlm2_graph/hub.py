"""Turn `--input` into a local checkpoint folder, downloading from the Hugging Face Hub if needed.

`--input` is either a local folder or a Hub repo id (`owner/name`). For a repo id only the files the
build reads are fetched (config, safetensors weights, tokenizer); pickled `.bin`/`.pt` weights and
other frameworks' formats are never downloaded. Caching, HF_HOME, HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE are left entirely to `huggingface_hub`, so the converter behaves like every other
Hub client on the machine. Every Hub failure is re-raised as one `InternLM2GraphError` line saying
what to do next.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from pathlib import Path
from typing import TypeVar

from internlm2_graph.errors import InternLM2GraphError

# What the build reads. Anything else in the repo (pytorch_model*.bin, *.pt, *.pth, *.msgpack,
# *.h5, *.gguf, READMEs, images) can be large or pickled and is deliberately left on the Hub.
ALLOW_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    # pre-quantized checkpoints' quantization configs (AutoGPTQ, older AutoAWQ)
    "quantize_config.json",
    "quant_config.json",
)
CONFIG_PATTERNS = (
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "quant_config.json",
)
# Patterns match across "/", so "*.safetensors" alone would also pull e.g. `onnx/model.safetensors`
# or `original/*.safetensors` from sub-folders: the build only reads the repo's top level.
IGNORE_PATTERNS = ("*/*",)

# `name` or `owner/name`, as the Hub spells them (the Hub itself validates the details).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_LOGIN = "set HF_TOKEN or run `hf auth login` (formerly `huggingface-cli login`)"


def resolve_checkpoint(
    source: str,
    *,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    config_only: bool = False,
) -> Path:
    """Return a local folder holding the checkpoint named by `source`.

    With `config_only`, a hub id fetches just config.json and generation_config.json (what
    `inspect` reads), not gigabytes of weights.

    An existing local folder is returned as is, without touching the network. A string that can
    only be a path is an error if it does not exist. Anything else is taken as a Hub repo id and
    the build's files are downloaded into the Hugging Face cache (`cache_dir`, else HF_HOME's).
    """
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise InternLM2GraphError(
            f"--input {source!r} is a file: pass the folder that holds config.json and the "
            "*.safetensors weights, or a Hugging Face repo id such as internlm/internlm2_5-7b-chat"
        )
    if _looks_like_path(source):
        raise InternLM2GraphError(
            f"--input {source!r} does not exist: pass an existing checkpoint folder, or a "
            "Hugging Face repo id such as internlm/internlm2_5-7b-chat"
        )
    patterns = CONFIG_PATTERNS if config_only else ALLOW_PATTERNS
    folder = _download(source, patterns, cache_dir=cache_dir, revision=revision, token=token)
    if not config_only:
        _require_safetensors(folder, source, revision, cache_dir)
    return folder


def _looks_like_path(source: str) -> bool:
    """True when `source` cannot be a repo id, so a missing folder must not be sent to the Hub."""
    if source.startswith((".", "/", "~", os.sep)):
        return True
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    return any(sep in source for sep in separators) and not _REPO_ID.fullmatch(source)


def _download(
    repo_id: str,
    patterns: tuple[str, ...],
    *,
    cache_dir: str | None,
    revision: str | None,
    token: str | None,
) -> Path:
    # Imported here: a local folder needs no Hub client (and none of its HTTP stack).
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    failures = (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, *_transport_errors())
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=list(patterns),
            ignore_patterns=list(IGNORE_PATTERNS),
        )
    except failures as err:
        raise InternLM2GraphError(_explain(err, repo_id, revision)) from err
    return Path(folder)


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection errors of huggingface_hub's HTTP client: httpx2 from 2.0 on, httpx in 1.x."""
    errors = []
    for client in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(client).TransportError)
    return tuple(errors)


def _explain(err: Exception, repo_id: str, revision: str | None) -> str:
    """One line for a failed download: what went wrong and what the user can do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = _label(repo_id, revision)
    if isinstance(err, HFValidationError):
        return (
            f"--input {repo_id!r} is neither an existing folder nor a valid Hugging Face repo id "
            "(owner/name)"
        )
    # Gated is a subclass of not-found, so it must be tested first.
    if isinstance(err, GatedRepoError):
        return (
            f"{repo_id} is gated on the Hugging Face Hub: accept its terms on the model page, "
            f"then {_LOGIN}"
        )
    if isinstance(err, RevisionNotFoundError):
        return (
            f"revision {revision!r} does not exist in {repo_id}: pass an existing branch, tag, "
            "commit or refs/pr/N to --revision"
        )
    http_error = _find_cause(err, HfHubHTTPError)
    status = http_error.response.status_code if http_error is not None else None
    if isinstance(err, RepositoryNotFoundError) or status in (401, 403):
        return (
            f"--input {repo_id!r} is not a local folder and no Hugging Face repo by that id is "
            f"accessible: check the id; if the repo is private or gated, {_LOGIN}"
        )
    if status is not None:
        return f"the Hugging Face Hub answered HTTP {status} for {at}: try again later"
    if _find_cause(err, OfflineModeIsEnabled) or constants.is_offline_mode():
        return (
            f"{at} is not (fully) in the Hugging Face cache and HF_HUB_OFFLINE is set: run once "
            "online to cache it, or pass a local checkpoint folder to --input"
        )
    return (
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to fetch {at}, and it is "
        "not cached: check the network (or HF_ENDPOINT), or pass a local checkpoint folder"
    )


_E = TypeVar("_E", bound=BaseException)


def _find_cause(err: BaseException, kind: type[_E]) -> _E | None:
    """huggingface_hub wraps the root cause (offline, HTTP 503, refused) in a cache-miss error."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _require_safetensors(folder: Path, repo_id: str, revision: str | None, cache_dir: str | None):
    """Fail early, naming the weights the repo does have, when it ships no safetensors.

    Checked after the download rather than with a listing call before it: `snapshot_download`
    already fetched the repo's file list and cached it next to the snapshot, so reading it back
    costs no request and also works offline. Only small config/tokenizer files were fetched.
    """
    if any(folder.glob("*.safetensors")):
        return
    # The snapshot folder is named after the commit it holds: .../snapshots/<commit sha>.
    other = _other_weights(repo_id, commit=folder.name, cache_dir=cache_dir)
    found = f" (it has {', '.join(other[:3])}{', ...' if len(other) > 3 else ''})" if other else ""
    raise InternLM2GraphError(
        f"{_label(repo_id, revision)} has no *.safetensors weights{found}; from the Hub this "
        "converter fetches safetensors only. Use a revision that has them (the Hub's safetensors "
        "conversion bot opens a pull request: pass it as --revision refs/pr/N), or download the "
        "repo and pass its folder to --input (pytorch_model*.bin files are read there without "
        "running their pickle), or convert the weights once with torch + safetensors "
        "(safetensors.torch.save_file)"
    )


def _other_weights(repo_id: str, *, commit: str, cache_dir: str | None) -> list[str]:
    """Weight files in the cached listing of `commit` that this converter cannot read."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        listing = get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return []
    # PyTorch formats first: those are what a safetensors conversion PR or script starts from.
    suffixes = [".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf"]
    found = [(Path(f.path).suffix, f.path) for f in listing]
    return [path for _, path in sorted((suffixes.index(s), p) for s, p in found if s in suffixes)]


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id} (revision {revision})" if revision else repo_id
