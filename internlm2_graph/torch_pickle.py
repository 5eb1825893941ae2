"""PyTorch `.bin` weights read without torch and without running their pickles.

`torch.save` (since torch 1.6) writes a zip archive, stored uncompressed: `<root>/data.pkl`, a
pickle of the state dict; `<root>/data/<key>`, one member per storage (raw bytes);
`<root>/byteorder` ("little", newer torch) and `<root>/version`. In the pickle, tensors are
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])`
calls, storages are persistent ids `("storage", torch.<Dtype>Storage, key, location, numel)`,
and the dict is a `collections.OrderedDict`.

A pickle is a program: unpickling an untrusted one can call any importable function. Here the
unpickler knows a short allow-list of globals and maps each to a stand-in of our own (a
function that records where a tensor's bytes are, a dtype name); any other global (`os.system`,
`builtins.eval`, ...) stops the read with one line naming it, before anything is called. The
copyreg extension opcodes, the one other way a pickle reaches a callable, are refused by a
scan of the opcodes before unpickling starts. The result is the checkpoint's `TensorRef`s: file,
byte offset, dtype, shape, read lazily like a safetensors shard.

Legacy (pre-1.6, non-zip) files are refused with what to do about it.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internlm2_graph.checkpoint import ALL_DTYPES, TensorRef, wrong_dtype
from internlm2_graph.errors import InternLM2GraphError

# torch.<Name>Storage -> the safetensors dtype code of its elements.
STORAGES = {
    "BFloat16Storage": "BF16",
    "HalfStorage": "F16",
    "FloatStorage": "F32",
    "IntStorage": "I32",
    "LongStorage": "I64",
    "DoubleStorage": "F64",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
ITEMSIZES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "F64": 8, "I16": 2, "I8": 1}
ITEMSIZES |= {"U8": 1, "BOOL": 1}
LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local file header
EXTENSION_OPCODES = ("EXT1", "EXT2", "EXT4")


@dataclass(frozen=True)
class Storage:
    """A persistent id: which zip member holds a storage, and its element type."""

    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class TensorView:
    """What `_rebuild_tensor_v2` would build: a view into a storage."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored) -> TensorView:
    if not isinstance(storage, Storage):
        raise TypeError("a tensor's first argument is not a storage")
    return TensorView(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored) -> TensorView:
    """nn.Parameter(data): the same bytes."""
    if not isinstance(data, TensorView):
        raise TypeError("a parameter's data is not a tensor")
    return data


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(code) for name, code in STORAGES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise InternLM2GraphError(
                f"{self.path}: the pickle asks for {module}.{name}, which a weights file never "
                "needs (pickles can run code); refused without running it. Use the repo's "
                "*.safetensors weights, or a .bin you trust converted once with transformers"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InternLM2GraphError(f"{self.path}: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise InternLM2GraphError(f"{self.path}: storage {key!r} has no known storage type")
        return Storage(storage_type.dtype, str(key), int(numel))


def read_torch_file(path: Path) -> list[TensorRef]:
    """The tensors a torch.save zip file holds, checked against the archive, nothing run."""
    if not zipfile.is_zipfile(path):
        raise _legacy_or_corrupt(path)
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in members if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise _corrupt(path, "no data.pkl in the archive (not a torch.save file)")
        root = pickles[0][: -len("data.pkl")]
        order = members.get(root + "byteorder")
        if order is not None and archive.read(order).strip() != b"little":
            raise _corrupt(path, "saved big-endian; re-save it on a little-endian machine")
        data = archive.read(pickles[0])
        _refuse_extension_opcodes(data, path)
        try:
            state = _Unpickler(data, path).load()
        except InternLM2GraphError:
            raise
        except Exception as err:  # a malformed pickle: say so in one line
            raise _corrupt(
                path, f"its pickle does not load ({type(err).__name__}: {err})"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and len(state) <= 3:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise _corrupt(path, "the pickle is not a dict of tensors (a state dict)")
        refs = []
        for name, view in state.items():
            if not isinstance(view, TensorView):
                continue  # metadata such as `_metadata` or a saved step counter
            refs.append(_tensor_ref(path, raw, members, root, str(name), view))
        return refs


def _refuse_extension_opcodes(data: bytes, path: Path) -> None:
    """EXT1/2/4 fetch callables from copyreg's registry without find_class: never allowed."""
    try:
        for opcode, _, _ in pickletools.genops(data):
            if opcode.name in EXTENSION_OPCODES:
                raise InternLM2GraphError(
                    f"{path}: the pickle uses the copyreg extension opcode {opcode.name}, which "
                    "a weights file never needs (pickles can run code); refused without running it"
                )
    except ValueError as err:
        raise _corrupt(path, f"its pickle is malformed ({err})") from None


def _tensor_ref(path, raw, members, root, name, view: TensorView) -> TensorRef:
    dtype = view.storage.dtype
    if dtype not in ALL_DTYPES:
        raise wrong_dtype(path, name, dtype)
    itemsize = ITEMSIZES[dtype]
    expected = tuple(int(s) for s in np.cumprod((1, *view.shape[:0:-1]))[::-1])
    numel = int(np.prod(view.shape, dtype=np.int64))
    if numel > 1 and view.stride != expected:
        raise _corrupt(path, f"tensor {name} is stored strided (a view); re-save it contiguous")
    member = members.get(f"{root}data/{view.storage.key}")
    if member is None:
        raise _corrupt(path, f"tensor {name}'s storage {view.storage.key} is missing")
    if member.compress_type != zipfile.ZIP_STORED:
        raise _corrupt(path, f"storage {view.storage.key} is compressed (torch never does that)")
    if (view.offset + numel) * itemsize > member.file_size:
        raise _corrupt(path, f"tensor {name} runs past the end of its storage")
    start = _member_data_offset(raw, member, path)
    return TensorRef(name, path, dtype, view.shape, start + view.offset * itemsize)


def _member_data_offset(raw, member: zipfile.ZipInfo, path: Path) -> int:
    """Where a stored member's bytes start: after its local header, whose name and extra
    field (torch pads it to align data to 64 bytes) may differ from the central directory's."""
    raw.seek(member.header_offset)
    header = raw.read(LOCAL_HEADER.size)
    if len(header) != LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise _corrupt(path, f"member {member.filename} has no local header")
    fields = LOCAL_HEADER.unpack(header)
    name_length, extra_length = fields[-2], fields[-1]
    return member.header_offset + LOCAL_HEADER.size + name_length + extra_length


def _legacy_or_corrupt(path: Path) -> InternLM2GraphError:
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x80\x02" or head[:1] == b"\x80":
        return InternLM2GraphError(
            f"{path}: a legacy (torch < 1.6) pickle file, which internlm2_graph does not read; "
            "re-save it with a current torch.save, or as safetensors"
        )
    return _corrupt(path, "not a zip archive")


def _corrupt(path: Path, why: str) -> InternLM2GraphError:
    return InternLM2GraphError(
        f"{path}: not a readable torch.save file ({why}); download it again or use safetensors"
    )
