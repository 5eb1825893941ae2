"""Pre-quantized imports on real weights: perplexity of the int4 import against the float model
of its dequantized weights, per format, and what act-order's Gather costs at decode.

SmolLM2-135M-Instruct in the InternLM2 layout (benchmarks/smollm2.py) is quantized group-wise
(group 64: hidden 576 = 9 x 64) to nearest, min-max, as GPTQ and AWQ round once their search is
done, and packed by synthetic.prequantized into each format (act-order variants get GPTQ's
g_idx of a random channel order). Each file is then built twice by the package: `-p int4`
(its codes carried into MatMulNBits, accuracy_level 0 and the CPU default 4) and `-p fp32`
(dequantized exactly, (q - z) * s). Goal: perplexity within 0.1% on real text.

Act-order's cost: GPTQ with and without act-order (same shapes, same codes layout) decode
`--gen` tokens after a `--prompt`-token prompt with onnxruntime-genai, alternating, `--repeat`
times; medians and ratios. The box may be shared: the load average is recorded.

    python -m benchmarks.prequantized_quality [--workdir DIR] [--tokens 4096] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import load_average, machine_info, markdown_table, median, write_results
from benchmarks.runtime import load, one_run
from fixtures.smollm2 import DEFAULT_WORKDIR, code_text, encode, eval_text, smollm2_checkpoint
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--texts", nargs="+", default=["prose", "code"], choices=["prose", "code"])
    parser.add_argument(
        "--levels", nargs="+", default=["0", "4"], help="accuracy_level values to score"
    )
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--name", default="prequantized-quality-smollm2-cpu2")
    args = parser.parse_args()
    checkpoint = smollm2_checkpoint(args.workdir)
    work = args.workdir / "prequantized"
    shutil.rmtree(work, ignore_errors=True)
    sources = {"prose": eval_text, "code": code_text}
    texts = {name: encode(checkpoint, sources[name](), args.tokens) for name in args.texts}
    float_dir = work / "float-fp32"
    build(checkpoint, float_dir, "fp32", "cpu")
    float_ppl = {name: perplexity(float_dir, ids, args.window) for name, ids in texts.items()}
    rows, results = [], {"float_ppl": float_ppl, "load": [load_average()]}
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
            out = work / f"{name}-int4-acc{level}"
            start = time.perf_counter()
            summary = build(packed, out, "int4", "cpu", {"accuracy_level": level})
            folders[(name, level)] = out
            if name not in chosen or level not in args.levels:
                continue
            for text, ids in texts.items():
                q = kl_and_top1(out, fp32, ids, args.window)
                gap = q.perplexity / q.reference_perplexity - 1
                results[f"{name}/acc{level}/{text}"] = {
                    "int4_ppl": q.perplexity,
                    "dequantized_fp32_ppl": q.reference_perplexity,
                    "relative_gap": gap,
                    "kl": q.kl,
                    "top1": q.top1,
                    "build_s": time.perf_counter() - start,
                    "format": summary.prequantized,
                }
                rows.append(
                    [
                        name,
                        level,
                        text,
                        f"{q.perplexity:.4f}",
                        f"{q.reference_perplexity:.4f}",
                        f"{gap:+.4%}",
                        f"{q.kl:.2e}",
                        f"{q.top1:.2%}",
                        f"{float_ppl[text]:.3f}",
                    ]
                )
                print(rows[-1], flush=True)
    prompt = texts["prose"][: args.prompt]
    cost = decode_cost(
        folders[("gptq-asym", "4")], folders[("gptq-asym-act", "4")], prompt, args.gen, args.repeat
    )
    results["act_order_decode"] = cost
    results["load"].append(load_average())
    table = markdown_table(
        [
            "file",
            "accuracy_level",
            "text",
            "int4 ppl",
            "fp32 dequantized ppl",
            "gap",
            "KL",
            "top-1",
            "float checkpoint ppl",
        ],
        rows,
    )
    tok = cost["median_tok_s"]
    spread = {n: f"{min(v):.1f}-{max(v):.1f}" for n, v in cost["tok_s"].items()}
    markdown = (
        f"SmolLM2-135M (InternLM2 layout) packed by synthetic.prequantized, group {GROUP}, "
        + ", ".join(f"{len(ids)} {name} tokens" for name, ids in texts.items())
        + f", window "
        f"{args.window}; machine {machine_info()}; load {results['load']}\n\n{table}\n\n"
        f"Act-order decode cost (int4, accuracy_level 4, {args.prompt}-token prompt, "
        f"{args.gen} tokens, {args.repeat} alternating runs): plain GPTQ {tok['gptq-asym']:.1f} "
        f"tok/s ({spread['gptq-asym']}), act-order (a Gather before each MatMulNBits) "
        f"{tok['gptq-asym-act']:.1f} tok/s ({spread['gptq-asym-act']}): "
        f"{cost['act_over_plain']:.3f}x\n"
    )
    print(markdown)
    print(write_results(args.name, results, markdown))


if __name__ == "__main__":
    main()
