"""Lazy, one-tensor-at-a-time access to a checkpoint's safetensors shards.

The safetensors header is parsed here rather than through `safe_open` so that a truncated or
corrupt file is reported by name before the build writes anything, and so that a tensor can be
read a block of rows at a time: the largest tensors (embedding, lm head) are quantized and
transposed in slices, which is what keeps peak memory flat as models grow. A folder with no
safetensors but `pytorch_model*.bin` files is read the same way: torch_pickle finds each
tensor's bytes inside the zip archive without running its pickle.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from internlm2_graph.errors import InternLM2GraphError

DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
# Integer tensors hold packed 4-bit codes, zero points and g_idx of pre-quantized checkpoints
# (prequantized.py); binding refuses them wherever a float weight is expected.
INT_DTYPES = {"I32": np.int32, "I64": np.int64}
ALL_DTYPES = {**DTYPES, **INT_DTYPES}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# PyTorch weights, read by torch_pickle without running the pickle: where no safetensors are.
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER = 100 * 1024 * 1024
# How a shard cloned without git-lfs starts: "version https://git-lfs.github.com/spec/v1".
# As a header length these bytes would be ~2e18, so no real safetensors file starts so.
LFS_POINTER = b"version "


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: file, byte offset, dtype, shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(ALL_DTYPES[self.dtype]).itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in DTYPES

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the tensor as float32; rows are contiguous on disk."""
        raw = self.read_stored(start, stop)
        return raw.astype(np.float32, copy=raw.dtype != np.float32)

    def read_stored(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) in the stored dtype (bf16 as ml_dtypes.bfloat16)."""
        rows = self.shape[0] if self.shape else 1
        stop = rows if stop is None else min(stop, rows)
        row_shape = self.shape[1:]
        dtype = np.dtype(ALL_DTYPES[self.dtype])
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        count = (stop - start) * row_bytes // dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * row_bytes)
            raw = np.fromfile(f, dtype=dtype, count=count)
        if raw.size != count:
            raise InternLM2GraphError(
                f"{self.path}: tensor {self.name} is cut short (file truncated); "
                "download the shard again"
            )
        return raw.reshape((stop - start, *row_shape) if self.shape else ())

    def read(self) -> np.ndarray:
        return self.read_rows()


class Checkpoint:
    """The tensors of a checkpoint folder, by their InternLM2 names; nothing read until asked."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, TensorRef] = {}
        for shard in self._shards():
            for ref in read_header(shard) if shard.suffix == ".safetensors" else _torch(shard):
                self.tensors[ref.name] = ref

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise InternLM2GraphError(
                f"{self.folder}: tensor {name} is missing from the checkpoint (none of its "
                "*.safetensors files holds it); download the checkpoint again or check it is "
                "an InternLM2 model"
            ) from None

    def __iter__(self) -> Iterator[TensorRef]:
        return iter(self.tensors.values())

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX
        if not index.is_file() and not any(self.folder.glob("*.safetensors")):
            index = self.folder / BIN_INDEX  # same weight_map format
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise InternLM2GraphError(
                    f"{index}: not a safetensors index (needs a 'weight_map' object)"
                ) from None
            shards = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            for shard in shards:
                if not shard.is_file():
                    raise InternLM2GraphError(
                        f"{index} names shard {shard.name}, which is not in {self.folder}; "
                        "download the missing shard"
                    )
            return shards
        if (self.folder / SINGLE).is_file():
            return [self.folder / SINGLE]
        loose = sorted(self.folder.glob("*.safetensors"))
        if loose:
            return loose
        bins = sorted(self.folder.glob("pytorch_model*.bin"))
        if bins:
            return bins
        raise InternLM2GraphError(
            f"{self.folder}: no weights found (expected {SINGLE} or {INDEX} with its shards, "
            "or pytorch_model*.bin)"
        )


def _torch(path: Path) -> list[TensorRef]:
    from internlm2_graph.torch_pickle import read_torch_file  # only for .bin checkpoints

    return read_torch_file(path)


def read_header(path: Path) -> list[TensorRef]:
    """The tensors a safetensors file declares, checked against the file's real size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "shorter than a safetensors header")
        if head == LFS_POINTER:
            raise InternLM2GraphError(
                f"{path}: a Git LFS pointer, not the weights (cloned without git-lfs); run "
                "`git lfs pull` in the checkpoint folder or download it with huggingface_hub"
            )
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise _corrupt(path, "header length points past the end of the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_start = 8 + length
    refs = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"entry for {name} is malformed") from None
        if dtype not in ALL_DTYPES:
            raise wrong_dtype(path, name, dtype)
        ref = TensorRef(name, path, dtype, shape, data_start + begin)
        if end - begin != ref.nbytes or data_start + end > size:
            raise _corrupt(path, f"tensor {name} runs past the end of the file")
        refs.append(ref)
    return refs


def wrong_dtype(path: Path, name: str, dtype: str) -> InternLM2GraphError:
    return InternLM2GraphError(
        f"{path}: tensor {name} has dtype {dtype}, but weights must be "
        f"{', '.join(DTYPES)}; re-save the checkpoint in bf16 as published"
    )


def _corrupt(path: Path, why: str) -> InternLM2GraphError:
    return InternLM2GraphError(f"{path}: corrupt safetensors file ({why}); download it again")
