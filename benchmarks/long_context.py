"""Long-context prefill and decode of built folders, side by side; and how long a context loads.

    python -m benchmarks.long_context ours:int8=DIR builder:int8=DIR ... \
        [--contexts 4096,32768,131072] [--gen 64] [--repeat 2] [--machine NAME]
    python -m benchmarks.long_context --capacity ours:int8=DIR ... [--step 32768]

Timing (one process; the folders of a scheme loaded together, in alternating order per repeat):
- a fresh generator takes the first context as its prompt (prefill tok/s), then decodes --gen
  tokens (decode tok/s at that context);
- with --buffer N, another fresh generator, of max_length N, takes the first context and
  decodes (what a step costs when the buffers are sized for a long conversation);
- a second fresh generator takes the second context as its prompt (prefill tok/s), decodes,
  and then grows to each later context by appending the missing tokens (og's continued
  prompt), decoding --gen tokens at each: decode tok/s at 128k without a second 128k prefill.
One warm-up pass per folder first, over the first two contexts: it captures the CUDA graph and
grows the session's memory arena to a 32k prefill, which would otherwise land in the first timed
run of whichever folder goes first. Medians of --repeat, and each point's spread (max - min over
the median) per tool: a ratio inside the spread is not a difference. Names are TOOL:SCHEME; rows
put each scheme's tools side by side, with ours/builder ratios.

--capacity: the largest max_length a folder loads at, in steps of --step tokens: a generator of
that max_length is created (the KV cache is allocated whole) and decodes after a 16-token
prompt. Each attempt runs in a fresh process (a failed allocation leaves nothing behind);
binary search between the largest timed context and the folder's own context_length. With
--probe L1,L2,... each folder is tried at exactly those max_lengths instead, a line each: loaded
or not, and the GPU memory in use (MiB) or the error's last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, uninstalled
from benchmarks import common  # noqa: E402
from benchmarks.runtime import load, vocab_size  # noqa: E402

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


def parse_models(specs: list[str]) -> dict[str, Path]:
    return {spec.split("=", 1)[0]: Path(spec.split("=", 1)[1]) for spec in specs}


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


def timing(folders: dict[str, Path], args) -> dict:
    """Medians per folder; the folders of one scheme are loaded together and released before
    the next scheme's (each session's memory arena keeps what its longest prefill took)."""
    import gc

    contexts = [int(c) for c in args.contexts.split(",")]
    vocab = min(vocab_size(f) for f in folders.values())
    medians = {}
    for scheme in dict.fromkeys(name.split(":")[-1] for name in folders):
        group = {n: f for n, f in folders.items() if n.split(":")[-1] == scheme}
        models = {name: load(folder, args.ep) for name, folder in group.items()}
        runs: dict[str, list[dict]] = {name: [] for name in group}
        for model in models.values():
            one_pass(model, contexts[:2], 8, np.random.default_rng(1), vocab)
        for rep in range(args.repeat):
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


def report(medians: dict, caps: dict, args) -> None:
    schemes = sorted({n.split(":")[1] for n in (medians or caps)}, key=str)
    rows = []
    contexts = [int(c) for c in args.contexts.split(",")]
    for scheme in schemes if medians else []:
        ours, theirs = medians.get(f"ours:{scheme}"), medians.get(f"builder:{scheme}")
        points_of = {"prefill": contexts[:2], "decode": contexts}
        points_of["buffered"] = [contexts[0]] if args.buffer else []
        for kind, points in points_of.items():
            for c in points:
                a = ours and ours[kind].get(c)
                b = theirs and theirs[kind].get(c)
                spreads = [
                    common.fmt(m and m.get("spread", {}).get(f"{kind}@{c}"), ".1%")
                    for m in (ours, theirs)
                ]
                ratio = common.fmt(common.ratio(a, b), ".3f", "x")
                measure = f"{kind} tok/s @ {c}"
                if kind == "buffered":
                    measure = f"decode tok/s @ {c}, max_length {args.buffer}"
                rows.append([scheme, measure, common.fmt(a), common.fmt(b), ratio,
                             " / ".join(spreads)])  # fmt: skip
    header = ["KV cache", "measure", "ours", "builder", "ours/builder", "spread ours / builder"]
    table = common.markdown_table(header, rows)
    cap_rows = [
        [name, str(c["max_length"]), c.get("gpu_mib", ""), c["limit"], c.get("error", "")]
        for name, c in caps.items()
    ]
    cap_table = common.markdown_table(
        ["folder", "largest max_length that loads", "GPU MiB in use there", "bound", "error"],
        cap_rows,
    )
    info = common.machine_info()
    markdown = (
        f"# Long context, side by side ({info.get('gpu')})\n\n"
        f"`python -m benchmarks.long_context` ({args.repeat} alternating runs, medians; "
        f"{args.gen} decode steps per point)\n\n{table if rows else ''}\n\n"
        f"{cap_table if cap_rows else ''}\n"
    )
    print(markdown)
    common.write_results(f"long-context-{args.machine}", {"timing": medians, "capacity": caps,
                         **info}, markdown)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="*", metavar="TOOL:SCHEME=FOLDER")
    parser.add_argument("--capacity", nargs="*", default=[], metavar="TOOL:SCHEME=FOLDER")
    parser.add_argument("--ep", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--contexts", default="4096,32768,131072")
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--step", type=int, default=32768)
    parser.add_argument(
        "--buffer",
        type=int,
        default=0,
        help="also decode after the first context in a generator of this max_length (with CUDA "
        "graphs onnxruntime-genai's buffers, the attention mask's among them, are that long)",
    )
    parser.add_argument("--probe", default="", metavar="L1,L2,...")
    parser.add_argument("--machine", default=common.default_machine_name())
    args = parser.parse_args(argv)
    common.require_genai()
    if args.probe:
        for name, folder in parse_models(args.capacity).items():
            for length in (int(n) for n in args.probe.split(",")):
                print(name, length, *try_length(folder, length), flush=True)
        return
    medians = timing(parse_models(args.models), args) if args.models else {}
    low = max(int(c) for c in args.contexts.split(","))
    caps = {}
    for name, folder in parse_models(args.capacity).items():
        caps[name] = capacity(folder, low, args.step)
        print(f"  {name}: loads at max_length {caps[name]['max_length']} "
              f"({caps[name]['limit']})", flush=True)  # fmt: skip
    report(medians, caps, args)


if __name__ == "__main__":
    main()
