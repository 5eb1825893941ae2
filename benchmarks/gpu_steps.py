"""The small Python steps of benchmarks/gpu.sh, as commands (they used to be heredocs there).

    python -m benchmarks.gpu_steps versions                  # packages, providers, og's CUDA
    python -m benchmarks.gpu_steps kv-reuse FOLDER           # chat's KV cache reuse vs afresh
    python -m benchmarks.gpu_steps scales LAYERS FILE [QMAX] # fixed per-channel KV scales
    python -m benchmarks.gpu_steps builder-best FOLDER [--max-length N]
    python -m benchmarks.gpu_steps buffer-decode FOLDER      # decode with 1,048,576-token buffers
    python -m benchmarks.gpu_steps checkpoint DIR SIZE       # calibrated_synthetic's checkpoint
    python -m benchmarks.gpu_steps linked-copy SRC DST       # SRC's files linked, its config copied
    python -m benchmarks.gpu_steps llama-copy CHECKPOINT DST # the builder's Llama-layout input
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = [
    "numpy", "ml_dtypes", "onnx", "onnx-ir", "onnxscript", "safetensors", "huggingface_hub",
    "tokenizers", "sentencepiece", "protobuf", "onnxruntime", "onnxruntime-gpu",
    "onnxruntime-genai", "onnxruntime-genai-cuda",
]  # fmt: skip


def versions(args) -> None:
    """What the install check ran with."""
    import importlib.metadata as md
    import platform

    found = {}
    for name in PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    print("python", platform.python_version(), found)
    import onnxruntime
    import onnxruntime_genai as og

    print("providers", onnxruntime.get_available_providers(), "og cuda:", og.is_cuda_available())


def kv_reuse(args) -> None:
    """Whether this runtime can rewind a CUDA-graph generator (chat re-encodes the conversation
    when it cannot), and whether turns continued from the cache decode like the conversation
    encoded afresh (exact on fp32; fp16 may differ in a late token, its batched and one-token
    kernels round differently). Reaches into Chat's internals on purpose: it probes them."""
    from internlm2_graph import chat as chat_module
    from internlm2_graph.chat import Chat

    folder = args.folder
    turns = ["Hello there, how are you?", "Tell me about rivers.", "And lakes?"]
    conversation = Chat(folder, search={"do_sample": False}, max_new_tokens=8)
    cached = [conversation.reply(turns[0])]
    try:
        conversation._generator.rewind_to(len(conversation._cached))  # what the next turn does
        print("rewind_to after a reply: works")
    except Exception as err:
        print("rewind_to after a reply fails, so chat re-encodes each turn:", err)
    cached += [conversation.reply(text) for text in turns[1:]]
    chat_module._common_prefix = lambda cached, prompt: 0  # never reuse: encode it all each turn
    fresh_conversation = Chat(folder, search={"do_sample": False}, max_new_tokens=8)
    fresh = [fresh_conversation.reply(text) for text in turns]
    print("replies from the cache equal a fresh encode:", cached == fresh)
    print("cached:", cached)
    print("fresh: ", fresh)


def scales(args) -> None:
    """Per-channel KV scales of a fixed threshold (8 / qmax) for 8 KV heads of 128: random
    weights, so these runs measure speed and memory, not quality."""
    values = [[8.0 / float(args.qmax)] * (8 * 128)] * args.layers
    Path(args.file).write_text(json.dumps({"scales": {"k_scales": values, "v_scales": values}}))


def builder_best(args) -> None:
    """The builder's folder at its best: CUDA graph on (its default is off); optionally the
    whole context allowed."""
    path = Path(args.folder) / "genai_config.json"
    genai = json.loads(path.read_text())
    for options in genai["model"]["decoder"]["session_options"]["provider_options"]:
        options.get("cuda", {})["enable_cuda_graph"] = "1"
    if args.max_length:
        genai["search"]["max_length"] = args.max_length
    path.write_text(json.dumps(genai, indent=4))


