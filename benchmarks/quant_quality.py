"""Quant quality: what int4 costs on real weights, round to nearest, GPTQ, GPTAQ and AWQ.

    python -m benchmarks run quality --workdir /tmp/internlm2-bench --param study=quant_quality \
        settings=32-sym,128-sym,128-asym methods=rtn,gptq,awq heads=int4 eval_tokens=4096
    python -m benchmarks run quality --workdir /tmp/internlm2-bench --param study=quant_quality \
        methods=rtn,gptq,gptaq subset=1          # another calibration sample (and 2, ...)

SmolLM2-135M-Instruct (fixtures/smollm2.py: real trained weights in the InternLM2 layout) is
built at fp32 (the reference) and at int4 with each method x block size x symmetry x lm_head
precision, all with accuracy_level=0 (weights are what is measured, not int8 activations).
Each build runs in its own process: wall time and peak RSS are the build's own.

Calibration and evaluation text are different:
- calibration: `calibration.data.default_text()` (docstrings and code of the standard library,
  what a build uses without calibration_data), tokenized with SmolLM2's real tokenizer and
  passed as calibration_data=ids.json (the checkpoint carries a placeholder SentencePiece model, see
  smollm2.py). Sequences sharing any 16-token run with the evaluation text are dropped first.
- evaluation: `smollm2.eval_text()` (prose: Python's license and history, the heapq essay, the
  Zen) and `smollm2.code_text()` (textwrap.py and shlex.py), `eval_tokens` of each, windows
  of 1024 tokens; perplexity, KL(fp32 || int4) per token and top-1 agreement with fp32.

Bits per weight are those of the quantized linears (codes + fp32 scales + zero points). Rows:
benchmarks/convert.py's quant-quality rows, and per calibrated build `gap_vs_rtn` (and _prose,
_code): its perplexity gap to fp32 over RTN's at the same setting and lm_head. `subset=N`
calibrates on another sample of the default text (its sequences shifted by N places); the
spread of the gap over subsets is how much a result depends on the sample. `tweak` is a GPTQ/AWQ
variant for an ablation, fields of the method's recipe (internlm2_graph/calibration/recipes.py)
as JSON, e.g. {"damp": 0.1}, and `calibration_tokens` (0: each method's own) its budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import common, convert, harness
from benchmarks.rows import Row
from fixtures import smollm2
from internlm2_graph.evaluate import kl_and_top1

SETTINGS = {
    "32-sym": {"block_size": "32", "is_symmetric": "true"},
    "128-sym": {"block_size": "128", "is_symmetric": "true"},
    "128-asym": {"block_size": "128", "is_symmetric": "false"},
    "32-asym": {"block_size": "32", "is_symmetric": "false"},
}
NGRAM = 16
PARAMS = {
    "settings": "32-sym,128-sym,128-asym",
    "methods": "rtn,gptq",
    "heads": "int4",  # lm_head precisions: int4,int8,float
    "eval_tokens": 4096,
    "calibration_tokens": 0,
    "tweak": "",
    "subset": 0,
}
SMOKE: dict = {}  # real weights: SmolLM2-135M (fixtures.smollm2), minutes on two cores
TEXTS = ("prose", "code", "prose+code")


def bits_per_weight(bits: int, block: int, symmetric: bool) -> float:
    return bits + (32 + (0 if symmetric else bits)) / block


def calibration_ids(
    checkpoint: Path, held_out: list[np.ndarray], tokens: int, subset: int = 0
) -> list:
    """The default calibration text as SmolLM2 ids, without sequences that overlap evaluation:
    evenly spaced sequences, shifted by `subset` places (another sample of the same text)."""
    from internlm2_graph.calibration.data import chop, default_text
    from internlm2_graph.config import InternLM2Config

    config = InternLM2Config.from_dir(checkpoint)
    ids = smollm2.encode(checkpoint, default_text())
    grams = {tuple(h[i : i + NGRAM]) for h in held_out for i in range(len(h) - NGRAM + 1)}
    sequences = chop(ids, config, 1 << 30)
    clean = [
        s
        for s in sequences
        if not any(tuple(s[i : i + NGRAM]) in grams for i in range(len(s) - NGRAM + 1))
    ]
    keep = max(1, tokens // len(clean[0]))
    picks = np.linspace(0, len(clean) - 1, min(keep, len(clean))).round().astype(int)
    picks = (picks + subset) % len(clean)
    return [clean[i].tolist() for i in picks], len(sequences) - len(clean)


BUILD = """
import dataclasses, json, sys
from internlm2_graph import build
from internlm2_graph.calibration.recipes import recipe_for
from internlm2_graph.progress import Progress
options, tweaks = json.loads(sys.argv[4]), json.loads(sys.argv[5])
recipe = None  # --tweak: fields of the method's recipe, for ablations
if tweaks:
    recipe = dataclasses.replace(recipe_for(options["algo_config"]), **tweaks)
