"""Pre-quantized checkpoints in the three published 4-bit formats, packed from known codes.

Written from the format descriptions (prequantized.py's docstring), independently of the
unpacking code the build uses; tests cross-check these packers against numpy ports of each
format author's own unpacking code. Two sources of codes:

- `write_prequantized(float_folder, ...)`: a float checkpoint quantized group-wise to nearest
  (min-max, as GPTQ and AWQ round once their search is done), optionally with an act-order
  g_idx, then packed. The dequantized model is what a float build of the result computes.
- `write_random_prequantized(folder, config, ...)`: random codes at any shape (7B), streamed
  a layer per shard, for the memory and speed benchmarks.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.prequantized import AWQ_ORDER, LAYER_LINEARS
from internlm2_graph.synthetic.checkpoint import random_slices, tensor_shapes, write_safetensors
from internlm2_graph.synthetic.tokenizer import train_tokenizer

FORMATS = ("awq", "gptq", "compressed-tensors")
SAFETENSORS_DTYPES = {
    np.dtype(np.int32): "I32",
    np.dtype(np.int64): "I64",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(ml_dtypes.bfloat16): "BF16",
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


# --- codes ------------------------------------------------------------------------------------


def act_order_g_idx(k: int, group: int, rng: np.random.Generator) -> np.ndarray:
    """GPTQ's act-order g_idx: channels taken in some order `perm` (GPTQ: decreasing Hessian
    diagonal; here random), channel perm[i] in group i // group."""
    perm = rng.permutation(k)
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = np.arange(k) // group
    return g_idx


def quantize_groups(
    weight: np.ndarray,
    group: int,
    symmetric: bool,
    g_idx: np.ndarray | None = None,
    scale_dtype=np.float16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max round-to-nearest per group: (codes uint8 [N, K], zeros uint8 [N, G], scales
    [N, G] in `scale_dtype`) with w ~ (codes - zeros[:, g_idx]) * scales[:, g_idx]."""
    n, k = weight.shape
    g_idx = np.arange(k) // group if g_idx is None else np.asarray(g_idx)
    order = np.argsort(g_idx, kind="stable")
    w = weight[:, order].astype(np.float32).reshape(n, -1, group)
    if symmetric:
        scale = np.abs(w).max(axis=-1) * np.float32(2 / 15)
        zero = np.full(scale.shape, 8, np.float32)
    else:
        lo, hi = np.minimum(w.min(axis=-1), 0), np.maximum(w.max(axis=-1), 0)
        scale = (hi - lo) / np.float32(15)
        zero = np.round(-lo / np.where(scale == 0, 1, scale))
    scale = np.where(scale == 0, 1, scale).astype(scale_dtype)
    codes = np.clip(np.round(w / scale[..., None].astype(np.float32)) + zero[..., None], 0, 15)
    out = np.empty((n, k), np.uint8)
    out[:, order] = codes.reshape(n, k).astype(np.uint8)
    return out, zero.astype(np.uint8), scale


def dequantize_groups(codes, zeros, scales, g_idx=None) -> np.ndarray:
    """(codes - zeros) * scales, each column by its group: the float model a file stands for."""
    k, blocks = codes.shape[1], zeros.shape[1]
    g_idx = np.arange(k) // (k // blocks) if g_idx is None else np.asarray(g_idx)
    z = zeros[:, g_idx].astype(np.float32)
    return (codes.astype(np.float32) - z) * scales[:, g_idx].astype(np.float32)


# --- packers ----------------------------------------------------------------------------------


def _words(nibbles: np.ndarray) -> np.ndarray:
    """uint8 [..., 8] nibbles -> int32 [...], nibble i at bits 4i."""
    shifts = np.arange(0, 32, 4, dtype=np.uint32)
    return (nibbles.astype(np.uint32) << shifts).sum(axis=-1, dtype=np.uint32).view(np.int32)


def pack_awq(codes, zeros, scales) -> dict[str, np.ndarray]:
    """AWQ "gemm": qweight [K, N/8] and qzeros [G, N/8], word c nibble i = column
    8c + AWQ_ORDER[i]; scales [G, N] fp16."""

    def interleaved(columns: np.ndarray) -> np.ndarray:  # [rows, N] -> [rows, N/8]
        rows = columns.reshape(columns.shape[0], -1, 8)
        return _words(rows[:, :, AWQ_ORDER])

    return {
        "qweight": None if codes is None else interleaved(codes.T),
        "qzeros": interleaved(zeros.T),
        "scales": np.ascontiguousarray(scales.T).astype(np.float16),
    }


def pack_gptq(codes, zeros, scales, g_idx=None) -> dict[str, np.ndarray]:
    """GPTQ v1: qweight [K/8, N] (input 8r + i in nibble i), qzeros [G, N/8] holding z - 1
    (output 8c + i in nibble i), scales [G, N] fp16, g_idx [K] int32."""
    n, blocks = zeros.shape
    k = len(g_idx) if codes is None else codes.shape[1]
    qweight = None if codes is None else _words(codes.T.reshape(k // 8, 8, n).transpose(0, 2, 1))
    stored = (zeros.T.astype(np.int16) - 1) & 0xF
    g_idx = np.arange(k) // (k // blocks) if g_idx is None else g_idx
    return {
        "qweight": qweight,
        "qzeros": _words(stored.reshape(blocks, n // 8, 8)),
        "scales": np.ascontiguousarray(scales.T).astype(np.float16),
        "g_idx": np.asarray(g_idx, np.int32),
    }


def pack_compressed_tensors(codes, zeros, scales, g_idx=None, symmetric=True) -> dict:
    """pack-quantized: weight_packed [N, K/8] (input 8c + i in nibble i, codes offset +8, so
    stored unsigned), weight_scale [N, G] bf16, weight_zero_point [N/8, G] (asymmetric only,
    output 8r + i in nibble i), weight_g_idx [K] (act-order only), weight_shape [2]."""
    n, k = (zeros.shape[0], len(g_idx)) if codes is None else codes.shape
    out = {
        "weight_packed": None if codes is None else _words(codes.reshape(n, k // 8, 8)),
        "weight_scale": np.asarray(scales).astype(ml_dtypes.bfloat16),
        "weight_shape": np.array([n, k], np.int64),
    }
    if not symmetric:
        out["weight_zero_point"] = _words(zeros.reshape(n // 8, 8, -1).transpose(0, 2, 1))
    if g_idx is not None:
        out["weight_g_idx"] = np.asarray(g_idx, np.int32)
    return out


def pack(fmt: str, codes, zeros, scales, g_idx, symmetric) -> dict[str, np.ndarray]:
    if fmt == "awq":
        return pack_awq(codes, zeros, scales)
    if fmt == "gptq":
        return pack_gptq(codes, zeros, scales, g_idx)
    return pack_compressed_tensors(codes, zeros, scales, g_idx, symmetric)


def quantization_config(
    fmt: str, group: int, symmetric: bool, act_order: bool, keep_float: tuple[str, ...] = ()
) -> dict:
    """What each format's quantizer writes into config.json; `keep_float`: module names left
    in float, said the format's way (modules_to_not_convert, `dynamic` "-:" rules, ignore)."""
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "version": "gemm",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "modules_to_not_convert": list(keep_float) or None,
        }
    if fmt == "gptq":
        return {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group,
            "sym": symmetric,
            "desc_act": act_order,
            "checkpoint_format": "gptq",
            "dynamic": {f"-:.*{re.escape(name)}.*": {} for name in keep_float},
        }
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group",
        "group_size": group,
        "actorder": "group" if act_order else None,
        "dynamic": False,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["output", *(f"re:.*{re.escape(name)}.*" for name in keep_float)],
    }


