"""Random InternLM2 checkpoints in the published layout, streamed to disk.

bf16 shards + index, config.json, generation_config.json and a real SentencePiece tokenizer.
Weights are written a slice at a time, so even a 20B-shaped checkpoint (~40 GB) needs little
memory. Values are random bits in a chosen binade rather than Gaussian draws: about ten times
faster to generate, and compute (what the tests and benchmarks measure) does not depend on them.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import ml_dtypes
import numpy as np

from internlm2_graph.synthetic.tokenizer import train_tokenizer

SIZES: dict[str, dict] = {
    "1.8b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=92544,
    ),
    "7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=92544,
    ),
    "20b": dict(
        hidden_size=6144,
        num_hidden_layers=48,
        num_attention_heads=48,
        num_key_value_heads=8,
        intermediate_size=16384,
        vocab_size=92544,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        vocab_size=1024,
    ),
}
SLICE_ELEMENTS = 16 * 1024 * 1024
DTYPES = {
    "bf16": ("BF16", ml_dtypes.bfloat16),
    "fp16": ("F16", np.float16),
    "fp32": ("F32", np.float32),
}


def make_config(size: str = "tiny", **overrides) -> dict:
    """A config.json dict as the hub publishes it, for one of SIZES with any field overridden."""
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "model_type": "internlm2",
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "attn_implementation": "eager",
    }
    config.update(SIZES[size])
    config.update(overrides)
    return config


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors in the order the hub's shards list them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // heads
    shapes = {"model.tok_embeddings.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes[p + "attention.wqkv.weight"] = ((heads + 2 * kv) * d, h)
        if config["bias"]:
            shapes[p + "attention.wqkv.bias"] = ((heads + 2 * kv) * d,)
        shapes[p + "attention.wo.weight"] = (h, heads * d)
        if config["bias"]:
            shapes[p + "attention.wo.bias"] = (h,)
        shapes[p + "feed_forward.w1.weight"] = (i, h)
        shapes[p + "feed_forward.w3.weight"] = (i, h)
        shapes[p + "feed_forward.w2.weight"] = (h, i)
        shapes[p + "attention_norm.weight"] = (h,)
        shapes[p + "ffn_norm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["output.weight"] = (v, h)
    return shapes


def write_checkpoint(
    folder: str | Path,
    config: dict | None = None,
    *,
    chat: bool = True,
    seed: int = 0,
    dtype: str = "bf16",
    shard_bytes: int = 2 * 1024**3,
    tokenizer_vocab: int | None = None,
) -> Path:
    """Write a random checkpoint of `config` (default: tiny) into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or make_config())
    pieces = min(tokenizer_vocab or 1024, config["vocab_size"])
    train_tokenizer(folder, vocab_size=pieces, chat=chat, seed=seed)
    special = _added_tokens(folder)
    eos = [2, special["<|im_end|>"]] if chat else 2
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": eos, "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_shards(folder, tensor_shapes(config), config, seed, dtype, shard_bytes)
    return folder


def _added_tokens(folder: Path) -> dict[str, int]:
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    return {v["content"]: int(k) for k, v in tokenizer_config["added_tokens_decoder"].items()}


def _write_shards(folder, shapes, config, seed, dtype, shard_bytes) -> None:
    code, np_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(seed)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for filename, members in zip(names, shards):
        tensors = {
            n: (code, shapes[n], partial(random_slices, rng, n, shapes[n], config, np_dtype))
            for n in members
        }
        write_safetensors(folder / filename, tensors)
        weight_map |= {n: filename for n in members}
    if len(shards) > 1:
        total = sum(math.prod(s) * itemsize for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# safetensors dtype codes -> bytes per element
ITEMSIZES = {"I32": 4, "I64": 8, "F16": 2, "BF16": 2, "F32": 4}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, Callable]]) -> None:
    """A safetensors file from (dtype code, shape, producer of arrays in order) per tensor, so
    that no tensor needs to be whole in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (code, shape, _) in tensors.items():
        end = offset + math.prod(shape) * ITEMSIZES[code]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for _, _, produce in tensors.values():
            for block in produce():
                np.ascontiguousarray(block).tofile(f)


def random_slices(rng, name: str, shape, config: dict, np_dtype) -> Iterator[np.ndarray]:
    """Random bf16 values, |x| in one binade: norms in [1, 2); others scaled like 1/sqrt(fan_in)."""
    total = math.prod(shape)
    if name.endswith("norm.weight"):
        exponent, signed = 0, False
    else:
        fan_in = shape[1] if len(shape) == 2 and "tok_embeddings" not in name else 1
        std = 2.0 / math.sqrt(fan_in) if name == "output.weight" else 1.0 / math.sqrt(fan_in)
        if name.endswith(".bias"):
            std = 0.1
        exponent, signed = math.floor(math.log2(std / 1.5)), True
    mask = np.uint16(0x807F if signed else 0x007F)
    bits = np.uint16((exponent + 127) << 7)
    for start in range(0, total, SLICE_ELEMENTS):
        count = min(SLICE_ELEMENTS, total - start)
        raw = (rng.integers(0, 1 << 16, count, dtype=np.uint16) & mask) | bits
        values = raw.view(ml_dtypes.bfloat16)
        yield values if np_dtype is ml_dtypes.bfloat16 else values.astype(np_dtype)
