"""Serving: `internlm2-graph serve` under closed loops of C clients, through HTTP and on the engine.

Each client sends its next request when the last one is answered; fixed prompt/output lengths
(`fixed`) or chat-like log-normal ones (`mixed`), output lengths held with min_tokens. Paths:
`http` (a uvicorn server in this process, streamed /v1/completions), `engine` (EngineBackend
straight), `chat` (one client on og.Generator as `internlm2-graph chat` drives it: the baseline
for time per output token). Client counts and paths alternate within each of `--repeat`
rounds. The measuring is benchmarks/serving.py's `run(params)` (its rows are this suite's
rows before they become Row records). `folder=DIR` serves a built folder instead of building
one; `load=true` is the robustness run instead (1,000 requests from 64 clients, 10% dropped
mid-stream, 5% malformed: status counts, changed greedy replies, caches left, RSS).

Studies (`--param study=NAME`): engine_load (og.Engine closed loops on paged folders, CUDA),
paged_check (the paged graph against the reference on CUDA), replicas (Ray Serve replicas).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks import harness, serving
from benchmarks.rows import measured

STUDIES = {"engine_load": "engine_load", "paged_check": "paged_gpu", "replicas": "replicas"}
PARAMS = {
    "folder": "",
    "load": False,
    "clients": "1,8",
    "paths": "engine,http,chat",
    "workloads": "fixed,mixed",
    "prompt": 16,
    "gen": 64,
    "max_batch_size": 16,
    "max_length": 256,
}
SMOKE = {"clients": "1,2", "paths": "engine,http", "workloads": "fixed", "prompt": 8, "gen": 4}
METRICS = {
    "output_tok_s": "tok/s",
    "ttft_p50_s": "s",
    "ttft_p99_s": "s",
    "tpot_p50_s": "s",
    "tpot_p99_s": "s",
}


def run(ctx: harness.Context) -> list:
    given = Path(ctx.param("folder", ""))
    if given.name:  # its rows are labelled with the folder, not the synthetic --model
        ctx = dataclasses.replace(ctx, model=given.name)
        folders = {harness.built_variant(given.name, given, ctx.ep): given}
    else:
        folders = {f"{p} {ctx.ep}": ctx.build(p) for p in ctx.precisions}
    if ctx.param("load", False):
        return [row for v, folder in folders.items() for row in load_rows(ctx, v, folder)]
    out = []
    for variant, folder in folders.items():
        params = {
            "folder": folder,
            "clients": [int(c) for c in str(ctx.param("clients", PARAMS["clients"])).split(",")],
            "paths": ctx.param("paths", PARAMS["paths"]).split(","),
            "workloads": ctx.param("workloads", PARAMS["workloads"]).split(","),
            "prompt_tokens": ctx.param("prompt", PARAMS["prompt"]),
            "output_tokens": ctx.param("gen", PARAMS["gen"]),
            "max_batch_size": ctx.param("max_batch_size", PARAMS["max_batch_size"]),
            "max_length": ctx.param("max_length", PARAMS["max_length"]),
            "rounds": ctx.repeat,
        }
        results = serving.run(params)
        out += rows_of(ctx, variant, params, results)
    return out


# The robustness run's numbers: counts that should all be 0, then the server's RSS.
LOAD_METRICS = {
    **dict.fromkeys(
        ("server_errors_5xx", "well_formed_unanswered", "malformed_not_4xx", "greedy_differing",
         "active_requests_after", "second_run_5xx", "second_run_greedy_differing"),
        "requests",
    ),  # fmt: skip
    **dict.fromkeys(("rss_idle_mb", "rss_after_first_run_mb", "rss_after_second_run_mb"), "MB"),
}


def load_rows(ctx: harness.Context, variant: str, folder: Path) -> list:
    (result,) = serving.load({"folder": folder, "max_batch_size": ctx.param("max_batch_size", 16)})
    params = {k: result[k] for k in ("requests", "clients", "statuses", "greedy_compared")}
    return [
        ctx.row(variant=f"{variant} load", tool="http", metric=metric, value=result[metric],
                unit=unit, params=params)
        for metric, unit in LOAD_METRICS.items()
    ]  # fmt: skip


def rows_of(ctx, variant: str, params: dict, results: list[dict]) -> list:
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        key = (result["path"], result["workload"], result["clients"])
        groups.setdefault(key, []).append(result)
    out = []
    for (path, workload, clients), group in sorted(groups.items()):
        settings = {
            "workload": workload,
            "clients": clients,
            "prompt": params["prompt_tokens"] if workload == "fixed" else "mixed",
            "gen": params["output_tokens"] if workload == "fixed" else "mixed",
            "max_batch_size": params["max_batch_size"],
        }
        named = {"variant": f"{variant} {workload} C={clients}", "tool": path, "params": settings}
        out += harness.metric_rows(ctx, group, METRICS, **named)
        # Throughput against one client of the same path, round by round (same load).
        alone = {r["round"]: r for r in groups.get((path, workload, 1), ())}
        ratios = [
            r["output_tok_s"] / alone[r["round"]]["output_tok_s"]
            for r in group
            if clients != 1 and r["round"] in alone
        ]
        if ratios:
            out.append(ctx.row(metric="speedup_vs_1_client", unit="x", **named, **measured(ratios)))
    return out