# --- writers ----------------------------------------------------------------------------------


def _whole(array: np.ndarray) -> tuple[str, tuple, Callable[[], Iterator[np.ndarray]]]:
    return SAFETENSORS_DTYPES[array.dtype], array.shape, lambda: iter([array])


def _write_shards(folder: Path, shards: list[dict]) -> None:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for filename, tensors in zip(names, shards):
        write_safetensors(folder / filename, tensors)
        weight_map |= dict.fromkeys(tensors, filename)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def _with_config(folder: Path, config: dict, quant: dict) -> None:
    (folder / "config.json").write_text(
        json.dumps({**config, "quantization_config": quant}, indent=2) + "\n"
    )


def write_prequantized(
    float_folder: str | Path,
    folder: str | Path,
    fmt: str,
    group: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    seed: int = 0,
    keep_float: tuple[str, ...] = (),
    dequantized: str | Path | None = None,
) -> Path:
    """`float_folder`'s checkpoint with every decoder linear quantized and packed as `fmt`
    (norms, embedding and output kept as they are, and linears whose names contain one of
    `keep_float`); a shard per layer. With `dequantized`, also the float checkpoint of the
    dequantized weights, (q - z) * s computed here from the codes: the model the file means."""
    src, folder = Path(float_folder), Path(folder)
    symmetric = symmetric and fmt != "awq"  # AWQ "gemm" is asymmetric
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    if (src / "smollm2-tokenizer").is_dir():  # benchmarks/smollm2.py's real tokenizer
        shutil.copytree(src / "smollm2-tokenizer", folder / "smollm2-tokenizer", dirs_exist_ok=True)
    quant = quantization_config(fmt, group, symmetric, act_order, keep_float)
    _with_config(folder, config, quant)
    checkpoint = Checkpoint(src)
    floats: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(seed)
    scale_dtype = ml_dtypes.bfloat16 if fmt == "compressed-tensors" else np.float16
    shards: list[dict] = [{}]
    for ref in checkpoint:
        module = ref.name.removesuffix(".weight")
        packed = module.endswith(LAYER_LINEARS) and not any(n in module for n in keep_float)
        if ref.name.startswith("model.layers.") and packed:
            layer = int(ref.name.split(".")[2])
            while len(shards) < layer + 2:
                shards.append({})
            weight = ref.read_rows()
            k = weight.shape[1]
            g_idx = act_order_g_idx(k, group, rng) if act_order else None
            codes, zeros, scales = quantize_groups(weight, group, symmetric, g_idx, scale_dtype)
            for part, array in pack(fmt, codes, zeros, scales, g_idx, symmetric).items():
                shards[layer + 1][f"{module}.{part}"] = _whole(array)
            if dequantized is not None:
                floats[ref.name] = dequantize_groups(codes, zeros, scales, g_idx)
        else:
            where = int(ref.name.split(".")[2]) + 1 if ref.name.startswith("model.layers.") else 0
            while len(shards) <= where:
                shards.append({})
            shards[where][ref.name] = _whole(ref.read_stored())
            if dequantized is not None:
                floats[ref.name] = ref.read_rows()
    _write_shards(folder, [s for s in shards if s])
    if dequantized is not None:
        _write_dequantized(src, Path(dequantized), config, floats)
    return folder


