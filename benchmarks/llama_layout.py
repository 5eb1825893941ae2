"""A Llama-layout copy of an InternLM2 checkpoint, for tools that only know Llama.

The onnxruntime-genai builder loads checkpoints through transformers, which cannot read an
InternLM2 config without the hub repo's remote code. InternLM2 is Llama with renamed tensors and
a grouped wqkv, so a renamed copy (wqkv split into q/k/v) is the same function, and the builder
converts it natively. Tensors are streamed one at a time in their stored dtype (bf16 stays bf16):
only a wqkv matrix is ever held in memory.

    python -m benchmarks.llama_layout SRC DST [--tokenizer-json PATH] [--verify]

`--verify` (or `verify_tiny()`) proves the equivalence on a tiny synthetic checkpoint: the
builder's fp32 model and our numpy reference must give the same logits.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

from internlm2_graph.checkpoint import DTYPES, Checkpoint, TensorRef
from internlm2_graph.config import InternLM2Config
from internlm2_graph.weights import split_wqkv

TOKENIZER_FILES = ("tokenizer.model", "special_tokens_map.json")
COPY_CHUNK = 64 * 1024 * 1024
RENAMES = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


# --- config ---------------------------------------------------------------------------------


def llama_config(raw: dict, config: InternLM2Config) -> dict:
    """LlamaForCausalLM config.json with the same sizes, rotary settings and token ids."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": raw.get("hidden_act", "silu"),
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": config.bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id)
        if len(config.eos_token_id) > 1
        else config.eos_token_id[0],
        "pad_token_id": config.pad_token_id,
        "torch_dtype": raw.get("torch_dtype", "bfloat16"),
        "use_cache": True,
    }
    if config.rope_scaling is not None:
        kind = config.rope_scaling.type
        out["rope_scaling"] = {
            "type": kind,
            "rope_type": kind,
            "factor": config.rope_scaling.factor,
        }
    return out


# --- tensors --------------------------------------------------------------------------------


def llama_name(name: str) -> str:
    """InternLM2 tensor name -> Llama tensor name (wqkv is split separately)."""
    if name == "output.weight":
        return "lm_head.weight"
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def is_wqkv(name: str) -> bool:
    return ".attention.wqkv." in name


def split_names(name: str) -> list[str]:
    base = name.replace(".attention.wqkv.", ".self_attn.{}_proj.")
    return [base.format(p) for p in "qkv"]


def output_entries(refs: list[TensorRef], config: InternLM2Config) -> list[tuple[str, tuple, str]]:
    """(llama name, shape, dtype) of every tensor the copy of these refs holds, in order."""
    entries = []
    for ref in refs:
        if not is_wqkv(ref.name):
            entries.append((llama_name(ref.name), ref.shape, ref.dtype))
            continue
        d, rest = config.head_dim, ref.shape[1:]
        rows = (
            config.num_attention_heads * d,
            config.num_key_value_heads * d,
            config.num_key_value_heads * d,
        )
        entries += [
            (n, (r, *rest), ref.dtype) for n, r in zip(split_names(ref.name), rows, strict=True)
        ]
    return entries


def read_native(ref: TensorRef) -> np.ndarray:
    """The whole tensor in its stored dtype (used for wqkv only: a few MB)."""
    dtype = np.dtype(DTYPES[ref.dtype])
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        data = np.fromfile(f, dtype=dtype, count=math.prod(ref.shape))
    return data.reshape(ref.shape)


def copy_bytes(ref: TensorRef, out) -> None:
    with open(ref.path, "rb") as f:
        f.seek(ref.offset)
        left = ref.nbytes
        while left:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"{ref.path}: {ref.name} is truncated")
            out.write(chunk)
            left -= len(chunk)


def write_shard(path: Path, refs: list[TensorRef], config: InternLM2Config) -> list[str]:
    """One safetensors file holding the Llama copy of `refs`; returns the names written."""
    entries = output_entries(refs, config)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for ref in refs:
            if is_wqkv(ref.name):
                for part in split_wqkv(read_native(ref), config):
                    out.write(np.ascontiguousarray(part).tobytes())
            else:
                copy_bytes(ref, out)
    return [name for name, _, _ in entries]


def shards_of(checkpoint: Checkpoint) -> dict[Path, list[TensorRef]]:
    shards: dict[Path, list[TensorRef]] = {}
    for ref in checkpoint:
        shards.setdefault(ref.path, []).append(ref)
    return shards


