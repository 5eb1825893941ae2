"""Write the ONNX Runtime GenAI folder: model, external data, genai_config, tokenizer.

Everything is written into a temporary sibling of the destination and moved into place only
when complete, so a failed or interrupted build never leaves a half-written folder behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx_ir as ir

from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.graph import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from internlm2_graph.precision import Target

DEFAULT_MAX_LENGTH = 4096


def genai_config(
    config: InternLM2Config, target: Target, eos_token_ids: list[int]
) -> dict:
    """genai_config.json: the decoder's sizes and I/O names, and the checkpoint's search defaults."""
    gen = config.generation
    provider_options = []
    if target.execution_provider == "cuda":
        cuda = {"enable_cuda_graph": "1" if target.enable_cuda_graph else "0"}
        provider_options = [{"cuda": cuda}]
    # A full 32k-262k context as the default max_length would make the runtime allocate that
    # whole KV cache up front (onnxruntime-genai#550); users raise it with max_length=...
    max_length = target.max_length or min(config.context_length, DEFAULT_MAX_LENGTH)
    return {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": config.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": target.filename,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos_token_ids if len(eos_token_ids) > 1 else eos_token_ids[0],
            "pad_token_id": config.pad_token_id,
            "type": "internlm2",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": float(gen.get("length_penalty", 1.0)),
            "max_length": min(max_length, config.context_length),
            "min_length": 0,
            "no_repeat_ngram_size": int(gen.get("no_repeat_ngram_size", 0)),
            "num_beams": int(gen.get("num_beams", 1)),
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 50) or 50),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }


def save_model(
    model: ir.Model,
    folder: Path,
    filename: str,
    on_tensor: Callable[[ir.TensorProtocol, int, int], None] | None = None,
) -> None:
    """model.onnx + one external data file, tensors produced and written one at a time."""

    def callback(tensor, info) -> None:
        if on_tensor is not None:
            on_tensor(tensor, info.index, info.total)

    ir.save(model, folder / filename, external_data=filename + ".data", callback=callback)


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=4) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of `output` that becomes `output` only if the block succeeds."""
    output = Path(output).absolute()
    if output.exists() and not overwrite:
        raise InternLM2GraphError(
            f"{output}: already exists; choose another --output or pass --overwrite"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield staging
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise InternLM2GraphError(
                f"{output.parent}: no space left on the device while writing the model; "
                "free some space or choose another --output"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
