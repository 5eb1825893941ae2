"""Export sizes: ours beside the onnxruntime-genai builder per synthetic size, within memory.

For each size, one synthetic InternLM2 checkpoint is written (bf16, the published layout) plus
its Llama-layout copy for the builder (which cannot read InternLM2 without remote code). Each
export runs as its own child process; wall time and peak RSS (of the whole process tree) come
from the kernel. Runs alternate between the two tools, medians are reported.

    python -m benchmarks run export -p int4,fp32 --tools ours,builder --param study=sizes
    python -m benchmarks run export -p int4 --repeat 3 --param study=sizes sizes=1.8b,7b

Rows: benchmarks/convert.py's export rows (seconds, peak RSS, output size; what a skipped
builder run needs). The builder needs torch and transformers (`pip install -e .[bench]`). It is
stopped at memory_limit_gb (default: 90% of the memory available at start) and reported as out
of memory. It is not started at all (nor its Llama copy written) when the peak it needs is known
to be over that limit: measured for the same size and precision in an earlier results file
(benchmarks/results/export-*.json, any machine), or else estimated from the largest measured
size scaled by parameters; builder_anyway=true runs it regardless. A build whose output would
not fit on the free disk is skipped and reported likewise.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from benchmarks import common, convert, harness
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import resolve_target
from internlm2_graph.sizes import parameter_count, weight_bytes

TOOLS = ("ours", "builder")
PARAMS = {
    "sizes": "1.8b",  # synthetic checkpoints, written to (and with keep=true left in) --workdir
    "options": "",  # --extra_options for both tools, space separated
    "memory_limit_gb": 0.0,  # 0: 90% of the memory available at the start
    "builder_anyway": False,
    "keep": False,  # keep the checkpoints and each tool's last build
}
SMOKE = {"sizes": "tiny"}


# --- inputs ---------------------------------------------------------------------------------


def prepare(size: str, work: Path, with_llama: bool) -> tuple[Path, Path | None]:
    """The synthetic checkpoint of `size` and (if the builder runs) its Llama copy."""
    from fixtures.llama_layout import write_llama_copy
    from internlm2_graph.synthetic import make_config, write_checkpoint

    ckpt, llama = work / f"{size}-internlm2", work / f"{size}-llama"
    if not (ckpt / "config.json").is_file():
        need = 2 * parameters(size) + GB
        if need > free_disk(work):
            raise SystemExit(
                f"{size}: the checkpoint needs ~{need / GB:.0f} GB, {free_disk(work) / GB:.0f} "
                f"GB free in {work}"
            )
        start = time.perf_counter()
        write_checkpoint(ckpt, make_config(size), chat=True, seed=0)
        print(f"wrote {ckpt} in {time.perf_counter() - start:.0f} s", flush=True)
    if with_llama and not (llama / "config.json").is_file():
        start = time.perf_counter()
        write_llama_copy(ckpt, llama)
        print(f"wrote {llama} in {time.perf_counter() - start:.0f} s", flush=True)
    return ckpt, llama if with_llama else None


def parameters(size: str) -> int:
    return parameter_count(synthetic_config(size))


def synthetic_config(size: str) -> InternLM2Config:
    from internlm2_graph.synthetic import make_config

    return InternLM2Config.from_dict(make_config(size))


def free_disk(folder: Path) -> int:
    return shutil.disk_usage(folder).free


# --- what cannot run here -------------------------------------------------------------------

GB = 1e9


def known_builder_peaks(skip: Path | None = None) -> list[dict]:
    """The builder's measured peaks (status ok) from earlier export results files."""
    known = []
    for path in sorted(common.RESULTS.glob("export-*.json")):
        if skip is not None and path.resolve() == skip.resolve():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        machine = data.get("machine", {})
        where = machine.get("gpu") or f"{machine.get('cpu_count')} cores"
        for row in data.get("summary", []):
            entry = row.get("builder", {})
            if entry.get("status") == "ok" and entry.get("peak_rss_bytes"):
                known.append(
                    {
                        "size": row["size"],
                        "precision": row["precision"],
                        "ep": data.get("args", {}).get("ep", "cpu"),
                        "peak_rss_bytes": entry["peak_rss_bytes"],
                        "where": where,
                        "file": path.name,
                    }
                )
    return known


