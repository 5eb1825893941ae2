"""Export side by side: internlm2_graph vs the onnxruntime-genai builder, same weights.

For each size, one synthetic InternLM2 checkpoint is written (bf16, the published layout) plus
its Llama-layout copy for the builder (which cannot read InternLM2 without remote code). Each
export runs as its own child process; wall time and peak RSS (of the whole process tree) come
from the kernel. Runs alternate between the two tools, medians are reported.

    python -m benchmarks.export                        # 1.8b, int4 and fp32, cpu, 1 repetition
    python -m benchmarks.export --sizes 1.8b,7b --precisions int4 --repeat 3 --keep

Results: a markdown table on stdout and benchmarks/results/export-<machine>.{json,md}.
The builder needs torch and transformers (`pip install -e .[bench]`); without them its rows say
"not installed". It is stopped at --memory-limit-gb (default: 90% of the memory available at
start) and reported as out of memory. It is not started at all (nor its Llama copy written) when
the peak it needs is known to be over that limit: measured for the same size and precision in an
earlier results file (benchmarks/results/export-*.json, any machine), or else estimated from the
largest measured size scaled by parameters; --builder-anyway runs it regardless. A build whose
output would not fit on the free disk is skipped and reported likewise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import resolve_target
from internlm2_graph.sizes import parameter_count, weight_bytes

TOOLS = ("ours", "builder")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1.8b", help="comma list of synthetic sizes")
    parser.add_argument("--precisions", default="int4,fp32", help="comma list")
    parser.add_argument("-e", "--ep", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and precision")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma list of ours,builder")
    parser.add_argument("--workdir", default="/tmp/internlm2-bench", help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep checkpoints and models")
    parser.add_argument("--machine", default=None, help="name in the results file")
    parser.add_argument("--memory-limit-gb", type=float, default=None)
    parser.add_argument(
        "--builder-anyway",
        action="store_true",
        help="run the builder even where its known or estimated peak exceeds the memory limit",
    )
    parser.add_argument(
        "--extra-options",
        nargs="+",
        default=[],
        metavar="K=V",
        help="passed to both tools' --extra_options",
    )
    return parser.parse_args(argv)


# --- inputs ---------------------------------------------------------------------------------


def prepare(size: str, work: Path, with_llama: bool, facts: dict) -> tuple[Path, Path | None]:
    """The synthetic checkpoint of `size` and (if the builder runs) its Llama copy.

    `facts` gets the checkpoint's parameters, bytes and write seconds (None if it was there).
    """
    from fixtures.llama_layout import write_llama_copy
    from internlm2_graph.synthetic import make_config, write_checkpoint

    ckpt, llama = work / f"{size}-internlm2", work / f"{size}-llama"
    facts.update(size=size, params=parameters(size), write_seconds=None, llama_seconds=None)
    if not (ckpt / "config.json").is_file():
        need = 2 * facts["params"] + GB
        if need > free_disk(work):
            raise SystemExit(
                f"{size}: the checkpoint needs ~{need / GB:.0f} GB, {free_disk(work) / GB:.0f} "
                f"GB free in {work}"
            )
        start = time.perf_counter()
        write_checkpoint(ckpt, make_config(size), chat=True, seed=0)
        facts["write_seconds"] = time.perf_counter() - start
        print(f"wrote {ckpt} in {facts['write_seconds']:.0f} s", flush=True)
    facts["bytes"] = common.folder_bytes(ckpt)
    if with_llama and not (llama / "config.json").is_file():
        start = time.perf_counter()
        write_llama_copy(ckpt, llama)
        facts["llama_seconds"] = time.perf_counter() - start
        print(f"wrote {llama} in {facts['llama_seconds']:.0f} s", flush=True)
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


def command(tool: str, source: Path, out: Path, precision: str, args) -> list[str]:
    if tool == "ours":
        cmd = [
            sys.executable,
            "-m",
            "internlm2_graph",
            "-i",
            str(source),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            args.ep,
            "--overwrite",
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(source),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            args.ep,
            "-c",
            str(out) + "-cache",
        ]
    return cmd + (["--extra_options", *args.extra_options] if args.extra_options else [])


# --- runs -----------------------------------------------------------------------------------


def run_export(tool: str, source: Path, precision: str, args, work: Path, rep: int) -> dict:
    out = work / f"{source.name.split('-')[0]}-{precision}-{args.ep}-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / "logs" / f"{out.name}-{rep}.log"
    env = {"HF_HUB_OFFLINE": "1"} if tool == "builder" else None
    print(f"  {tool:8s} {precision:5s} run {rep + 1} ...", end=" ", flush=True)
    m = common.run_measured(command(tool, source, out, precision, args), log, env, args.limit)
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


def run_size(size: str, args, tools: list[str], work: Path, facts: dict) -> list[dict]:
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
    ckpt, llama = prepare(size, work, with_llama, facts)
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


def summarize(runs: list[dict], tools: list[str], builder_missing: bool) -> list[dict]:
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
                "not installed"
                if tool == "builder" and builder_missing
                else "not run"
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


def cell(entry: dict, key: str, scale: float, spec: str) -> str:
    """A median, or (for a tool that did not finish) its status: in full in the wall-time
    column, shortened elsewhere, with the RSS it had reached when it stopped."""
    if entry["status"] != "ok":
        peak = entry.get("peak_rss_bytes_failed")
        needs = entry.get("needs")
        if key == "seconds":
            return entry["status"]
        if key == "peak_rss_bytes" and needs:
            approx = "~" if needs["estimate"] else ""
            text = f"needs {approx}{needs['bytes'] / 1e9:.1f} ({needs['how']}"
            for other in needs.get("also", [])[:1]:
                text += f"; ~{other['bytes'] / 1e9:.1f} from {other['from']['size']} "
                text += f"{other['from']['ep']}"
            return text + ")"
        if key == "peak_rss_bytes" and peak:
            return f"{peak / 1e9:.1f} when it stopped"
        return "-"
    return common.fmt(entry[key] / scale if entry[key] is not None else None, spec)


def markdown(rows: list[dict], args, info: dict) -> str:
    header = [
        "size",
        "precision",
        "ours wall s",
        "builder wall s",
        "ours/builder wall",
        "ours peak RSS GB",
        "builder peak RSS GB",
        "ours/builder RSS",
        "ours out GB",
        "builder out GB",
    ]
    body = []
    for r in rows:
        o, b = r["ours"], r["builder"]
        body.append(
            [
                r["size"],
                f"{r['precision']} {args.ep}",
                cell(o, "seconds", 1, ".1f"),
                cell(b, "seconds", 1, ".1f"),
                common.fmt(r["ratio_seconds"], ".2f", "x"),
                cell(o, "peak_rss_bytes", 1e9, ".2f"),
                cell(b, "peak_rss_bytes", 1e9, ".2f"),
                common.fmt(r["ratio_peak_rss"], ".2f", "x"),
                cell(o, "output_bytes", 1e9, ".2f"),
                cell(b, "output_bytes", 1e9, ".2f"),
            ]
        )
    title = (
        f"Export, {info['cpu_count']} cores / {info['memory_gb']} GB"
        f"{', ' + info['gpu'] if info['gpu'] else ''}; median of {args.repeat} run(s) each, "
        "synthetic bf16 checkpoints"
    )
    notes = [
        f"- {f['size']} checkpoint: {f['params'] / 1e9:.2f} B parameters, "
        f"{f.get('bytes', 0) / 1e9:.1f} GB"
        + (f", written in {f['write_seconds']:.0f} s" if f.get("write_seconds") else "")
        for f in args.facts
    ]
    if any(r["builder"].get("needs") for r in rows):
        notes.append(
            f"- builder rows marked 'not run' were not started: the peak RSS it needs (GB) is "
            f"over this machine's limit of {args.limit / 1e9:.1f} GB (90% of the memory "
            "available at start unless --memory-limit-gb); '~' marks an estimate"
        )
    return f"{title}\n\n" + common.markdown_table(header, body) + "\n\n" + "\n".join(notes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    builder_missing = not common.has_module("torch", "transformers")
    if builder_missing and "builder" in tools:
        print("onnxruntime-genai builder needs torch + transformers: not installed, skipped")
        tools.remove("builder")
    limit_gb = args.memory_limit_gb or 0.9 * common.memory_available_bytes() / 1e9
    args.limit = int(limit_gb * 1e9)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    info = common.machine_info()
    name = f"export-{args.machine or common.default_machine_name()}"
    args.known = known_builder_peaks()  # this name's previous file included
    print(f"memory limit per export: {limit_gb:.1f} GB; work folder {work}", flush=True)
    runs, args.facts = [], []
    started, load_start = time.strftime("%Y-%m-%d %H:%M:%S %z"), common.load_average()
    for size in args.sizes.split(","):
        args.facts.append({})
        runs += run_size(size, args, tools, work, args.facts[-1])
    rows = summarize(runs, tools, builder_missing)
    text = markdown(rows, args, info)
    print("\n" + text)
    payload = {
        "machine": info,
        "started": started,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "load": {"start": load_start, "end": common.load_average()},
        "args": {k: v for k, v in vars(args).items() if k not in ("limit", "known", "facts")},
        "memory_limit_bytes": args.limit,
        "checkpoints": args.facts,
        "summary": rows,
        "runs": runs,
    }
    print(f"\nwrote {common.write_results(name, payload, text)}")
    plot(rows, common.RESULTS / f"{name}.png")


def plot(rows: list[dict], path: Path) -> None:
    labels = [f"{r['size']} {r['precision']}" for r in rows]
    for key, unit, scale in (("seconds", "s", 1), ("peak_rss_bytes", "GB", 1e9)):
        series = {tool: [(r[tool][key] or 0) / scale for r in rows] for tool in TOOLS}
        target = path.with_name(path.stem + f"-{key.split('_')[0]}.png")
        common.try_plot(target, f"export {key.replace('_bytes', '')} ({unit})", labels, series)


if __name__ == "__main__":
    main()
