"""Speculative decoding: each setting's tokens/s beside plain greedy decoding in the same run.

Every timed run of a setting is paired with a plain run next to it (order alternating); the
speed-up is the median of the pairs' ratios, so load that moves within seconds cancels out.
Settings and prompts are those of `python -m benchmarks.speculative` (n-gram lookup `ngramN-kK`,
the int4 self-draft `draft-kK`; copy-heavy and free-writing prompts), which also runs SmolLM2's
real weights.
"""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks import harness
from benchmarks import speculative as spec
from benchmarks.rows import measured

PARAMS = {"settings": "plain,ngram4-k6", "prompts": "copy-code,story", "gen": 200}
SMOKE = {"prompts": "copy-code", "gen": 16}


def run(ctx: harness.Context) -> list:
    import onnxruntime_genai as og

    settings = ctx.param("settings", PARAMS["settings"]).split(",")
    if settings[0] != "plain":
        settings = ["plain", *settings]
    draft = any(spec.SETTINGS[s][0] == "draft" for s in settings)
    precision = "fp16" if ctx.ep == "cuda" else "fp32"
    folder = ctx.build(precision, ("draft=int4",) if draft else ())
    models = spec.load_models(folder, ctx.ep, with_draft=draft)
    args = SimpleNamespace(gen=ctx.param("gen", 200), repeat=ctx.repeat, sample=False)
    prompts = ctx.param("prompts", PARAMS["prompts"]).split(",")
    cases = spec.measure(models, og.Tokenizer(models["target"]), settings, prompts, args)
    out = []
    for row, case in zip(spec.summarize(cases, args.gen), cases):
        if case.error:
            raise RuntimeError(f"{case.setting} on {case.prompt}: {case.error}")
        params = {
            "prompt": case.prompt,
            "gen": args.gen,
            "options": spec.SETTINGS[case.setting][1],
            "identical": row["identical"],
            "acceptance": row["acceptance"],
        }
        tok_s = [args.gen / s for s in case.seconds]
        out.append(
            ctx.row(
                variant=f"{precision} {ctx.ep} {case.prompt}",
                tool=case.setting,
                metric="tok_s",
                unit="tok/s",
                params=params,
                **measured(tok_s),
            )
        )
        if case.ratios:
            out.append(
                ctx.row(
                    variant=f"{precision} {ctx.ep} {case.prompt}",
                    tool=case.setting,
                    metric="speedup",
                    unit="x",
                    params=params,
                    **measured(case.ratios),
                )
            )
    return out
