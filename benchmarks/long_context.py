"""Long context: prefill and decode of built folders side by side; how long a context loads.

    python -m benchmarks run decode -e cuda --repeat 2 --param study=long_context \
        folders=ours:int8=DIR,builder:int8=DIR contexts=4096,32768,131072 gen=64
    python -m benchmarks run decode -e cuda --param study=long_context capacity=ours:int8=DIR

Timing (one process; the folders of a scheme loaded together, in alternating order per repeat):
- a fresh generator takes the first context as its prompt (prefill tok/s), then decodes `gen`
  tokens (decode tok/s at that context);
- with buffer=N, another fresh generator, of max_length N, takes the first context and
  decodes (what a step costs when the buffers are sized for a long conversation);
- a second fresh generator takes the second context as its prompt (prefill tok/s), decodes,
  and then grows to each later context by appending the missing tokens (og's continued
  prompt), decoding `gen` tokens at each: decode tok/s at 128k without a second 128k prefill.
One warm-up pass per folder first, over the first two contexts: it captures the CUDA graph and
grows the session's memory arena to a 32k prefill, which would otherwise land in the first timed
run of whichever folder goes first. Medians of --repeat, and each point's spread (max - min over
the median) per tool: a ratio inside the spread is not a difference. Names are TOOL:SCHEME: the
rows' tool, and the KV cache in their variant.

capacity=TOOL:SCHEME=DIR,...: the largest max_length a folder loads at, in steps of `step`
tokens: a generator of that max_length is created (the KV cache is allocated whole) and decodes
after a 16-token prompt. Each attempt runs in a fresh process (a failed allocation leaves
nothing behind); binary search between the largest timed context and the folder's own
context_length. With probe=L1,L2,... each folder is tried at exactly those max_lengths instead,
a line each: loaded or not, and the GPU memory in use (MiB) or the error's last line. Without
folders, the run's own builds are timed (named ours:default-PRECISION).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common, harness
from benchmarks.rows import Row
from benchmarks.runtime import load, vocab_size

PARAMS = {
    "folders": "",  # TOOL:SCHEME=DIR,... timed side by side
    "capacity": "",  # TOOL:SCHEME=DIR,... whose largest loading max_length is searched
    "contexts": "4096,32768,131072",
    "gen": 64,
    "buffer": 0,  # also decode in a generator of this max_length (CUDA graphs size buffers so)
    "step": 32768,
    "probe": "",  # L1,L2,...: try the capacity folders at exactly these max_lengths
}
SMOKE = {"contexts": "16,32,48", "gen": 4}

TRY = """
import sys, numpy as np, onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(max_length=int(sys.argv[2]), do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(np.arange(3, 19, dtype=np.int32))
generator.generate_next_token()
import shutil, subprocess
query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
smi = shutil.which(query[0]) and subprocess.run(query, capture_output=True, text=True)
print("LOADED", smi.stdout.strip() if smi else "")
"""


def generator(model, length: int):
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    return og.Generator(model, params)


def decode(gen, steps: int) -> float:
    """tok/s of `steps` decode steps (the first, which reads the prompt's logits, excluded)."""
    gen.generate_next_token()
    start = time.perf_counter()
    for _ in range(steps):
        gen.generate_next_token()
    gen.get_next_tokens()
    return steps / (time.perf_counter() - start)


def append(gen, ids: np.ndarray) -> float:
    start = time.perf_counter()
    gen.append_tokens(ids)
    gen.get_logits()  # the prompt's logits ready (and copied): the prefill is done
    return len(ids) / (time.perf_counter() - start)


def one_pass(model, contexts: list[int], steps: int, rng, vocab: int, buffer: int = 0) -> dict:
    """{"prefill": {ctx: tok/s}, "decode": {ctx: tok/s}, "buffered": {ctx: tok/s}} (module
    docstring)."""
    ids = rng.integers(3, vocab - 16, contexts[-1] + 4 * steps).astype(np.int32)
    out = {"prefill": {}, "decode": {}, "buffered": {}}
    first = generator(model, contexts[0] + steps + 1)
    out["prefill"][contexts[0]] = append(first, ids[: contexts[0]])
    out["decode"][contexts[0]] = decode(first, steps)
    del first
    if buffer:
        roomy = generator(model, buffer)
        append(roomy, ids[: contexts[0]])
        out["buffered"][contexts[0]] = decode(roomy, steps)
        del roomy
    if len(contexts) > 1:
        walk = generator(model, contexts[-1] + steps + 1)
        out["prefill"][contexts[1]] = append(walk, ids[: contexts[1]])
        out["decode"][contexts[1]] = decode(walk, steps)
        for context in contexts[2:]:
            have = len(walk.get_sequence(0))
            append(walk, ids[have:context])
            out["decode"][context] = decode(walk, steps)
        del walk
    return out


def timing(folders: dict[str, Path], args, ep: str, repeat: int) -> dict:
    """Medians per folder; the folders of one scheme are loaded together and released before
    the next scheme's (each session's memory arena keeps what its longest prefill took)."""
    import gc

    contexts = [int(c) for c in args.contexts.split(",")]
    vocab = min(vocab_size(f) for f in folders.values())
    medians = {}
    for scheme in dict.fromkeys(name.split(":")[-1] for name in folders):
        group = {n: f for n, f in folders.items() if n.split(":")[-1] == scheme}
        models = {name: load(folder, ep) for name, folder in group.items()}
        runs: dict[str, list[dict]] = {name: [] for name in group}
        for model in models.values():
            one_pass(model, contexts[:2], 8, np.random.default_rng(1), vocab)
        for rep in range(repeat):
            names = list(models) if rep % 2 == 0 else list(models)[::-1]
            for name in names:
                result = one_pass(models[name], contexts, args.gen, np.random.default_rng(rep),
                                  vocab, args.buffer)  # fmt: skip
                runs[name].append(result)
                print(f"  {name:24s} run {rep + 1}: "
                      + ", ".join(f"prefill@{c} {v:.0f}" for c, v in result["prefill"].items())
                      + "; "
                      + ", ".join(f"decode@{c} {v:.1f}" for c, v in result["decode"].items())
                      + "".join(f", decode@{c} (max_length {args.buffer}) {v:.1f}"
                                for c, v in result["buffered"].items()),
                      flush=True)  # fmt: skip
        for name, rs in runs.items():
            medians[name] = {
                kind: {c: common.median([r[kind][c] for r in rs]) for c in rs[0][kind]}
                for kind in ("prefill", "decode", "buffered")
            }
            medians[name]["spread"] = {
                f"{kind}@{c}": spread([r[kind][c] for r in rs])
                for kind in ("prefill", "decode", "buffered")
                for c in rs[0][kind]
            }
        del models
        gc.collect()
    return medians


def spread(values: list[float]) -> float:
    """(max - min) / median: how far one folder's runs of a point disagree."""
    return (max(values) - min(values)) / common.median(values)


def try_length(folder: Path, length: int) -> tuple[bool, str]:
    """(loaded, what happened): the GPU memory in use (MiB) once a step decoded, or the error's
    last line; a fresh process each time."""
    result = subprocess.run(
        [sys.executable, "-c", TRY, str(folder), str(length)], capture_output=True, text=True
    )
    for line in result.stdout.splitlines():
        if line.startswith("LOADED"):
            return True, line.removeprefix("LOADED").strip()
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    return False, (errors[-1] if errors else f"exit {result.returncode}")[:300]


def capacity(folder: Path, low: int, step: int) -> dict:
    """Largest multiple of `step` (or the folder's context_length) whose generator loads, with
    the GPU memory it took and why the next step did not load."""
    top = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]
    loaded, said = try_length(folder, top)
    if loaded:
        return {"max_length": top, "limit": "context_length of the build", "gpu_mib": said}
    lo, hi = low // step, top // step  # lo loads (the timing ran there), hi does not
    used, error = try_length(folder, lo * step)[1], said
    while hi - lo > 1:
        mid = (lo + hi) // 2
        loaded, said = try_length(folder, mid * step)
        if loaded:
            lo, used = mid, said
        else:
            hi, error = mid, said
    return {"max_length": lo * step, "limit": f"{hi * step} does not load", "gpu_mib": used,
            "error": error}  # fmt: skip


def run(ctx: harness.Context) -> list[Row]:
    common.require_genai()
    args = harness.settings(ctx, PARAMS)
    capacity_of = harness.folders(ctx, "capacity")
    if args.probe:
        return probe_rows(ctx, capacity_of, [int(n) for n in args.probe.split(",")])
    timed = harness.folders(ctx)
    if not (timed or capacity_of):
        timed = {f"ours:default-{p}": ctx.build(p) for p in ctx.precisions}
    medians = timing(timed, args, ctx.ep, ctx.repeat) if timed else {}
    low = max(int(c) for c in args.contexts.split(","))
    caps = {}
    for name, folder in capacity_of.items():
        caps[name] = capacity(folder, low, args.step)
        print(f"  {name}: loads at max_length {caps[name]['max_length']} "
              f"({caps[name]['limit']})", flush=True)  # fmt: skip
    every = {**timed, **capacity_of}

    def variant(name: str) -> str:
        return f"{harness.built_variant(name, every[name], ctx.ep)} {name.split(':', 1)[1]} KV"

    return rows_of(medians, caps, ctx.model, variant)


def rows_of(medians: dict, caps: dict, model: str, variant, **stamp) -> list[Row]:
    """Per TOOL:SCHEME folder: prefill and decode tok/s at each context (medians; `spread` in
    params is (max - min) / median over the runs), decode with the long buffer (`buffered`),
    and the largest max_length that loads. `variant(name)` says what the folder is."""
    out = []
    for name, found in medians.items():
        base = {"suite": "decode", "model": model, "variant": variant(name)}
        for kind, metric in (
            ("prefill", "prompt_tok_s"),
            ("decode", "gen_tok_s"),
            ("buffered", "gen_tok_s_long_buffer"),
        ):
            for context, value in found.get(kind, {}).items():
                params = {"context": int(context)}
                spread = found.get("spread", {}).get(f"{kind}@{context}")
                if spread is not None:
                    params["spread"] = spread
                tool = name.split(":", 1)[0]
                out.append(Row(**base, tool=tool, metric=metric, value=value, unit="tok/s",
                               params=params, **stamp))  # fmt: skip
    for name, found in caps.items():
        out.append(
            Row(
                suite="decode",
                model=model,
                variant=variant(name),
                tool=name.split(":", 1)[0],
                metric="max_length_loads",
                value=found["max_length"],
                unit="tokens",
                params={"limit": found["limit"]},
                **stamp,
            )
        )
    return out


def probe_rows(ctx: harness.Context, folders: dict[str, Path], lengths: list[int]) -> list[Row]:
    """Whether each folder loads at each max_length; GPU MiB in use or the error in params."""
    out = []
    for name, folder in folders.items():
        for length in lengths:
            loaded, said = try_length(folder, length)
            print(name, length, loaded, said, flush=True)
            variant = harness.built_variant(name, folder, ctx.ep)
            out.append(
                ctx.row(
                    variant=f"{variant} {name.split(':', 1)[1]} KV",
                    tool=name.split(":", 1)[0],
                    metric="loads",
                    value=float(loaded),
                    unit="",
                    params={"max_length": length, "said": said},
                )
            )
    return out
