"""`.bin` files laid out as `torch.save` writes them, without torch (test fixtures).

A zip archive of stored members under one root folder: `data.pkl` (protocol 2: an
OrderedDict whose values are `torch._utils._rebuild_tensor_v2` calls on persistent-id
storages), `byteorder`, one `data/<key>` member per storage with its data aligned to 64 bytes
by padding in the local header's extra field (record id "FB", as PyTorchStreamWriter does),
and `version`. The pickle is written opcode by opcode, since pickling a reference to
`torch._utils` would need torch. `raw_pickle` lets a test put any pickle bytes in the archive.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int64): "LongStorage",
}
ALIGNMENT = 64


def _string(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def state_dict_pickle(tensors: dict[str, np.ndarray], shared: dict[str, tuple] = ()) -> bytes:
    """data.pkl for `tensors`, storage i holding the i-th tensor. `shared` maps a name to
    (storage key, element offset) to make a tensor a view into another's storage."""
    shared = dict(shared)
    ordered_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    out = [b"\x80\x02", ordered_dict, b"("]  # PROTO 2, the dict, MARK for SETITEMS
    for key, (name, array) in enumerate(tensors.items()):
        storage_key, offset = shared.get(name, (str(key), 0))
        storage = _tuple(
            [
                _string("storage"),
                _global("torch", STORAGE_NAMES[array.dtype]),
                _string(storage_key),
                _string("cpu"),
                _int(array.size),
            ]
        )
        strides = np.cumprod((1, *array.shape[:0:-1]))[::-1] if array.ndim else []
        args = [
            storage + b"Q",  # BINPERSID
            _int(offset),
            _tuple([_int(s) for s in array.shape]),
            _tuple([_int(int(s)) for s in strides]),
            b"\x89",  # NEWFALSE: requires_grad
            ordered_dict,  # backward hooks
        ]
        out += [_string(name), _global("torch._utils", "_rebuild_tensor_v2"), _tuple(args), b"R"]
    out += [b"u", b"."]  # SETITEMS, STOP
    return b"".join(out)


def write_torch_bin(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    *,
    raw_pickle: bytes | None = None,
    root: str = "archive",
) -> Path:
    """A torch.save-style zip of `tensors` (a state dict); `raw_pickle` replaces data.pkl."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        _add(archive, f"{root}/data.pkl", raw_pickle or state_dict_pickle(tensors))
        _add(archive, f"{root}/byteorder", b"little")
        for key, array in enumerate(tensors.values()):
            _add(archive, f"{root}/data/{key}", np.ascontiguousarray(array).tobytes())
        _add(archive, f"{root}/version", b"3\n")
    return path


def _add(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A stored member whose data starts at a multiple of ALIGNMENT in the file."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = archive.fp.tell() + 30 + len(name.encode())
    pad = -(start + 4) % ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad
    archive.writestr(info, data)