def write_weights(src: Path, dst: Path, config: InternLM2Config) -> None:
    shards = shards_of(Checkpoint(src))
    if len(shards) == 1:
        write_shard(dst / "model.safetensors", next(iter(shards.values())), config)
        return
    weight_map, total = {}, 0
    for path, refs in shards.items():
        for name in write_shard(dst / path.name, refs, config):
            weight_map[name] = path.name
        total += sum(ref.nbytes for ref in refs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- tokenizer ------------------------------------------------------------------------------


def write_tokenizer_files(src: Path, dst: Path, tokenizer_json: Path | None) -> None:
    """tokenizer.model + a tokenizer_config transformers loads without remote code.

    With a tokenizer.json (ours, from a built folder), transformers uses it as is
    (PreTrainedTokenizerFast), so the builder's output tokenizes exactly like ours. Without one,
    LlamaTokenizer converts tokenizer.model itself.
    """
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    tok_config.pop("auto_map", None)
    if tokenizer_json is None:
        tok_config["tokenizer_class"] = "LlamaTokenizer"
        tok_config.setdefault("legacy", False)
    else:
        shutil.copyfile(tokenizer_json, dst / "tokenizer.json")
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def write_llama_copy(
    src: str | Path, dst: str | Path, tokenizer_json: str | Path | None = None
) -> Path:
    """Write a LlamaForCausalLM copy of the InternLM2 checkpoint `src` into `dst`."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = InternLM2Config.from_dir(src)
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(llama_config(raw, config), indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")
    write_tokenizer_files(src, dst, Path(tokenizer_json) if tokenizer_json else None)
    write_weights(src, dst, config)
    return dst


# --- verification ---------------------------------------------------------------------------


def builder_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """Logits [seq, vocab] of a builder-made decoder for one prompt, empty KV cache."""
    import onnxruntime as ort

    genai = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(
        str(model_dir / genai["filename"]), providers=["CPUExecutionProvider"]
    )
    feeds = {"input_ids": ids[None].astype(np.int64)}
    for inp in session.get_inputs():
        if inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, len(ids)), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(len(ids), dtype=np.int64)[None]
        elif inp.name.startswith("past_key_values"):
            kv, d = genai["num_key_value_heads"], genai["head_size"]
            feeds[inp.name] = np.zeros((1, kv, 0, d), np.float32)
    return session.run(["logits"], feeds)[0][0]


def transformers_logits(llama: Path, ids: np.ndarray) -> np.ndarray | None:
    """Logits of transformers' own LlamaForCausalLM on the copy (float64), if installed."""
    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        return None
    model = LlamaForCausalLM.from_pretrained(llama, dtype=torch.float64)
    with torch.no_grad():
        return model(torch.tensor(ids[None])).logits[0].numpy()


def verify_tiny(workdir: str | Path, **overrides) -> dict[str, float | None]:
    """Relative max |diff| to the numpy reference on a tiny synthetic checkpoint, for the
    builder's fp32 model of the copy and (if installed) transformers' Llama on the copy."""
    import subprocess

    from internlm2_graph.reference import Reference
    from internlm2_graph.synthetic import make_config, write_checkpoint

    work = Path(workdir)
    src = write_checkpoint(work / "internlm2", make_config("tiny", **overrides), seed=1)
    llama = write_llama_copy(src, work / "llama")
    out = work / "builder-fp32"
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(llama),
        "-o",
        str(out),
        "-p",
        "fp32",
        "-e",
        "cpu",
        "-c",
        str(work / "cache"),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ids = np.random.default_rng(0).integers(3, 1000, 24)
    expected = Reference(src).forward(ids)[0]
    scale = np.abs(expected).max()
    hf = transformers_logits(llama, ids)
    return {
        "builder": float(np.abs(builder_logits(out, ids) - expected).max() / scale),
        "transformers": None if hf is None else float(np.abs(hf - expected).max() / scale),
    }


VERIFY_CASES = {
    "plain": {},
    "bias": {"bias": True},
    # The 0.18 builder drops linear/dynamic rope scaling for LlamaForCausalLM
    # (LlamaModel.make_rope_init overrides the base method without calling it).
    "linear-x2": {"rope_scaling": {"type": "linear", "factor": 2.0}},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("src", nargs="?", help="InternLM2 checkpoint folder")
    parser.add_argument("dst", nargs="?", help="folder for the Llama copy")
    parser.add_argument("--tokenizer-json", help="a tokenizer.json to ship (e.g. from our build)")
    parser.add_argument(
        "--verify",
        metavar="WORKDIR",
        help="check builder(copy) == numpy reference on tiny configs in WORKDIR",
    )
    args = parser.parse_args()
    if args.verify:
        for name, overrides in VERIFY_CASES.items():
            errors = verify_tiny(Path(args.verify) / name, **overrides)
            print(
                f"{name}: max |logits - reference| / max |reference|: "
                + ", ".join(f"{k} {v:.1e}" for k, v in errors.items() if v is not None)
            )
        return
    if not (args.src and args.dst):
        parser.error("give SRC and DST, or --verify WORKDIR")
    print(write_llama_copy(args.src, args.dst, args.tokenizer_json))


if __name__ == "__main__":
    main()