def linked_copy(args) -> None:
    """DST: links to SRC's files and a copy of its genai_config.json, so a setting can change
    (builder-best) without a second copy of the weights."""
    src, dst = Path(args.src).resolve(), Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name != "genai_config.json" and not (dst / path.name).exists():
            (dst / path.name).symlink_to(path)
    (dst / "genai_config.json").write_text((src / "genai_config.json").read_text())


def set_config(args) -> None:
    """Set genai_config.json entries: PATH=VALUE, PATH a /-separated key path (keys may hold
    dots, as ep.cuda.fpa_intb_gemm does; a number indexes a list, as provider_options/0/cuda),
    VALUE JSON (a bare word stays a string)."""
    path = Path(args.folder) / "genai_config.json"
    genai = json.loads(path.read_text())
    for setting in args.settings:
        keys, _, value = setting.partition("=")
        *parents, last = keys.split("/")
        section = genai
        for key in parents:
            is_list = isinstance(section, list)
            section = section[int(key)] if is_list else section.setdefault(key, {})
        try:
            section[last] = json.loads(value)
        except json.JSONDecodeError:
            section[last] = value
    path.write_text(json.dumps(genai, indent=4))


def llama_copy(args) -> None:
    """The checkpoint in the Llama layout the builder reads (same weights)."""
    from fixtures.llama_layout import write_llama_copy

    write_llama_copy(Path(args.checkpoint), Path(args.dst))


def buffer_decode(args) -> None:
    """Prefill and 64 decode steps after 1k and 131k prompts with the KV buffer for 1,048,576
    tokens in place, and the GPU memory in use after each."""
    import numpy as np
    import onnxruntime_genai as og

    folder = args.folder
    genai = json.loads((Path(folder) / "genai_config.json").read_text())
    print(
        "context_length", genai["model"]["context_length"],
        "max_length", genai["search"]["max_length"],
    )  # fmt: skip
    model = og.Model(folder)
    for length in (1024, 131072):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=1048576, do_sample=False, min_length=length + 64)
        generator = og.Generator(model, params)
        ids = np.random.default_rng(0).integers(3, 90000, (1, length)).astype(np.int32)
        start = time.perf_counter()
        generator.append_tokens(ids)
        prompt_done = time.perf_counter()
        for _ in range(64):
            generator.generate_next_token()
        end = time.perf_counter()
        print(
            f"prompt {length}: prefill {length / (prompt_done - start):.0f} tok/s, decode "
            f"{64 / (end - prompt_done):.1f} tok/s (KV buffer for 1048576 tokens)"
        )
        query = ["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader"]
        print(subprocess.run(query, capture_output=True, text=True).stdout.strip())
        del generator


def checkpoint(args) -> None:
    from benchmarks.calibrated_synthetic import synthetic_checkpoint

    print(synthetic_checkpoint(Path(args.workdir), args.size))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_steps", description=__doc__)
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("versions").set_defaults(run=versions)
    step = steps.add_parser("kv-reuse")
    step.add_argument("folder")
    step.set_defaults(run=kv_reuse)
    step = steps.add_parser("scales")
    step.add_argument("layers", type=int)
    step.add_argument("file")
    step.add_argument("qmax", type=float, nargs="?", default=128)
    step.set_defaults(run=scales)
    step = steps.add_parser("builder-best")
    step.add_argument("folder")
    step.add_argument("--max-length", type=int, default=None)
    step.set_defaults(run=builder_best)
    step = steps.add_parser("buffer-decode")
    step.add_argument("folder")
    step.set_defaults(run=buffer_decode)
    step = steps.add_parser("linked-copy")
    step.add_argument("src")
    step.add_argument("dst")
    step.set_defaults(run=linked_copy)
    step = steps.add_parser("set-config")
    step.add_argument("folder")
    step.add_argument("settings", nargs="+", metavar="PATH=VALUE")
    step.set_defaults(run=set_config)
    step = steps.add_parser("llama-copy")
    step.add_argument("checkpoint")
    step.add_argument("dst")
    step.set_defaults(run=llama_copy)
    step = steps.add_parser("checkpoint")
    step.add_argument("workdir")
    step.add_argument("size")
    step.set_defaults(run=checkpoint)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # from a checkout, uninstalled
    main()
