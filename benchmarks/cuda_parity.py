"""Parity: builds of a small config against the fp32 numpy reference (CUDA on the GPU machine).

    python -m benchmarks run quality -e cuda --param study=cuda_parity

For each precision of `cases` (PRECISION or PRECISION+OPTION=VALUE+...): max |logit difference|
relative to the logit range over a prompt and decode steps, top-1 agreement, and greedy tokens.
int4 is also compared with the reference on its own dequantized weights, which isolates the
runtime's arithmetic from quantization noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks import common, harness
from benchmarks.rows import Row
from internlm2_graph import build
from internlm2_graph.precision import resolve_target
from internlm2_graph.reference import Reference, quantized_reference
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.verify import eos_ids, og_greedy

PROMPT = [1, 17, 230, 5, 981, 44, 12, 600, 73, 8, 19, 400]
STEPS = 10
PARAMS = {"cases": "fp16,bf16,int4,int4+use_cuda_bf16=true,int8"}
SMOKE = {"cases": "int4"}


def compare(model_dir: Path, reference: Reference) -> dict:
    want_tokens, want = reference.greedy(PROMPT, STEPS, eos_ids(model_dir))
    (tokens,), got = og_greedy(model_dir, [PROMPT], STEPS)
    pairs = list(zip(got, want))
    scale = max(float(np.max(np.abs(w))) for _, w in pairs)
    return {
        "max_rel_error": max(float(np.max(np.abs(g[0] - w))) for g, w in pairs) / scale,
        "top1": float(np.mean([int(np.argmax(g[0]) == np.argmax(w)) for g, w in pairs])),
        "tokens_equal": tokens[: len(want_tokens)] == want_tokens,
        "steps": len(pairs),
    }


def run(ctx: harness.Context) -> list[Row]:
    common.require_genai()
    root = ctx.workdir / "cuda-parity"
    shutil.rmtree(root, ignore_errors=True)
    config = make_config(
        "tiny",
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        num_hidden_layers=3,
        max_position_embeddings=512,
    )
    checkpoint = write_checkpoint(root / "ckpt", config, chat=False)
    out = []
    for case in ctx.param("cases", PARAMS["cases"]).split(","):
        precision, *options = case.split("+")
        name = "-".join([precision, *options])
        folder = root / name
        build(checkpoint, folder, precision, ctx.ep, options)
        found = {"fp32 reference": compare(folder, Reference(checkpoint))}
        if precision in ("int4", "int8"):
            target = resolve_target(precision, ctx.ep, dict(o.split("=") for o in options))
            found["dequantized reference"] = compare(
                folder, quantized_reference(checkpoint, target)
            )
        print(name, json.dumps(found), flush=True)
        for against, result in found.items():
            params = {"against": against, "options": options, "steps": result["steps"]}
            for metric in ("max_rel_error", "top1", "tokens_equal"):
                out.append(
                    ctx.row(
                        model="parity-small",
                        variant=f"{precision} {ctx.ep}",
                        tool="ours",
                        metric=metric,
                        value=float(result[metric]),
                        unit="",
                        params=params,
                    )
                )
    return out
