"""ONNX Runtime GenAI throughput of built model folders, and how close decode gets to its bound.

    python -m benchmarks.runtime ours=OUT_DIR builder=BUILDER_DIR --ep cpu --prompts 128 --gen 128
    python -m benchmarks.runtime OUT_DIR --ep cuda --prompts 128,1024 --repeat 5

Several folders are loaded once each and measured in alternation (run 1 of A then B, run 2 of
B then A, ...), so both see the same machine state and neither always goes first. Per folder
and prompt length:
- prompt: time for `append_tokens(prompt)` (the whole prompt through the model, ending with
  the first logits), as tokens/s;
- generation: greedy decoding (batch 1) of --gen new tokens after that prompt, as tokens/s
  over the decode steps only (min_length keeps EOS from ending it early).
One warm-up run per folder first, then the median of --repeat runs.

Decode is bound by memory bandwidth: every step reads all weights (except the embedding table,
of which one row) and the KV cache so far. The bound is bandwidth / bytes per step; bandwidth is
measured (a BLAS dot over 1 GiB on CPU, all threads; a torch device copy on CUDA, read + write
bytes, when torch is present; before and after the runs, the larger kept) or given with
--bandwidth.

Needs only onnxruntime-genai, onnx and numpy: runs on a machine with just the repo on PYTHONPATH.
Results: markdown on stdout and benchmarks/results/runtime-<machine>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import common
from internlm2_graph.runtime import cpu_threads_overlay, physical_cores


@dataclass
class ModelFolder:
    name: str
    folder: Path
    model: object = None
    runs: dict = field(default_factory=dict)  # prompt length -> list of (prompt_s, gen_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", metavar="[NAME=]FOLDER", help="built model folders")
    parser.add_argument("--ep", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--prompts", default="128,1024", help="comma list of prompt lengths")
    parser.add_argument("--gen", type=int, default=128, help="new tokens per run")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs (after a warm-up)")
    parser.add_argument("--bandwidth", type=float, default=None, help="GB/s; skip measuring")
    parser.add_argument("--machine", default=None, help="name in the results file")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def parse_models(specs: list[str]) -> list[ModelFolder]:
    targets = []
    for spec in specs:
        name, _, folder = spec.rpartition("=")
        folder_path = Path(folder)
        targets.append(ModelFolder(name or folder_path.name, folder_path))
    return targets


# --- the runtime ----------------------------------------------------------------------------


def load(folder: Path, ep: str):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if built_for(folder) != ep:  # keep the folder's own provider options when they match
        config.clear_providers()
        if ep != "cpu":
            config.append_provider(ep)
    if ep == "cpu":  # every tool's folder gets the same threads (runtime.cpu_threads_overlay)
        own = json.loads((folder / "genai_config.json").read_text())
        threads = cpu_threads_overlay(own, physical_cores(), os.cpu_count())
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


def measure(targets: list[ModelFolder], lengths: list[int], args) -> None:
    rng = np.random.default_rng(args.seed)
    vocab = min(vocab_size(t.folder) for t in targets)
    for length in lengths:
        prompt = rng.integers(3, vocab - 16, length).astype(np.int32)
        for t in targets:
            one_run(t.model, prompt, min(args.gen, 8))  # warm-up
        for rep in range(args.repeat):
            # A B, B A, A B, ...: neither folder always runs first (right after the other's run)
            for t in targets if rep % 2 == 0 else targets[::-1]:
                prompt_s, gen_s = one_run(t.model, prompt, args.gen)
                t.runs.setdefault(length, []).append((prompt_s, gen_s))
                print(
                    f"  {t.name:10s} prompt {length:5d} run {rep + 1}: "
                    f"{length / prompt_s:9.1f} prompt tok/s, {args.gen / gen_s:8.2f} gen tok/s",
                    flush=True,
                )


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
            raise SystemExit("--ep cuda without torch: pass --bandwidth GBps (e.g. 3350 for H100)")
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


# --- report ---------------------------------------------------------------------------------


def summarize(targets: list[ModelFolder], args, bandwidth: float) -> list[dict]:
    rows = []
    for t in targets:
        weights, kv_per_token = weight_bytes_per_step(t.folder)
        for length, runs in t.runs.items():
            prompt_s = common.median([r[0] for r in runs])
            gen_s = common.median([r[1] for r in runs])
            context = length + args.gen / 2  # mean KV length during decoding
            step_bytes = weights + kv_per_token * context
            bound = bandwidth * 1e9 / step_bytes
            gen_tps = args.gen / gen_s
            rows.append(
                {
                    "model": t.name,
                    "folder": str(t.folder),
                    "prompt_len": length,
                    "gen_tokens": args.gen,
                    "runs": len(runs),
                    "prompt_tok_s": length / prompt_s,
                    "ttft_s": prompt_s,
                    "gen_tok_s": gen_tps,
                    "step_bytes": step_bytes,
                    "weight_bytes": weights,
                    "bound_tok_s": bound,
                    "fraction_of_bound": gen_tps / bound,
                    "effective_gbps": gen_tps * step_bytes / 1e9,
                    "raw": runs,
                    "graph": common.quant_summary(t.folder)["matmulnbits"],
                }
            )
    return rows


def markdown(rows: list[dict], args, bandwidth: float, how: str, info: dict) -> str:
    header = [
        "model",
        "prompt",
        "prompt tok/s",
        "first logits s",
        "gen tok/s",
        "MB read/step",
        "effective GB/s",
        "bound tok/s",
        "of bound",
    ]
    body = [
        [
            r["model"],
            r["prompt_len"],
            f"{r['prompt_tok_s']:.1f}",
            f"{r['ttft_s']:.3f}",
            f"{r['gen_tok_s']:.2f}",
            f"{r['step_bytes'] / 1e6:.0f}",
            f"{r['effective_gbps']:.1f}",
            f"{r['bound_tok_s']:.1f}",
            f"{100 * r['fraction_of_bound']:.0f}%",
        ]
        for r in rows
    ]
    text = (
        f"Runtime ({args.ep}; {info['gpu'] or str(info['cpu_count']) + ' cores'}), "
        f"onnxruntime-genai {common.genai_version(info)}: greedy, batch 1, "
        f"{args.gen} new tokens, median of {args.repeat} after a warm-up; bandwidth "
        f"{bandwidth:.1f} GB/s ({how})\n\n" + common.markdown_table(header, body)
    )
    names = list(dict.fromkeys(r["model"] for r in rows))
    # Each folder against the builder's (or, for two folders, the first against the second).
    base = "builder" if "builder" in names else names[-1]
    if len(names) > 1:
        text += "\n\n" + "\n".join(ratio_lines(rows, name, base) for name in names if name != base)
    return text


def ratio_lines(rows: list[dict], a: str, b: str) -> str:
    lines = []
    for length in dict.fromkeys(r["prompt_len"] for r in rows):
        ra, rb = (
            next(r for r in rows if r["model"] == n and r["prompt_len"] == length) for n in (a, b)
        )
        lines.append(
            f"- prompt {length}: {a}/{b} prompt throughput "
            f"{ra['prompt_tok_s'] / rb['prompt_tok_s']:.2f}x, generation "
            f"{ra['gen_tok_s'] / rb['gen_tok_s']:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.require_genai()
    targets = parse_models(args.models)
    lengths = [int(n) for n in args.prompts.split(",")]
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %z"), common.load_average()
    samples = []
    if args.bandwidth:
        bandwidth, how = args.bandwidth, "given"
    else:
        bandwidth, how = measure_bandwidth(args.ep)
        samples.append(bandwidth)
    print(f"bandwidth {bandwidth:.1f} GB/s ({how})", flush=True)
    for t in targets:
        start = time.perf_counter()
        t.model = load(t.folder, args.ep)
        print(f"loaded {t.name} ({t.folder}) in {time.perf_counter() - start:.1f} s", flush=True)
    measure(targets, lengths, args)
    if samples:
        # Measured again after the runs: on a shared machine one reading can be low (other work,
        # writeback); the bound is the best the machine showed.
        samples.append(measure_bandwidth(args.ep)[0])
        bandwidth = max(samples)
        how += f"; best of before/after the runs: {', '.join(f'{b:.1f}' for b in samples)}"
        print(f"bandwidth {bandwidth:.1f} GB/s ({how})", flush=True)
    info = common.machine_info()
    rows = summarize(targets, args, bandwidth)
    text = markdown(rows, args, bandwidth, how, info)
    print("\n" + text)
    name = f"runtime-{args.machine or common.default_machine_name()}-{args.ep}"
    payload = {
        "machine": info,
        "args": vars(args),
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load": {"start": load_start, "end": common.load_average()},
        "alternation": "ABBA (A B, then B A, ...)",
        "bandwidth_gbps": bandwidth,
        "bandwidth_how": how,
        "bandwidth_samples_gbps": samples,
        "results": rows,
    }
    print(f"\nwrote {common.write_results(name, payload, text)}")
    plot(rows, common.RESULTS / f"{name}.png")


def plot(rows: list[dict], path: Path) -> None:
    lengths = list(dict.fromkeys(r["prompt_len"] for r in rows))
    names = list(dict.fromkeys(r["model"] for r in rows))
    series = {
        n: [
            next(r["gen_tok_s"] for r in rows if (r["model"], r["prompt_len"]) == (n, k))
            for k in lengths
        ]
        for n in names
    }
    series["bound"] = [max(r["bound_tok_s"] for r in rows if r["prompt_len"] == k) for k in lengths]
    common.try_plot(path, "generation tok/s", [f"prompt {k}" for k in lengths], series)


if __name__ == "__main__":
    main()
