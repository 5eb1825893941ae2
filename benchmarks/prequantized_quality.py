"""Pre-quantized quality: an int4 import's perplexity against its dequantized float model.

Per format on real weights, and what act-order's Gather costs at decode. SmolLM2-135M-Instruct
in the InternLM2 layout (fixtures/smollm2.py) is quantized group-wise
(group 64: hidden 576 = 9 x 64) to nearest, min-max, as GPTQ and AWQ round once their search is
done, and packed by synthetic.prequantized into each format (act-order variants get GPTQ's
g_idx of a random channel order). Each file is then built twice by the package: `-p int4`
(its codes carried into MatMulNBits, accuracy_level 0 and the CPU default 4) and `-p fp32`
(dequantized exactly, (q - z) * s). Goal: perplexity within 0.1% on real text.

Act-order's cost: GPTQ with and without act-order (same shapes, same codes layout) decode
`gen` tokens after a `prompt`-token prompt with onnxruntime-genai, alternating, --repeat times;
rows of tok/s and the paired ratio.

    python -m benchmarks run quality --repeat 5 --workdir /tmp/internlm2-bench \
        --param study=prequantized \
        tokens=4096 variants=awq,gptq-sym levels=0,4
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.common import median
from benchmarks.rows import Row, measured
from benchmarks.runtime import load, one_run
from fixtures.smollm2 import code_text, encode, eval_text, smollm2_checkpoint
from internlm2_graph import build
from internlm2_graph.evaluate import kl_and_top1, perplexity
from internlm2_graph.synthetic.prequantized import write_prequantized

VARIANTS = {  # name -> (format, symmetric, act_order)
    "awq": ("awq", False, False),
    "gptq-sym": ("gptq", True, False),
    "gptq-asym-act": ("gptq", False, True),
    "ct-sym-act": ("compressed-tensors", True, True),
    "ct-asym": ("compressed-tensors", False, False),
}
GROUP = 64
PARAMS = {
    "tokens": 4096,
    "window": 1024,
    "prompt": 128,
    "gen": 128,
    "variants": ",".join(VARIANTS),
    "texts": "prose,code",
    "levels": "0,4",  # accuracy_level values to score
}
SMOKE: dict = {}  # real weights: SmolLM2-135M (fixtures.smollm2)


def decode_cost(plain: Path, act: Path, prompt: np.ndarray, gen: int, repeat: int) -> dict:
    """Decode seconds of two int4 folders, alternating; act-order's Gather is the difference."""
    models = {"gptq-asym": load(plain, "cpu"), "gptq-asym-act": load(act, "cpu")}
    for model in models.values():
        one_run(model, prompt, 8)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeat):
        for name, model in models.items():
            times[name].append(one_run(model, prompt, gen)[1])
    tok_s = {name: [gen / s for s in values] for name, values in times.items()}
    return {
        "tok_s": tok_s,
        "median_tok_s": {name: median(v) for name, v in tok_s.items()},
        "act_over_plain": median(tok_s["gptq-asym-act"]) / median(tok_s["gptq-asym"]),
    }


def run(ctx: harness.Context) -> list[Row]:
    args = harness.settings(ctx, PARAMS)
    args.workdir, args.repeat = ctx.workdir / "smollm2", ctx.repeat  # as the other SmolLM2 studies
    args.variants, args.texts = args.variants.split(","), args.texts.split(",")
    args.levels = args.levels.split(",")
    checkpoint = smollm2_checkpoint(args.workdir)
    work = args.workdir / "prequantized"
    shutil.rmtree(work, ignore_errors=True)
    sources = {"prose": eval_text, "code": code_text}
    texts = {name: encode(checkpoint, sources[name](), args.tokens) for name in args.texts}
    float_dir = work / "float-fp32"
    build(checkpoint, float_dir, "fp32", "cpu")
    float_ppl = {name: perplexity(float_dir, ids, args.window) for name, ids in texts.items()}
    out = []

    def row(variant: str, metric: str, value: float, unit: str = "", **params) -> Row:
        return ctx.row(model="smollm2-135m", variant=variant, tool="ours", metric=metric,
                       value=value, unit=unit, params=params)  # fmt: skip

    folders = {}
    chosen = {name: VARIANTS[name] for name in args.variants}
    for name, (fmt, symmetric, act_order) in {
        **chosen,
        "gptq-asym": ("gptq", False, False),
        "gptq-asym-act": VARIANTS["gptq-asym-act"],  # the act-order decode cost below
    }.items():
        packed = write_prequantized(
            checkpoint, work / name, fmt, GROUP, symmetric, act_order, seed=1
        )
        fp32 = work / f"{name}-fp32"
        build(packed, fp32, "fp32", "cpu")
        for level in sorted({*args.levels, "4"}):  # level 4 builds are also timed below
            folder = work / f"{name}-int4-acc{level}"
            start = time.perf_counter()
            summary = build(packed, folder, "int4", "cpu", {"accuracy_level": level})
            seconds = time.perf_counter() - start
            folders[(name, level)] = folder
            if name not in chosen or level not in args.levels:
                continue
            for text, ids in texts.items():
                q = kl_and_top1(folder, fp32, ids, args.window)
                gap = q.perplexity / q.reference_perplexity - 1
                variant = f"{name} -> int4 cpu acc{level}"
                params = {"text": text, "tokens": q.tokens, "window": args.window}
                params["float_checkpoint_ppl"] = float_ppl[text]
                params["format"] = summary.prequantized
                out += [
                    row(variant, "ppl", q.perplexity, **params),
                    row(variant, "dequantized_fp32_ppl", q.reference_perplexity, **params),
                    row(variant, "relative_gap", gap, **params),
                    row(variant, "kl", q.kl, "nats", **params),
                    row(variant, "top1", q.top1, **params),
                    row(variant, "build_seconds", seconds, "s", **params),
                ]
                print(name, level, text, f"ppl {q.perplexity:.4f} gap {gap:+.4%}", flush=True)
    prompt = texts["prose"][: args.prompt]
    cost = decode_cost(
        folders[("gptq-asym", "4")], folders[("gptq-asym-act", "4")], prompt, args.gen, args.repeat
    )
    decode = {"prompt": args.prompt, "gen": args.gen, "accuracy_level": 4}
    for name, tok_s in cost["tok_s"].items():
        variant = f"{name} -> int4 cpu acc4"
        out.append(ctx.row(model="smollm2-135m", variant=variant, tool="ours", metric="gen_tok_s",
                           unit="tok/s", params=decode, **measured(tok_s)))  # fmt: skip
    out.append(row("gptq-asym-act -> int4 cpu acc4", "act_over_plain", cost["act_over_plain"],
                   "x", **decode))  # fmt: skip
    return out