def builder_needs(size: str, precision: str, ep: str, known: list[dict]) -> dict | None:
    """The builder's peak RSS for (size, precision, ep) from earlier measurements of that
    precision, the first of: measured at this size and ep; measured at this size on another ep;
    the largest measured size on this ep scaled by parameters; the same on another ep (the last
    two marked estimates). The others found go in `also`: the builder's peak differs by ep (at
    1.8B int4 its cpu build needed 1.4x its cuda one; at 7B fp16, 0.4x). None if nothing of
    that precision was measured."""
    same = [k for k in known if k["precision"] == precision]
    here, elsewhere = [k for k in same if k["ep"] == ep], [k for k in same if k["ep"] != ep]
    candidates = []
    for group in (here, elsewhere):
        exact = [k for k in group if k["size"] == size]
        if exact:
            best = max(exact, key=lambda k: k["peak_rss_bytes"])
            candidates.append(
                {
                    "bytes": best["peak_rss_bytes"],
                    "estimate": False,
                    "how": f"measured: {size} {precision} {best['ep']} on {best['where']}",
                    "from": best,
                }
            )
    for group in (here, elsewhere):
        if group:
            candidates.append(_scaled(size, precision, group))
    if not candidates:
        return None
    needs, seen = dict(candidates[0]), {id(candidates[0]["from"])}
    needs["also"] = []
    for c in candidates[1:]:
        if id(c["from"]) not in seen:
            seen.add(id(c["from"]))
            needs["also"].append(c)
    return needs


def _scaled(size: str, precision: str, measured: list[dict]) -> dict:
    sizes = {k["size"]: parameters(k["size"]) for k in measured}
    base = max(measured, key=lambda k: (sizes[k["size"]], k["peak_rss_bytes"]))
    scale = parameters(size) / sizes[base["size"]]
    return {
        "bytes": base["peak_rss_bytes"] * scale,
        "estimate": True,
        "how": (
            f"estimate: {base['size']} {precision} {base['ep']} on {base['where']} "
            f"({base['peak_rss_bytes'] / GB:.1f} GB) x {scale:.2f} parameters"
        ),
        "from": base,
    }


def output_estimate(size: str, precision: str, ep: str) -> int:
    """What a build writes, with room to spare: the builder's output is within a few % of ours."""
    return int(1.1 * weight_bytes(synthetic_config(size), resolve_target(precision, ep)))


def skipped(tool: str, precision: str, rep: int, status: str, needs: dict | None) -> dict:
    print(f"  {tool:8s} {precision:5s} run {rep + 1} ... {status}", flush=True)
    return {
        "tool": tool,
        "precision": precision,
        "rep": rep,
        "status": status,
        "skipped": True,
        "seconds": None,
        "peak_rss_bytes": None,
        "needs": needs,
    }


# --- runs -----------------------------------------------------------------------------------


def run_export(tool: str, source: Path, precision: str, args, work: Path, rep: int) -> dict:
    out = work / f"{source.name.split('-')[0]}-{precision}-{args.ep}-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / "logs" / f"{out.name}-{rep}.log"
    env = {"HF_HUB_OFFLINE": "1"} if tool == "builder" else None
    print(f"  {tool:8s} {precision:5s} run {rep + 1} ...", end=" ", flush=True)
    make = harness.our_command if tool == "ours" else harness.builder_command
    command = make(source, out, precision, args.ep, args.extra_options)
    m = common.run_measured(command, log, env, args.limit)
    print(f"{m.status}: {m.seconds:.0f} s, peak {m.peak_rss_bytes / 1e9:.2f} GB", flush=True)
    result = {
        "tool": tool,
        "precision": precision,
        "rep": rep,
        "status": m.status,
        "seconds": m.seconds,
        "peak_rss_bytes": m.peak_rss_bytes,
        "log": m.log,
        "command": m.command,
        "output": str(out),
    }
    if m.ok:
        result["output_bytes"] = common.folder_bytes(out)
        result["graph"] = common.quant_summary(out)
    else:
        print(common.tail(log), flush=True)
    last = rep == args.repeat - 1
    if not (args.keep and last):
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + "-cache", ignore_errors=True)
    return result


