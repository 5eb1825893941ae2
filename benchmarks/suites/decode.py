"""Decode: onnxruntime-genai prompt and generation tokens/s of built folders, tools alternating.

Greedy, batch 1, random prompt ids (the same for every folder); the prompt is timed to its
first logits, generation over `gen` steps after the first token, one warm-up run each first.
Folders run A B, B A, ... so neither always follows the other. They are the run's builds
(`-p`, `--tools`, `options`) or, with `folders=NAME=DIR,...`, folders built elsewhere (the GPU
driver's, the builder's at its best). `bound=measure` (or a bandwidth in GB/s) adds each
folder's fraction of the memory-bandwidth bound on decode (benchmarks/runtime.py); a measured
bandwidth is the best of a reading before and one after the runs, as a shared machine's single
reading can be low.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import common, harness, runtime
from benchmarks.rows import measured

PARAMS = {"prompts": "128,1024", "gen": 128, "options": "", "folders": "", "bound": "", "seed": 0}
SMOKE = {"prompts": "16", "gen": 8}
STUDIES = {"long_context": "long_context"}


def run(ctx: harness.Context) -> list:
    common.require_genai()
    lengths = [int(n) for n in ctx.param("prompts", PARAMS["prompts"]).split(",")]
    gen, options = ctx.param("gen", 128), tuple(ctx.param("options", "").split())
    bound = ctx.param("bound", "")
    bandwidths = [runtime.measure_bandwidth(ctx.ep)[0]] if bound == "measure" else []
    groups = folder_groups(ctx, options)
    times = [measure(ctx, {t: f for t, (_, f) in g.items()}, lengths, gen) for g in groups]
    if bound == "measure":
        bandwidths.append(runtime.measure_bandwidth(ctx.ep)[0])
    bandwidth = max(bandwidths) if bandwidths else float(bound or 0)
    out = []
    for group, found in zip(groups, times):
        for (tool, length), runs in found.items():
            variant, folder = group[tool]
            out += rows_of(ctx, variant, tool, length, gen, options, runs)
            if bandwidth:
                out.append(bound_row(ctx, variant, tool, folder, length, gen, runs, bandwidth))
    return out


def folder_groups(ctx: harness.Context, options: tuple) -> list[dict[str, tuple[str, Path]]]:
    """The folders measured side by side, tool -> (variant, folder): the given ones, or per
    precision the tools' builds."""
    given = harness.folders(ctx)
    if given:
        return [{tool: (harness.built_variant(tool, f, ctx.ep), f) for tool, f in given.items()}]
    return [
        {tool: (f"{p} {ctx.ep}", ctx.build(p, options, tool)) for tool in ctx.tools}
        for p in ctx.precisions
    ]


def measure(ctx: harness.Context, folders: dict[str, Path], lengths: list[int], gen: int) -> dict:
    """(tool, prompt length) -> [(prompt seconds, generation seconds), ...], tools alternating."""
    models = {tool: runtime.load(folder, ctx.ep) for tool, folder in folders.items()}
    vocab = min(runtime.vocab_size(f) for f in folders.values())
    rng = np.random.default_rng(ctx.param("seed", 0))
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for length in lengths:
        prompt = rng.integers(3, vocab - 16, length).astype(np.int32)
        for model in models.values():
            runtime.one_run(model, prompt, min(gen, 8))  # warm-up
        for rep in range(ctx.repeat):
            for tool in list(models) if rep % 2 == 0 else list(models)[::-1]:
                times.setdefault((tool, length), []).append(
                    runtime.one_run(models[tool], prompt, gen)
                )
    return times


def rows_of(ctx, variant: str, tool: str, length: int, gen: int, options: tuple, runs) -> list:
    params = {"prompt": length, "gen": gen, "options": list(options)}
    return [
        ctx.row(
            variant=variant,
            tool=tool,
            metric=metric,
            unit="tok/s",
            params=params,
            **measured(values),
        )
        for metric, values in (
            ("prompt_tok_s", [length / p for p, _ in runs]),
            ("gen_tok_s", [gen / g for _, g in runs]),
        )
    ]


def bound_row(ctx, variant, tool, folder: Path, length, gen, runs, bandwidth: float):
    """Generation tok/s as a fraction of bandwidth / bytes a step reads (at the mean context)."""
    weights, kv_per_token = runtime.weight_bytes_per_step(folder)
    step_bytes = weights + kv_per_token * (length + gen / 2)
    gen_tok_s = gen / common.median([g for _, g in runs])
    params = {
        "prompt": length,
        "gen": gen,
        "bandwidth_gbps": round(bandwidth, 1),
        "step_bytes": step_bytes,
    }
    return ctx.row(
        variant=variant,
        tool=tool,
        metric="of_bound",
        value=gen_tok_s / (bandwidth * 1e9 / step_bytes),
        unit="",
        params=params,
    )
