"""Speculative decoding in onnxruntime-genai: tokens/s and acceptance per setting beside plain
greedy decoding, in the same run, on copy-heavy and free-writing prompts.

The measuring half of the `speculative` suite (benchmarks/suites/speculative.py), which says
how to run it. One folder is built per run: the target (fp32 on cpu, fp16 on cuda) with its int4
self-draft in draft/ (internlm2_graph's speculative=draft). Two og.Models are loaded from it:
without the draft (plain decoding and n-gram settings, switched per generator with
GeneratorParams.set_speculative_options) and with it (draft settings). Per prompt, every setting
runs once to warm up, then `repeat` rounds in which each setting runs next to a run of plain
decoding (plain first on even rounds, second on odd ones; settings in order, then reversed).
tokens/s is `gen` new tokens (min_length keeps EOS away, greedy) over the time from the prompt's
first logits to the last token, the median of the runs; "vs plain" is the median over rounds of
plain's time / the setting's time within a pair. Acceptance is og's own
`draft_tokens_accepted / draft_tokens_evaluated` (get_speculative_stats), tokens per round
`mean_emitted_tokens_per_round`. Every setting's tokens are compared with plain decoding's.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import common

# name -> (model: "target" or "draft", GeneratorParams.set_speculative_options keywords)
SETTINGS = {
    "plain": ("target", {"ngram_size": 0}),
    "ngram3-k6": ("target", {"ngram_size": 3, "max_draft_tokens": 6}),
    "ngram3-k4": ("target", {"ngram_size": 3, "max_draft_tokens": 4}),
    "ngram3-k8": ("target", {"ngram_size": 3, "max_draft_tokens": 8}),
    "ngram2-k6": ("target", {"ngram_size": 2, "max_draft_tokens": 6}),
    "ngram4-k6": ("target", {"ngram_size": 4, "max_draft_tokens": 6}),
    "ngram4-k8": ("target", {"ngram_size": 4, "max_draft_tokens": 8}),
    "ngram5-k6": ("target", {"ngram_size": 5, "max_draft_tokens": 6}),
    "ngram4-k6-cooldown": ("target", {"ngram_size": 4, "max_draft_tokens": 6, "cooldown": True}),
    "ngram4-adaptive2": ("target", {"ngram_size": 4, "min_adaptive_k": 2}),
    "ngram3-adaptive1": ("target", {"ngram_size": 3, "min_adaptive_k": 1}),
    "ngram3-adaptive2": ("target", {"ngram_size": 3, "min_adaptive_k": 2}),
    "ngram3-k6-cooldown": ("target", {"ngram_size": 3, "max_draft_tokens": 6, "cooldown": True}),
    "ngram3-k6-chained": (
        "target",
        {"ngram_size": 3, "max_draft_tokens": 6, "ngram_chained_lookup": True},
    ),
    "draft-k2": ("draft", {"max_draft_tokens": 2}),
    "draft-k4": ("draft", {"max_draft_tokens": 4}),
    "draft-k6": ("draft", {"max_draft_tokens": 6}),
    "draft-adaptive1": ("draft", {"min_adaptive_k": 1}),
}
SMOLLM2 = "SmolLM2-135M-Instruct"

CODE = '''def merge_sorted(left, right):
    """Merge two sorted lists into one sorted list."""
    merged = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            merged.append(left[i])
            i += 1
        else:
            merged.append(right[j])
            j += 1
    merged.extend(left[i:])
    merged.extend(right[j:])
    return merged


def merge_sort(items):
    if len(items) <= 1:
        return items
    middle = len(items) // 2
    return merge_sorted(merge_sort(items[:middle]), merge_sort(items[middle:]))
'''
DOCUMENT = """The Harbor Street Library opened on 12 March 1921 with 4,000 books donated by the
shipping merchant Eliza Crane. A fire on 3 June 1954 destroyed the east wing and about a third
of the collection; the wing was rebuilt in brick and reopened on 1 September 1956. In 1988 the
library added a children's room, and in 2009 it became the first public library in the county
to lend e-readers. The library is open from 9 am to 7 pm on weekdays and from 10 am to 4 pm on
Saturdays; it is closed on Sundays. Membership is free for residents of the county."""
PROMPTS = {
    # copy-heavy: the answer repeats long stretches of the prompt
    "copy-code": ("copy", f"Copy this Python code exactly, without changes:\n\n{CODE}"),
    "edit-code": (
        "copy",
        f"Rename the function merge_sorted to merge_lists everywhere in this code and return "
        f"the whole code:\n\n{CODE}",
    ),
    "doc-qa": (
        "copy",
        f"{DOCUMENT}\n\nUsing only the text above, quote every sentence that contains a date.",
    ),
    # free writing: little to copy
    "story": ("free", "Write a short story about a lighthouse keeper who finds a message."),
    "explain": ("free", "Explain how a hash table works and when to use one."),
    "poem": ("free", "Write a poem about the sea in autumn."),
    "advice": ("free", "Give me advice on learning to play the guitar as an adult."),
}


@dataclass
class Case:
    setting: str
    prompt: str
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # plain's time / this one's, paired runs
    stats: list[dict] = field(default_factory=list)
    tokens: list[int] | None = None
    error: str | None = None


# --- the model folder -----------------------------------------------------------------------


def built_folder(args, checkpoint: Path) -> Path:
    """The target with its self-draft in draft/ (CPU only: og 0.18 runs no draft elsewhere),
    built once per checkpoint and settings."""
    from internlm2_graph import build
    from internlm2_graph.speculative import DRAFT_PROVIDERS

    precision = args.precision or ("fp16" if args.ep == "cuda" else "fp32")
    draft = args.ep in DRAFT_PROVIDERS
    name = f"{checkpoint.name}-{precision}-{args.ep}" + (f"-draft-{args.draft}" if draft else "")
    name += "".join(f"-{option.replace('=', '-')}" for option in args.extra_options)
    out = Path(args.workdir) / name
    options = [*args.extra_options, *([f"draft={args.draft}"] if draft else [])]
    if not (out / ("draft" if draft else "") / "genai_config.json").is_file():
        print(build(checkpoint, out, precision, args.ep, options, overwrite=True), flush=True)
        if args.source == SMOLLM2:
            from fixtures.smollm2 import install_tokenizer

            install_tokenizer(out, checkpoint)  # the real BPE tokenizer and chat template
    return out


def load_models(folder: Path, ep: str, with_draft: bool = True) -> dict:
    """{"target": og.Model without the draft, "draft": og.Model with it (if `with_draft`)}."""
    import onnxruntime_genai as og

    from internlm2_graph.runtime import og_config

    models = {}
    for key, mode in (("target", "off"), ("draft", "draft"))[: 2 if with_draft else 1]:
        config = og_config(folder, mode)
        if ep == "cpu":
            config.clear_providers()
        models[key] = og.Model(config)
    return models


# --- the runs -------------------------------------------------------------------------------


def encode(tokenizer, text: str) -> np.ndarray:
    """The prompt as a one-turn chat when the folder has a chat template, else plain text."""
    messages = json.dumps([{"role": "user", "content": text}])
    with contextlib.suppress(Exception):  # a base model: no template
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def search_options(sample: bool) -> dict:
    """Greedy, or InternLM2 chat's own sampling (generation_config: 0.8/0.8) with a fixed seed."""
    if not sample:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 50, "random_seed": 0}


