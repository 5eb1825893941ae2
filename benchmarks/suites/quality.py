"""Quality: teacher-forced perplexity of each build, KL to the float build and top-1 agreement.

The same numbers as `internlm2-graph eval FOLDER --text FILE --reference FLOAT_FOLDER`
(internlm2_graph.evaluate), on `tokens` tokens of prose that ships with Python (the standard
library's LICENSE, heapq's essay, the Zen), tokenized with the checkpoint's own tokenizer. The
reference is the fp32 build on the CPU, fp16 on CUDA. `methods` picks int4/int8 roundings
(algo_config: rtn, gptq, gptaq, awq). On random weights only differences between builds mean
something; the real-weights study is study=quant_quality (SmolLM2).
"""

from __future__ import annotations

from benchmarks import harness
from internlm2_graph.evaluate import kl_and_top1
from internlm2_graph.tokenizer import exact_tokenizer

PARAMS = {"tokens": 2048, "window": 512, "methods": "rtn"}
SMOKE = {"tokens": 64, "window": 32}
STUDIES = {
    "cuda_parity": "cuda_parity",
    "calibrated": "calibrated_synthetic",
    "tokenizer": "tokenizer_agreement",
    "quant_quality": "quant_quality",
    "builder": "builder_quality",
    "kv_quality": "kv_quality",
    "prequantized": "prequantized_quality",
    "per_byte": "quality_per_byte",
}


def run(ctx: harness.Context) -> list:
    from fixtures.smollm2 import eval_text

    reference = ctx.build("fp16" if ctx.ep == "cuda" else "fp32")
    ids = exact_tokenizer(reference).encode(eval_text()).ids[: ctx.param("tokens", 2048)]
    window = ctx.param("window", 512)
    out = []
    for precision in ctx.precisions:
        quantized = precision in ("int4", "int8")
        for method in ctx.param("methods", "rtn").split(",") if quantized else [""]:
            options = (f"algo_config={method}",) if method and method != "rtn" else ()
            folder = ctx.build(precision, options)
            if folder == reference:
                continue  # the reference against itself says nothing
            q = kl_and_top1(folder, reference, ids, window)
            variant = " ".join(filter(None, [precision, method, ctx.ep]))
            params = {"tokens": q.tokens, "window": window, "text": "smollm2.eval_text()"}
            for metric, value, unit in (
                ("ppl", q.perplexity, ""),
                ("kl", q.kl, "nats"),
                ("top1", q.top1, ""),
                ("reference_ppl", q.reference_perplexity, ""),
            ):
                out.append(
                    ctx.row(
                        variant=variant,
                        tool="ours",
                        metric=metric,
                        value=value,
                        unit=unit,
                        params=params,
                    )
                )
    return out