def run_size(size: str, args, tools: list[str], work: Path) -> list[dict]:
    precisions = args.precisions.split(",")
    too_big = {}  # precision -> what the builder needs, where that is over the memory limit
    if "builder" in tools and not args.builder_anyway:
        for precision in precisions:
            needs = builder_needs(size, precision, args.ep, args.known)
            if needs and needs["bytes"] > args.limit:
                too_big[precision] = needs
    estimates = {p: builder_needs(size, p, args.ep, args.known) for p in precisions}
    runnable = [p for p in precisions if p not in too_big]
    no_disk = {}  # precision -> why the builder cannot run: no room for its Llama copy + output
    if "builder" in tools and runnable:
        have = (work / f"{size}-internlm2" / "config.json").is_file()
        copy = 0 if (work / f"{size}-llama" / "config.json").is_file() else 2 * parameters(size)
        free = free_disk(work) - (0 if have else 2 * parameters(size))
        for precision in runnable:
            need = copy + output_estimate(size, precision, args.ep) + 2 * GB
            if need > free:
                no_disk[precision] = (
                    f"not run: disk (Llama copy ~{copy / GB:.0f} GB + output "
                    f"~{(need - copy) / GB:.0f} GB, {free / GB:.0f} GB free)"
                )
    with_llama = "builder" in tools and any(p not in no_disk for p in runnable)
    ckpt, llama = prepare(size, work, with_llama)
    results = []
    for rep in range(args.repeat):
        order = tools if rep % 2 == 0 else tools[::-1]
        for precision in precisions:
            for tool in order:
                if tool == "builder" and precision in too_big:
                    needs = too_big[precision]
                    status = (
                        f"not run: needs {'~' if needs['estimate'] else ''}"
                        f"{needs['bytes'] / GB:.1f} GB > {args.limit / GB:.1f} GB limit"
                    )
                    results.append({"size": size, **skipped(tool, precision, rep, status, needs)})
                    continue
                if tool == "builder" and precision in no_disk:
                    status, needs = no_disk[precision], estimates[precision]
                    results.append({"size": size, **skipped(tool, precision, rep, status, needs)})
                    continue
                need = output_estimate(size, precision, args.ep) + 2 * GB
                free = free_disk(work)
                if need > free:
                    status = f"not run: disk (output ~{need / GB:.0f} GB, {free / GB:.0f} GB free)"
                    results.append(
                        {
                            "size": size,
                            **skipped(tool, precision, rep, status, None),
                            "disk": {"need_bytes": need, "free_bytes": free},
                        }
                    )
                    continue
                source = ckpt if tool == "ours" else llama
                results.append(
                    {"size": size, **run_export(tool, source, precision, args, work, rep)}
                )
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        if llama:
            shutil.rmtree(llama, ignore_errors=True)
    return results


# --- report ---------------------------------------------------------------------------------


def summarize(runs: list[dict], tools: list[str]) -> list[dict]:
    """Median per (size, precision, tool), plus ours/builder ratios."""
    rows = []
    keys = dict.fromkeys((r["size"], r["precision"]) for r in runs)
    for size, precision in keys:
        row = {"size": size, "precision": precision}
        for tool in TOOLS:
            mine = [
                r for r in runs if (r["size"], r["precision"], r["tool"]) == (size, precision, tool)
            ]
            ok = [r for r in mine if r["status"] == "ok"]
            status = (
                "not run"
                if tool not in tools or not mine
                else "ok"
                if len(ok) == len(mine)
                else mine[-1]["status"]
            )
            row[tool] = {
                "status": status,
                "needs": next((r["needs"] for r in mine if r.get("needs")), None),
                "runs": len([r for r in mine if not r.get("skipped")]),
                "seconds": common.median([r["seconds"] for r in ok]),
                "peak_rss_bytes": common.median([r["peak_rss_bytes"] for r in ok]),
                "peak_rss_bytes_failed": max(
                    (r["peak_rss_bytes"] for r in mine if r["peak_rss_bytes"]), default=None
                ),
                "output_bytes": ok[0].get("output_bytes") if ok else None,
                "graph": ok[0].get("graph") if ok else None,
            }
        row["ratio_seconds"] = common.ratio(row["ours"]["seconds"], row["builder"]["seconds"])
        row["ratio_peak_rss"] = common.ratio(
            row["ours"]["peak_rss_bytes"], row["builder"]["peak_rss_bytes"]
        )
        rows.append(row)
    return rows


def run(ctx: harness.Context) -> list:
    args = harness.settings(ctx, PARAMS)
    args.ep, args.repeat, args.extra_options = ctx.ep, ctx.repeat, args.options.split()
    args.precisions = ",".join(ctx.precisions)
    limit_gb = args.memory_limit_gb or 0.9 * common.memory_available_bytes() / 1e9
    args.limit = int(limit_gb * 1e9)
    work = ctx.workdir
    work.mkdir(parents=True, exist_ok=True)
    args.known = known_builder_peaks()
    print(f"memory limit per export: {limit_gb:.1f} GB; work folder {work}", flush=True)
    runs = []
    for size in args.sizes.split(","):
        runs += run_size(size, args, list(ctx.tools), work)
    payload = {"args": {"ep": ctx.ep}, "summary": summarize(runs, list(ctx.tools))}
    payload["runs"] = runs
    return convert.export_rows(payload, Path(""))