def one_run(
    model, options: dict, prompt: np.ndarray, gen: int, sample: bool = False
) -> tuple[float, list[int], dict]:
    """Seconds from the prompt's logits to the last of `gen` greedy tokens; tokens; og's stats."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + gen
    params.set_search_options(max_length=total, min_length=total, **search_options(sample))
    params.set_speculative_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.get_logits()  # the prompt is through the model
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    tokens = list(map(int, generator.get_sequence(0)))[len(prompt) :]
    seconds = time.perf_counter() - start
    return seconds, tokens, dict(generator.get_speculative_stats())


def measure(models: dict, tokenizer, settings: list[str], prompts: list[str], args) -> list[Case]:
    """Each setting runs next to a run of plain decoding (plain first on even rounds, second on
    odd ones); its speed-up is the median over rounds of plain's time / its time in that pair.
    On a shared machine the load moves within seconds: a ratio of neighbours survives that,
    a ratio of medians taken minutes apart does not."""
    cases = []
    for prompt_name in prompts:
        prompt = encode(tokenizer, PROMPTS[prompt_name][1])
        row = [Case(s, prompt_name) for s in settings]
        for case in row:  # warm-up, and a setting og refuses is reported, not fatal
            key, options = SETTINGS[case.setting]
            try:
                one_run(models[key], options, prompt, min(args.gen, 16), args.sample)
            except Exception as err:
                case.error = str(err).splitlines()[0][:200]
        plain, others = row[0], [c for c in row[1:] if not c.error]
        for rep in range(args.repeat):
            for case in others if rep % 2 == 0 else others[::-1]:
                pair = (plain, case) if rep % 2 == 0 else (case, plain)
                seconds = {c.setting: _timed(c, models, prompt, args, rep) for c in pair}
                case.ratios.append(seconds["plain"] / seconds[case.setting])
            if not others:
                _timed(plain, models, prompt, args, rep)
        cases.extend(row)
    return cases


def _timed(case: Case, models: dict, prompt: np.ndarray, args, rep: int) -> float:
    key, options = SETTINGS[case.setting]
    gen = args.gen
    seconds, tokens, stats = one_run(models[key], options, prompt, gen, args.sample)
    case.seconds.append(seconds)
    case.stats.append(stats)
    case.tokens = tokens
    print(
        f"  {case.prompt:9s} {case.setting:20s} round {rep + 1}: {gen / seconds:7.1f} tok/s, "
        f"accepted {stats['draft_tokens_accepted']}/{stats['draft_tokens_evaluated']}",
        flush=True,
    )
    return seconds


# --- report ---------------------------------------------------------------------------------


def summarize(cases: list[Case], gen: int, sample: bool = False) -> list[dict]:
    """Rows per prompt and setting; sampled tokens are not compared (speculative sampling is a
    draw from the same distribution, not the same draw)."""
    plain = {c.prompt: c for c in cases if c.setting == "plain"}
    rows = []
    for c in cases:
        base = plain.get(c.prompt)
        tok_s = gen / common.median(c.seconds) if c.seconds else None
        base_tok_s = gen / common.median(base.seconds) if base and base.seconds else None
        last = c.stats[-1] if c.stats else {}
        evaluated = last.get("draft_tokens_evaluated", 0)
        accepted = last.get("draft_tokens_accepted", 0)
        rows.append(
            {
                "prompt": c.prompt,
                "kind": PROMPTS[c.prompt][0],
                "setting": c.setting,
                "options": SETTINGS[c.setting][1],
                "tok_s": tok_s,
                "vs_plain": common.median(c.ratios) if c.ratios else (1.0 if c is base else None),
                "vs_plain_ratios": c.ratios,
                "vs_plain_of_medians": common.ratio(tok_s, base_tok_s),
                "acceptance": accepted / evaluated if evaluated else None,
                "tokens_per_round": last.get("mean_emitted_tokens_per_round") or None,
                "rounds": last.get("rounds"),
                "identical": None if sample or not base else c.tokens == base.tokens,
                "seconds": c.seconds,
                "error": c.error,
                "stats": last,
            }
        )
    return rows