summary = build(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[6], options, overwrite=True,
                progress=Progress(), recipe=recipe)  # to OUT.log: a line per layer, with ETA
# VmHWM, not getrusage: a child's ru_maxrss can start at its parent's (the evaluating process).
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("SUMMARY", json.dumps({"seconds": summary.seconds, "peak_rss": int(hwm.split()[1]) * 1024}))
"""


def measured_build(
    checkpoint: Path,
    out: Path,
    precision: str,
    options: dict,
    tweaks: dict | None = None,
    finish: Callable[[Path, Path], None] | None = smollm2.install_tokenizer,
    ep: str = "cpu",
) -> dict:
    """Build in a child process; its own wall time and peak RSS. Reuses a finished folder.
    `finish(out, checkpoint)` runs on a new folder (by default: SmolLM2's real tokenizer).
    The build's progress goes to OUT.log as it runs."""
    done = out / "build.json"
    if done.is_file():
        return json.loads(done.read_text())
    log = out.with_name(out.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stderr:
        args = [str(checkpoint), str(out), precision, json.dumps(options), json.dumps(tweaks or {})]
        result = subprocess.run([sys.executable, "-c", BUILD, *args, ep], stdout=subprocess.PIPE,
                                stderr=stderr, text=True, cwd=common.REPO)  # fmt: skip
    if result.returncode:
        raise SystemExit(f"build {out.name} failed:\n{log.read_text()[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("SUMMARY "))
    stats = json.loads(line.split(" ", 1)[1])
    if finish is not None:
        finish(out, checkpoint)
    done.write_text(json.dumps(stats))
    return stats


def run(ctx: harness.Context) -> list[Row]:
    args = harness.settings(ctx, PARAMS)
    args.workdir = ctx.workdir / "smollm2"  # shared with the other SmolLM2 studies
    rows = measure(args)
    made = convert.quant_quality_rows({"rows": rows, "args": vars(args)}, Path(""))
    return made + gap_rows(rows, args)


def gap_rows(rows: list[dict], args) -> list[Row]:
    out = []
    for row in rows:
        if row["method"] in ("fp32", "rtn"):
            continue
        variant = f"int4 {row['method']} {row['setting']} {row['lm_head']}-head cpu"
        for text, suffix in zip(TEXTS, ("_prose", "_code", "")):
            ratio = gap_ratio(rows, row, text)
            if ratio is not None:
                params = {"eval_tokens": args.eval_tokens, "subset": args.subset}
                base = {"suite": "quality", "model": "smollm2-135m", "variant": variant}
                out.append(Row(**base, tool="ours", metric="gap_vs_rtn" + suffix, value=ratio,
                               unit="", params=params))  # fmt: skip
    return out


def measure(args) -> list[dict]:
    """One row per build: method, setting, lm_head, bits per weight, build seconds and peak
    RSS, and perplexity, KL and top-1 per text."""
    checkpoint = smollm2.smollm2_checkpoint(args.workdir)
    texts = {
        "prose": smollm2.encode(checkpoint, smollm2.eval_text(), args.eval_tokens),
        "code": smollm2.encode(checkpoint, smollm2.code_text(), args.eval_tokens),
    }
    from internlm2_graph.calibration.recipes import recipe_for

    used = {}  # budget -> (file, tokens, sequences dropped for overlapping the evaluation)
    subset = args.subset

    def calibration_file(method: str) -> Path:
        """calibration-ids.json (8192 tokens, as before) or calibration-ids-N.json."""
        budget = args.calibration_tokens or recipe_for(method).tokens
        if budget not in used:
            name = "calibration-ids.json" if budget == 8192 else f"calibration-ids-{budget}.json"
            if subset:
                name = name.replace(".json", f"-subset{subset}.json")
            calibration, dropped = calibration_ids(checkpoint, list(texts.values()), budget, subset)
            (args.workdir / name).write_text(json.dumps(calibration))
            used[budget] = (args.workdir / name, sum(map(len, calibration)), dropped)
            print(f"calibration: {used[budget][1]} tokens ({dropped} sequences overlapping the "
                  "evaluation text dropped)", flush=True)  # fmt: skip
        return used[budget][0]

    builds = args.workdir / "quant-quality"
    fp32 = builds / "fp32"
    fp32_stats = measured_build(checkpoint, fp32, "fp32", {})
    rows = [
        {
            "method": "fp32",
            "setting": "-",
            "lm_head": "fp32",
            "bpw": 32.0,
            **fp32_stats,
            **{name: {"perplexity": None} for name in texts},
        }
    ]
    reference_ppl, tokens = {}, {}
    for setting in args.settings.split(","):
        for head in args.heads.split(","):
            for method in args.methods.split(","):
                options = {**SETTINGS[setting], "accuracy_level": "0", "algo_config": method}
                if head != "int4":
                    options["lm_head_precision"] = head
                if method != "rtn":
                    options["calibration_data"] = str(calibration_file(method))
                tweaks = json.loads(args.tweak) if args.tweak and method != "rtn" else {}
                name = f"{method}-{setting}-head-{head}"
                if subset and method != "rtn":
                    name += f"-subset{subset}"
                if tweaks:
                    name += "-" + "-".join(f"{k}={v}" for k, v in sorted(tweaks.items()))
                start = time.perf_counter()
                stats = measured_build(checkpoint, builds / name, "int4", options, tweaks)
                row = {
                    "method": method + (f" {json.dumps(tweaks)}" if tweaks else ""),
                    "setting": setting,
                    "lm_head": head,
                    "bpw": bits_per_weight(4, int(SETTINGS[setting]["block_size"]),
                                           SETTINGS[setting]["is_symmetric"] == "true"),
                    **stats,
                }  # fmt: skip
                for text, ids in texts.items():
                    q = kl_and_top1(builds / name, fp32, ids, window=1024)
                    reference_ppl[text] = q.reference_perplexity
                    row[text] = {
                        "perplexity": q.perplexity, "kl": q.kl, "top1": q.top1, "tokens": q.tokens
                    }  # fmt: skip
                    tokens[text] = q.tokens
                rows.append(row)
                print(f"{name}: build {stats['seconds']:.0f}s, "
                      f"peak {stats['peak_rss'] / 1e9:.2f} GB, "
                      + ", ".join(f"{t} {row[t]['perplexity']:.3f} KL {row[t]['kl']:.4f}"
                                  for t in texts)
                      + f" ({time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip
    for text in texts:
        rows[0][text] = {
            "perplexity": reference_ppl.get(text), "kl": 0.0, "top1": 1.0, "tokens": tokens[text]
        }  # fmt: skip
    for row in rows:  # both texts as one: the "prose and code"
        count = sum(row[t]["tokens"] for t in texts)
        nll = sum(np.log(row[t]["perplexity"]) * row[t]["tokens"] for t in texts)
        kl = sum(row[t]["kl"] * row[t]["tokens"] for t in texts)
        row["prose+code"] = {"perplexity": float(np.exp(nll / count)), "kl": kl / count}
    return rows


def gap_ratio(rows: list[dict], row: dict, text: str) -> float | None:
    """(ppl - fp32) of this row over (ppl - fp32) of RTN at the same setting and head."""
    fp32 = rows[0][text]["perplexity"]
    rtn = next(
        (
            r
            for r in rows
            if r["method"] == "rtn" and r["setting"] == row["setting"]
            and r["lm_head"] == row["lm_head"]
        ),
        None,
    )  # fmt: skip
    if rtn is None or fp32 is None or rtn[text]["perplexity"] == fp32:
        return None
    return (row[text]["perplexity"] - fp32) / (rtn[text]["perplexity"] - fp32)
