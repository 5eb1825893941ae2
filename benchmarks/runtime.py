"""ONNX Runtime GenAI timing of built folders and decode's memory-bandwidth bound.

The measuring half of the `decode` suite (benchmarks/suites/decode.py), which the long-context,
kernel-profile and pre-quantized studies and the lead's serving tools share: load a folder on an
execution provider, time one prompt and its greedy decode steps, and the bound decode cannot
beat: every step reads all weights (except the embedding table, of which one row) and the KV
cache so far, so the bound is bandwidth / bytes per step. Bandwidth is measured (a BLAS dot over
1 GiB on CPU, all threads; a torch device copy on CUDA, read + write bytes) or given.

Needs only onnxruntime-genai, onnx and numpy: runs on a machine with just the repo on PYTHONPATH.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from internlm2_graph.runtime import threads_here

# --- the runtime ----------------------------------------------------------------------------


def load(folder: Path, ep: str):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if built_for(folder) != ep:  # keep the folder's own provider options when they match
        config.clear_providers()
        if ep != "cpu":
            config.append_provider(ep)
    if ep == "cpu":  # every tool's folder gets the same threads (runtime.threads_here)
        own = json.loads((folder / "genai_config.json").read_text())
        threads = threads_here(own)
        if threads:
            config.overlay(json.dumps(threads))
    return og.Model(config)


def built_for(folder: Path) -> str:
    """The execution provider a folder's genai_config names ("cpu" when none)."""
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    providers = decoder.get("session_options", {}).get("provider_options", [])
    return next((name for entry in providers for name in entry), "cpu")


def one_run(model, prompt: np.ndarray, gen: int) -> tuple[float, float]:
    """Seconds for the prompt (to first logits) and for `gen` decode steps after it."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + gen + 1
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.get_logits()  # forces the prompt's logits to be ready (and copied) here
    prompt_s = time.perf_counter() - start
    generator.generate_next_token()  # picks the first token from the prompt's logits
    start = time.perf_counter()
    for _ in range(gen):
        generator.generate_next_token()  # one decode step: the model on the last token
    generator.get_next_tokens()
    gen_s = time.perf_counter() - start
    produced = len(generator.get_sequence(0))
    if produced != total:
        raise RuntimeError(f"generated {produced} tokens in all, expected {total}")
    return prompt_s, gen_s


def vocab_size(folder: Path) -> int:
    config = json.loads((folder / "genai_config.json").read_text())
    return int(config["model"]["vocab_size"])


# --- the bound ------------------------------------------------------------------------------


def weight_bytes_per_step(folder: Path) -> tuple[int, int]:
    """(bytes of initializers a decode step reads, bytes per token of KV cache).

    Tables read by Gather (embedding) or sliced by position (rotary caches) count one row.
    """
    import onnx

    genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    graph = graph_of(folder)
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    gathered |= {
        name
        for n in graph.node
        if n.op_type == "GroupQueryAttention"
        for name in n.input[7:9]
        if name
    }
    total = 0
    for init in graph.initializer:
        size = initializer_bytes(init)
        rows = init.dims[0] if init.dims else 1
        total += size // max(rows, 1) if init.name in gathered else size
    kv_dtype = next(
        (i.type.tensor_type.elem_type for i in graph.input if i.name.startswith("past_key_values")),
        onnx.TensorProto.FLOAT,
    )
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(kv_dtype).itemsize
    kv = 2 * genai["num_hidden_layers"] * genai["num_key_value_heads"] * genai["head_size"]
    return total, kv * itemsize


def graph_of(folder: Path):
    """The model's ONNX graph without its weights (their sizes are in the external-data entries)."""
    import onnx

    genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    return onnx.load(str(folder / genai["filename"]), load_external_data=False).graph


def initializer_bytes(init) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    if init.raw_data:
        return len(init.raw_data)
    import onnx

    itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize


def measure_bandwidth(ep: str) -> tuple[float, str]:
    """Read bandwidth in GB/s, what a decode step needs: best of several passes over 1 GiB."""
    if ep == "cuda":
        if not common.has_module("torch"):
            raise SystemExit("error: -e cuda without torch: give --param bound=GBPS (H100: 3350)")
        import torch

        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        # A device copy reads and writes each byte: count both, as a read-only stream would.
        return 2 * src.numel() / best / 1e9, "torch device copy of 1 GiB, read + write bytes"
    data = np.ones(1 << 28, dtype=np.float32)  # 1 GiB, far beyond any cache
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.dot(data)  # BLAS: streams the array once, on all threads, little compute
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9, "numpy/BLAS dot over 1 GiB, all threads"