def _write_dequantized(src: Path, folder: Path, config: dict, floats: dict) -> None:
    """A float32 checkpoint (one file) of the given tensors, with src's other files."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", {n: _whole(a) for n, a in floats.items()})


def write_random_prequantized(
    folder: str | Path,
    config: dict,
    fmt: str,
    group: int = 128,
    symmetric: bool = False,
    act_order: bool = False,
    seed: int = 0,
) -> Path:
    """A checkpoint of `config`'s shapes in `fmt` with random codes (any size: a layer per
    shard, written as generated), a real small tokenizer, bf16 embedding/norms/output."""
    folder = Path(folder)
    symmetric = symmetric and fmt != "awq"
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder, vocab_size=min(1024, config["vocab_size"]), chat=True, seed=seed)
    _with_config(folder, config, quantization_config(fmt, group, symmetric, act_order))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation) + "\n")
    rng = np.random.default_rng(seed)
    shapes = tensor_shapes(config)
    scale_dtype = ml_dtypes.bfloat16 if fmt == "compressed-tensors" else np.float16
    shards: list[dict] = [{}]

    def floats(name: str, shape: tuple) -> tuple:
        return "BF16", shape, lambda: random_slices(rng, name, shape, config, ml_dtypes.bfloat16)

    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if not (name.startswith("model.layers.") and module.endswith(LAYER_LINEARS)):
            if name.startswith("model.layers."):
                shards[-1][name] = floats(name, shape)
            else:
                shards.append({name: floats(name, shape)})
            continue
        if module.endswith("attention.wqkv"):
            shards.append({})  # a shard per layer
        n, k = shape
        blocks = k // group
        zeros = rng.integers(1, 15, (n, blocks), dtype=np.uint8) if not symmetric else None
        zeros = np.full((n, blocks), 8, np.uint8) if zeros is None else zeros
        scales = (rng.random((n, blocks), np.float32) * 0.01 / math.sqrt(k) + 1e-4).astype(
            scale_dtype
        )
        g_idx = act_order_g_idx(k, group, rng) if act_order else np.arange(k) // group
        # Random codes are random words: generated packed, whatever the nibble order.
        words = {"awq": (k, n // 8), "gptq": (k // 8, n), "compressed-tensors": (n, k // 8)}
        parts = pack(fmt, None, zeros, scales, g_idx, symmetric)
        if not act_order:
            parts.pop("weight_g_idx", None)  # compressed-tensors stores it for act-order only
        for part, array in parts.items():
            if array is None:
                shape = words[fmt]
                array = rng.integers(0, 1 << 32, shape, dtype=np.uint32).view(np.int32)
            shards[-1][f"{module}.{part}"] = _whole(array)
        if module.endswith("feed_forward.w2"):
            _flush(folder, shards)
    _flush(folder, shards, last=True)
    return folder


def _flush(folder: Path, shards: list[dict], last: bool = False) -> None:
    """Write the finished shards now (a 7B checkpoint never sits in memory) and forget them."""
    index_path = folder / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())["weight_map"] if index_path.is_file() else {}
    done = shards if last else shards[:-1]
    for tensors in done:
        if not tensors:
            continue
        filename = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        write_safetensors(folder / filename, tensors)
        weight_map |= dict.fromkeys(tensors, filename)
    del shards[: len(done)]
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}) + "\n")
