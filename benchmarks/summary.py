"""One page from every results file: benchmarks/results/SUMMARY.md and two plots.

    python -m benchmarks.summary            # re-reads benchmarks/results/*.json

Reads export-*.json, runtime-*.json, peak-rss-*.json and cuda-parity.json (whatever is there,
from any machine) and writes SUMMARY.md with tables and ours/builder ratios, plus
summary-export.png (export wall time and peak RSS) and summary-decode.png (decode tok/s as a
fraction of the memory-bandwidth bound) when matplotlib is installed. Runs nothing else.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from benchmarks import common

GB = 1e9
TARGETS_GB = {("1.8b", "fp32"): 2.0, ("1.8b", "int4"): 2.0, ("7b", "int4"): 4.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", default=str(common.RESULTS), help="results folder")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def load(folder: Path, pattern: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(folder.glob(pattern)):
        try:
            out.append((path.stem, json.loads(path.read_text())))
        except (OSError, ValueError) as err:
            print(f"skipped {path.name}: {err}")
    return out


def machine_label(machine: dict) -> str:
    gpu = machine.get("gpu")
    if gpu:
        return gpu.replace("NVIDIA ", "").split()[0]
    return f"CPU {machine.get('cpu_count')} cores"


def gb(value: float | None, spec: str = ".2f") -> str:
    return common.fmt(None if value is None else value / GB, spec)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def size_order(size: str) -> float:
    match = re.match(r"([\d.]+)b", size)
    return float(match.group(1)) if match else 0.0


# --- export ---------------------------------------------------------------------------------


def export_rows(files: list[tuple[str, dict]]) -> list[dict]:
    """One row per (machine, size, precision, ep); a newer file (one with a start time) wins."""
    chosen: dict[tuple, dict] = {}
    for stem, data in files:
        label, ep = machine_label(data["machine"]), data["args"].get("ep", "cpu")
        for row in data["summary"]:
            key = (label, row["size"], row["precision"], ep)
            rank = data.get("started") or ""
            if key not in chosen or rank >= chosen[key]["rank"]:
                chosen[key] = {
                    "rank": rank,
                    "machine": label,
                    "ep": ep,
                    "file": stem,
                    "repeat": data["args"].get("repeat", 1),
                    **row,
                }
    rows = list(chosen.values())
    rows.sort(key=lambda r: (r["machine"], size_order(r["size"]), r["precision"]))
    return rows


def export_cell(entry: dict, key: str) -> str:
    if entry["status"] == "ok":
        value = entry[key]
        return f"{value:.1f}" if key == "seconds" else gb(value)
    needs = entry.get("needs")
    if key == "peak_rss_bytes" and needs:
        mark = "~" if needs["estimate"] else ""
        where = "H100" if "H100" in needs["how"] else needs["how"].split(" on ")[-1].split(" (")[0]
        kind = "est." if needs["estimate"] else "measured"
        return f"needs {mark}{needs['bytes'] / GB:.0f} ({kind}, {needs['from']['ep']} {where})"
    if key == "seconds":
        return short_status(entry["status"])
    return "-"


def short_status(status: str) -> str:
    if "disk" in status:
        return "no disk"
    if status.startswith("not run: needs"):
        return "OOM here"
    return status


def export_table(rows: list[dict]) -> str:
    header = [
        "machine",
        "size",
        "precision",
        "ours s",
        "builder s",
        "ours/builder s",
        "ours peak GB",
        "builder peak GB",
        "ours/builder peak",
        "output GB",
    ]
    body = []
    for r in rows:
        o, b = r["ours"], r["builder"]
        out = o.get("output_bytes") or b.get("output_bytes")
        body.append(
            [
                r["machine"] + ("" if r["rank"] else " †"),
                r["size"],
                f"{r['precision']} {r['ep']}",
                export_cell(o, "seconds"),
                export_cell(b, "seconds"),
                common.fmt(r.get("ratio_seconds"), ".2f", "x"),
                export_cell(o, "peak_rss_bytes"),
                export_cell(b, "peak_rss_bytes"),
                common.fmt(r.get("ratio_peak_rss"), ".3f", "x"),
                gb(out),
            ]
        )
    return common.markdown_table(header, body)


def ckpt_gb(data: dict, run: dict) -> str:
    facts = next((f for f in data.get("checkpoints", []) if f["size"] == run["size"]), {})
    return f"{facts['bytes'] / GB:.1f} GB" if facts.get("bytes") else "size unknown"


def export_notes(files: list[tuple[str, dict]], rows: list[dict]) -> list[str]:
    notes = []
    undated = sorted({r["file"] for r in rows if not r["rank"]})
    if undated:
        notes.append(
            "† from a results file with no recorded date or commit, written by earlier code "
            f"({', '.join(undated)}); later runs of ours alone may be in the peak RSS table"
        )
    for _, data in files:
        for facts in data.get("checkpoints", []):
            if facts.get("write_seconds"):
                notes.append(
                    f"{facts['size']} checkpoint ({machine_label(data['machine'])}): "
                    f"{facts['params'] / 1e9:.2f} B parameters, {facts['bytes'] / GB:.1f} GB bf16, "
                    f"written in {facts['write_seconds']:.0f} s"
                )
        for run in data.get("runs", []):
            if run.get("disk"):
                need, free = run["disk"]["need_bytes"], run["disk"]["free_bytes"]
                notes.append(
                    f"{run['size']} {run['precision']} ({run['tool']}) not run: its output needs "
                    f"~{need / GB:.0f} GB (estimate incl. 2 GB margin) and only {free / GB:.0f} GB "
                    f"were free beside the {run['size']} checkpoint ({ckpt_gb(data, run)})"
                )
            elif run["status"].startswith("not run: disk"):
                notes.append(f"{run['size']} {run['precision']} ({run['tool']}): {run['status']}")
    limits = {
        machine_label(d["machine"]): d["memory_limit_bytes"]
        for _, d in files
        if d.get("memory_limit_bytes")
        and any(r["builder"]["status"].startswith("not run: needs") for r in d["summary"])
    }
    for label, limit in limits.items():
        notes.append(
            f"'OOM here' ({label}): the builder was not started because the peak it needs "
            f"(measured for that size on another machine/ep, or '~' scaled by parameters from the "
            f"largest size measured) is over the {limit / GB:.1f} GB limit (90% of available "
            "memory); it loads the whole model in torch before writing"
        )
    for r in rows:
        needs = r["builder"].get("needs")
        if needs and needs.get("also"):
            alts = "; ".join(f"~{a['bytes'] / GB:.0f} GB ({a['how']})" for a in needs["also"])
            notes.append(
                f"builder {r['size']} {r['precision']} {r['ep']}: needs "
                f"{'~' if needs['estimate'] else ''}{needs['bytes'] / GB:.1f} GB ({needs['how']}); "
                f"other figures: {alts}"
            )
    return notes


# --- runtime --------------------------------------------------------------------------------


def describe(folder: str, name: str, stem: str) -> str:
    text = f"{folder} {name} {stem}".lower()
    size = re.search(r"(\d+(?:\.\d+)?b)", text)
    precision = re.search(r"(int4|int8|fp16|bf16|fp32)", text)
    return f"{size.group(1) if size else '?'} {precision.group(1) if precision else '?'}"


def pairs(data: dict) -> list[tuple[str, str | None]]:
    """(ours, builder) model names of a runtime file: models named ours* whose folder, with
    'ours' -> 'builder', is the builder's. Variant studies (other names) stay in their own .md;
    a file with no builder gives its models alone."""
    folders = {r["model"]: r["folder"] for r in data["results"]}
    by_folder = {f: m for m, f in folders.items()}
    if not any(m.startswith("builder") for m in folders):
        return [(m, None) for m in folders]
    found = []
    for model, folder in folders.items():
        if model.startswith("ours") and "ours" in Path(folder).name:
            other = by_folder.get(folder.replace("ours", "builder"))
            if other:
                found.append((model, other))
    return found


def runtime_rows(files: list[tuple[str, dict]]) -> list[dict]:
    rows = []
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for stem, data in files:
        for ours, builder in pairs(data):
            for length in dict.fromkeys(r["prompt_len"] for r in data["results"]):
                rows.append(runtime_row(stem, [data], ours, builder, length))
        if data.get("started"):  # sessions on the same folders (same builds): pooled below
            key = (
                data["machine"].get("host"),
                data["args"]["ep"],
                tuple(data["args"]["models"]),
                data["args"]["gen"],
                json.dumps(data["machine"].get("versions"), sort_keys=True),
            )
            groups.setdefault(key, []).append((stem, data))
    for group in groups.values():
        if len(group) > 1:
            datas = [d for _, d in group]
            lengths = dict.fromkeys(r["prompt_len"] for d in datas for r in d["results"])
            for ours, builder in pairs(datas[0]):
                for length in lengths:
                    with_length = [
                        d for d in datas if any(r["prompt_len"] == length for r in d["results"])
                    ]
                    label = f"pooled ({len(with_length)} sessions)"
                    row = runtime_row(label, with_length, ours, builder, length)
                    row["pooled"] = [s for s, d in group if d in with_length]
                    rows.append(row)
    rows.sort(key=lambda r: (r["machine"], r["model"], r["prompt"], "pooled" in r, r["file"]))
    return rows


def plot_selection(rows: list[dict]) -> list[dict]:
    """One row per (machine, model, prompt): sessions that alternated in both orders (ABBA)
    first, since a fixed order can favour one side; then pooled sessions, then the file named
    after that model (not a variant such as block sizes), then the newest, then the most runs."""
    chosen: dict[tuple, dict] = {}
    for r in rows:
        key = (r["machine"], r["model"], r["prompt"])
        named = r["model"].split()[0] + "-" + r["model"].split()[1] in r["file"]
        rank = (r["abba"], bool(r.get("pooled")), named, r["started"], r["ours"]["runs"])
        if key not in chosen or rank > chosen[key][0]:
            chosen[key] = (rank, r)
    return [r for _, r in chosen.values()]


def runtime_row(label: str, datas: list[dict], ours: str, builder: str | None, length: int):
    """Medians over all raw runs of these files; the bound from the best bandwidth seen."""

    def pick(name: str) -> dict | None:
        if name is None:
            return None
        found = [
            r
            for d in datas
            for r in d["results"]
            if (r["model"], r["prompt_len"]) == (name, length)
        ]
        if not found:
            return None
        raw = [run for r in found for run in r["raw"]]
        gen = found[0]["gen_tokens"]
        bandwidth = max(d["bandwidth_gbps"] for d in datas)
        bound = bandwidth * 1e9 / found[0]["step_bytes"]
        gen_tps = gen / statistics.median(run[1] for run in raw)
        return {
            "prompt_tok_s": length / statistics.median(run[0] for run in raw),
            "gen_tok_s": gen_tps,
            "bound_tok_s": bound,
            "fraction": gen_tps / bound,
            "runs": len(raw),
            "folder": found[0]["folder"],
        }

    o, b = pick(ours), pick(builder)
    first = datas[0]
    return {
        "file": label,
        "machine": machine_label(first["machine"]),
        "ep": first["args"]["ep"],
        "model": describe(o["folder"], ours, label),
        "ours_name": ours,
        "prompt": length,
        "ours": o,
        "builder": b,
        "gen_ratio": common.ratio(o["gen_tok_s"], b and b["gen_tok_s"]),
        "prompt_ratio": common.ratio(o["prompt_tok_s"], b and b["prompt_tok_s"]),
        "load": [d.get("load") for d in datas],
        # Both orders in every session: what the plots prefer (see plot_selection).
        "abba": all(d.get("alternation", "").startswith("ABBA") for d in datas),
        "started": max(d.get("started") or "" for d in datas),
    }


def runtime_table(rows: list[dict]) -> str:
    header = [
        "machine",
        "model",
        "prompt",
        "ours prompt tok/s",
        "builder prompt tok/s",
        "ratio",
        "ours gen tok/s",
        "builder gen tok/s",
        "ratio",
        "bound tok/s",
        "ours of bound",
        "builder of bound",
        "runs",
        "file",
    ]
    body = []
    for r in rows:
        o, b = r["ours"], r["builder"] or {}
        body.append(
            [
                r["machine"],
                f"{r['model']} {r['ep']}",
                r["prompt"],
                f"{o['prompt_tok_s']:.1f}",
                common.fmt(b.get("prompt_tok_s"), ".1f"),
                common.fmt(r["prompt_ratio"], ".2f", "x"),
                f"{o['gen_tok_s']:.2f}",
                common.fmt(b.get("gen_tok_s"), ".2f"),
                common.fmt(r["gen_ratio"], ".2f", "x"),
                f"{o['bound_tok_s']:.1f}",
                pct(o["fraction"]),
                pct(b.get("fraction")),
                o["runs"],
                r["file"],
            ]
        )
    return common.markdown_table(header, body)


# --- peak RSS and parity ---------------------------------------------------------------------


def peak_rows(peak_files: list[tuple[str, dict]], export_rows_: list[dict]) -> list[list[str]]:
    rows = []
    for stem, data in peak_files:
        label = machine_label(data["machine"])
        for r in data["results"]:
            target = TARGETS_GB.get((r["size"], r["precision"]))
            rows.append((label, r["size"], r["precision"], r["ep"], r, target, stem))
    for r in export_rows_:
        o = r["ours"]
        if o["status"] == "ok":
            entry = {
                "status": "ok",
                "seconds": o["seconds"],
                "peak_rss_bytes": o["peak_rss_bytes"],
            }
            target = TARGETS_GB.get((r["size"], r["precision"]))
            rows.append(
                (r["machine"], r["size"], r["precision"], r["ep"], entry, target, r["file"])
            )
    rows.sort(key=lambda x: (x[0], size_order(x[1]), x[2], x[3]))
    body = []
    for label, size, precision, ep, r, target, stem in rows:
        peak = r["peak_rss_bytes"] / GB
        ok = r["status"] == "ok" and (target is None or peak < target)
        body.append(
            [
                label,
                size,
                f"{precision} {ep}",
                f"{r['seconds']:.0f}",
                f"{peak:.2f}",
                target or "-",
                ("yes" if ok else "NO") if target else "-",
                stem,
            ]
        )
    return body


def parity_table(data: dict) -> str:
    header = ["case (cuda)", "against", "max rel. error", "top-1 agreement", "same tokens", "steps"]
    body = []
    for case, comparisons in data.items():
        if case == "machine":
            continue
        for against, r in comparisons.items():
            body.append(
                [
                    case,
                    against.replace("vs_", "").replace("_", " "),
                    f"{r['max_rel_error']:.2g}",
                    f"{100 * r['top1']:.0f}%",
                    "yes" if r["tokens_equal"] else "no",
                    r["steps"],
                ]
            )
    return common.markdown_table(header, body)


# --- plots ----------------------------------------------------------------------------------


def plot_export(rows: list[dict], path: Path) -> bool:
    if not common.has_module("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['size']}\n{r['precision']}\n{r['machine'].replace('CPU ', '')}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = range(len(rows))
    width = 0.4
    for ax, key, title in (
        (axes[0], "seconds", "export wall time (s)"),
        (axes[1], "peak_rss_bytes", "export peak RSS (GB, log)"),
    ):
        scale = 1 if key == "seconds" else GB
        for k, tool in enumerate(("ours", "builder")):
            values, hatch = [], []
            for r in rows:
                entry = r[tool]
                needs = entry.get("needs")
                if entry["status"] == "ok":
                    values.append(entry[key] / scale)
                    hatch.append(False)
                elif key == "peak_rss_bytes" and needs:
                    values.append(needs["bytes"] / scale)  # what it would need
                    hatch.append(True)
                else:
                    values.append(0)
                    hatch.append(False)
            bars = ax.bar([x + (k - 0.5) * width for x in xs], values, width, label=tool)
            for bar, h, r in zip(bars, hatch, rows, strict=True):
                if h:
                    bar.set_hatch("//")
                    bar.set_alpha(0.45)
                if key == "seconds" and r[tool]["status"] != "ok":
                    ax.text(
                        bar.get_x() + width / 2,
                        2,
                        short_status(r[tool]["status"]),
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=6,
                    )
        if key == "peak_rss_bytes":
            ax.set_yscale("log")
            memory = {r["machine"]: r for r in rows}
            if any(m.startswith("CPU") for m in memory):
                ax.axhline(common.memory_total_bytes() / GB, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(xs), labels, fontsize=6.5)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].legend(fontsize=7)
    axes[1].text(
        0.01,
        0.97,
        "hatched: builder not run, what it needs\n(measured elsewhere or ~estimated);"
        " dashed: this machine's RAM",
        transform=axes[1].transAxes,
        fontsize=6,
        va="top",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_decode(rows: list[dict], path: Path) -> bool:
    if not common.has_module("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    height = 0.4
    for k, tool in enumerate(("ours", "builder")):
        values = [100 * ((r[tool] or {}).get("fraction") or 0) for r in rows]
        bars = ax.barh([y + (0.5 - k) * height for y in ys], values, height, label=tool)
        for bar, r in zip(bars, rows, strict=True):
            if r[tool]:
                ax.text(
                    bar.get_width() + 0.5,
                    bar.get_y() + height / 2,
                    f"{r[tool]['gen_tok_s']:.1f} tok/s",
                    va="center",
                    fontsize=6,
                )
    labels = [
        f"{r['machine']} {r['model']}, prompt {r['prompt']} (bound {r['ours']['bound_tok_s']:.0f})"
        for r in rows
    ]
    ax.set_yticks(ys, labels, fontsize=6)
    ax.set_xlim(0, 100)
    ax.set_xlabel(
        "decode tok/s (labels) as % of the memory-bandwidth bound (tok/s in brackets)", fontsize=8
    )
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


# --- page -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = Path(args.results)
    exports = load(folder, "export-*.json")
    runtimes = load(folder, "runtime-*.json")
    peaks = load(folder, "peak-rss-*.json")
    parity_path = folder / "cuda-parity.json"

    machines = {}
    for _, data in exports + runtimes + peaks:
        m = data["machine"]
        machines.setdefault(machine_label(m), m)
    lines = [
        "# Benchmark summary",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} by `python -m benchmarks.summary` from "
        "the JSON files in this folder (each also has its own .md); synthetic bf16 checkpoints "
        "with the real shapes. Ratios are ours/builder: below 1x is better for time and memory, "
        "above 1x better for tok/s.",
        "",
        "Machines:",
    ]
    for label, m in machines.items():
        versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
        lines.append(
            f"- {label}: {m.get('cpu')}, {m.get('cpu_count')} cores, {m.get('memory_gb')} GB RAM"
            f"{', ' + m['gpu'] if m.get('gpu') else ''}; {versions}"
        )
    dated = sorted(
        (d["started"], d.get("load"), stem)
        for stem, d in exports + runtimes
        if d.get("started") and d.get("load")
    )
    if dated:
        lines.append(
            "- runs with a recorded date and load average (1/5/15 min, start -> end; the CPU "
            "machine is shared):"
        )
        for started, avg, stem in dated:
            lines.append(f"  - {stem}: {started}, load {avg['start']} -> {avg['end']}")

    rows = export_rows(exports)
    lines += ["", "## Export", "", export_table(rows), ""]
    lines += [f"- {note}" for note in export_notes(exports, rows)]

    runtime = runtime_rows(runtimes)
    lines += [
        "",
        "## Runtime (onnxruntime-genai, greedy, batch 1, 128 new tokens)",
        "",
        "Medians after a warm-up, ours and the builder's model alternating in one process. The "
        "bound is measured memory bandwidth / bytes one decode step reads (weights + KV cache "
        "at the mean context); only pairs built from the same weights are shown (block-size and "
        "other variants: see each file's .md). Pooled rows combine the raw runs of several "
        "sessions of the same builds; sessions that ran the pair in the same order every time "
        "('order' below) can favour one side, so compare the ABBA ones first.",
        "",
        runtime_table(runtime),
    ]
    lines.append("")
    for stem, data in runtimes:
        how = data.get("bandwidth_how", "")
        order = data.get("alternation", "A B every run (before ABBA)")
        lines.append(
            f"- {stem}: bandwidth {data['bandwidth_gbps']:.1f} GB/s ({how}); order {order}"
        )

    if parity_path.is_file():
        lines += [
            "",
            "## CUDA parity (`cuda_parity.py`, small config, H100)",
            "",
            parity_table(json.loads(parity_path.read_text())),
            "",
            "int4 against the fp32 reference differs by quantization (random weights have no "
            "structure to survive it); against the reference on the same dequantized weights it "
            "matches.",
        ]

    header = ["machine", "size", "precision", "wall s", "peak RSS GB", "target GB", "pass", "file"]
    lines += [
        "",
        "## Peak RSS of our build (whole process tree, from the kernel)",
        "",
        common.markdown_table(header, peak_rows(peaks, rows)),
    ]

    if not args.no_plots:
        written = []
        for name, fn, data in (
            ("summary-export.png", plot_export, rows),
            ("summary-decode.png", plot_decode, plot_selection(runtime)),
        ):
            if fn(data, folder / name):
                written.append(name)
                print(f"wrote {folder / name} ({(folder / name).stat().st_size // 1024} KB)")
        if written:
            lines += [
                "",
                "## Plots",
                "",
                "Decode: one row per machine, model and prompt length; a session run in both "
                "orders (ABBA) is preferred, then pooled sessions, then the newest file.",
                "",
            ]
            lines += [f"![{name}]({name})\n" for name in written]
    (folder / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
