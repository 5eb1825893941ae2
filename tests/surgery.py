"""Damage or edit a copy of a synthetic checkpoint the way real downloads and exports go wrong.

Written against the safetensors format itself (8-byte little-endian header length, JSON header,
data), not through internlm2_graph, so the tests do not lean on the code they check.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"


def copy_checkpoint(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def shard_of(folder: Path, name: str) -> Path:
    index = folder / INDEX
    if index.is_file():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def read_header(path: Path) -> tuple[dict, bytes]:
    """The JSON header and the data bytes that follow it."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_header(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_entry(folder: Path, name: str, **changes) -> None:
    """Change a tensor's header entry (dtype, shape) and leave its bytes as they are."""
    path = shard_of(folder, name)
    header, data = read_header(path)
    header[name].update(changes)
    write_header(path, header, data)


def drop_tensor(folder: Path, name: str) -> None:
    """Remove a tensor from its shard's header and from the index, as a bad export would."""
    path = shard_of(folder, name)
    header, data = read_header(path)
    del header[name]
    write_header(path, header, data)
    index = folder / INDEX
    if index.is_file():
        content = json.loads(index.read_text())
        del content["weight_map"][name]
        index.write_text(json.dumps(content))


def set_tensor(folder: Path, name: str, values: np.ndarray) -> None:
    """Overwrite a bf16 tensor's data in place with `values` (same shape)."""
    path = shard_of(folder, name)
    header, _ = read_header(path)
    entry = header[name]
    assert entry["dtype"] == "BF16" and list(values.shape) == entry["shape"]
    start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0] + entry["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.ascontiguousarray(values, dtype=ml_dtypes.bfloat16).tobytes())


def get_tensor(folder: Path, name: str) -> np.ndarray:
    """A bf16 tensor as float32."""
    header, data = read_header(shard_of(folder, name))
    entry = header[name]
    begin, end = entry["data_offsets"]
    raw = np.frombuffer(data[begin:end], dtype=ml_dtypes.bfloat16)
    return raw.astype(np.float32).reshape(entry["shape"])


def edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content, indent=2))


def steer(folder: Path, default: int, transitions: dict[int, int] | None = None) -> None:
    """Make greedy decoding follow `transitions` (token -> next token), else emit `default`.

    Each token with a transition gets a large component of its own in its embedding, and every
    token a large shared one; both survive the residual stream (the layers add O(1) values to
    a component of 100). The lm head reads the shared component into `default`'s row and each
    own component, four times as strongly, into the next token's row; all other rows are zero.
    """
    transitions = transitions or {}
    embedding = get_tensor(folder, "model.tok_embeddings.weight")
    head = np.zeros_like(get_tensor(folder, "output.weight"))
    embedding[:, 0] = 100.0
    head[default, 0] = 1.0
    for dim, (token, following) in enumerate(transitions.items(), start=1):
        embedding[token, dim] = 100.0
        head[following, dim] = 4.0
    set_tensor(folder, "model.tok_embeddings.weight", embedding)
    set_tensor(folder, "output.weight", head)
