"""Serving: `internlm2-graph serve` under closed loops of C clients, through HTTP and on the engine.

Each client sends its next request when the last one is answered; fixed prompt/output lengths
(`fixed`) or chat-like log-normal ones (`mixed`), output lengths held with min_tokens. Paths:
`http` (a uvicorn server in this process, streamed /v1/completions), `engine` (EngineBackend
straight), `chat` (one client on og.Generator as `internlm2-graph chat` drives it: the baseline
for time per output token). Client counts and paths alternate within each of `--repeat`
rounds. The measuring is benchmarks/serving.py's `run(params)` (its rows are this suite's
rows before they become Row records); its `--load` mode is the robustness run.
"""

from __future__ import annotations

from benchmarks import harness, serving
from benchmarks.rows import measured

PARAMS = {
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
    out = []
    for precision in ctx.precisions:
        params = {
            "folder": ctx.build(precision),
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
        out += rows_of(ctx, f"{precision} {ctx.ep}", params, results)
    return out


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
        for metric, unit in METRICS.items():
            values = [r[metric] for r in group if r[metric] is not None]
            if values:
                out.append(
                    ctx.row(
                        variant=f"{variant} {workload} C={clients}",
                        tool=path,
                        metric=metric,
                        unit=unit,
                        params=settings,
                        **measured(values),
                    )
                )
        # Throughput against one client of the same path, round by round (same load).
        alone = {r["round"]: r for r in groups.get((path, workload, 1), ())}
        ratios = [
            r["output_tok_s"] / alone[r["round"]]["output_tok_s"]
            for r in group
            if clients != 1 and r["round"] in alone
        ]
        if ratios:
            out.append(
                ctx.row(
                    variant=f"{variant} {workload} C={clients}",
                    tool=path,
                    metric="speedup_vs_1_client",
                    unit="x",
                    params=settings,
                    **measured(ratios),
                )
            )
    return out
