"""Decode: onnxruntime-genai prompt and generation tokens/s of built folders, tools alternating.

Greedy, batch 1, random prompt ids (the same for every folder); the prompt is timed to its
first logits, generation over `gen` steps after the first token. Folders run A B, B A, ... so
neither always follows the other. Decode's memory-bandwidth bound: `python -m
benchmarks.runtime`, which this suite shares its timing with.
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness, runtime
from benchmarks.rows import measured

PARAMS = {"prompts": "128,1024", "gen": 128, "options": ""}
SMOKE = {"prompts": "16", "gen": 8}


def run(ctx: harness.Context) -> list:
    lengths = [int(n) for n in ctx.param("prompts", "128,1024").split(",")]
    gen, options = ctx.param("gen", 128), tuple(ctx.param("options", "").split())
    out = []
    for precision in ctx.precisions:
        folders = {tool: ctx.build(precision, options, tool) for tool in ctx.tools}
        models = {tool: runtime.load(folder, ctx.ep) for tool, folder in folders.items()}
        vocab = min(runtime.vocab_size(f) for f in folders.values())
        rng = np.random.default_rng(0)
        for length in lengths:
            prompt = rng.integers(3, vocab - 16, length).astype(np.int32)
            times: dict[str, list[tuple[float, float]]] = {tool: [] for tool in models}
            for model in models.values():
                runtime.one_run(model, prompt, min(gen, 8))  # warm-up
            for rep in range(ctx.repeat):
                for tool in list(models) if rep % 2 == 0 else list(models)[::-1]:
                    times[tool].append(runtime.one_run(models[tool], prompt, gen))
            for tool, runs in times.items():
                params = {"prompt": length, "gen": gen, "options": list(options)}
                for metric, values in (
                    ("prompt_tok_s", [length / p for p, _ in runs]),
                    ("gen_tok_s", [gen / g for _, g in runs]),
                ):
                    out.append(
                        ctx.row(
                            variant=f"{precision} {ctx.ep}",
                            tool=tool,
                            metric=metric,
                            unit="tok/s",
                            params=params,
                            **measured(values),
                        )
                    )
    return out
