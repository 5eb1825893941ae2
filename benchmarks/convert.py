"""The study tools' own result files, converted into rows (the originals stay as they are).

    python -m benchmarks.convert       # rewrites benchmarks/results/rows/converted-*.json

The studies' earlier command-line versions wrote their own JSON shapes: export-*.json,
runtime-*.json (now the decode suite), quant-quality-*.json, quality-per-byte-*.json and
long-context-*.json hold the numbers the README's headline tables cite; speculative-* and
mask-count-* (benchmarks/probes/mask_count.py, which still writes them) those of the suites of
the same names. Each of their
measurements becomes a row, with the file's machine, versions, commit, load and start time, and
the file as its `source`. Where a study makes rows of the same payload today (export,
quant_quality, quality_per_byte, speculative) it calls the mapping here; long_context's is its
own rows_of, which this calls: one mapping each. common.write_results refreshes the kind's rows
whenever such a file is written, and a test checks the committed rows equal what this makes of
the committed files, so a converted number cannot drift from the measured one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import common, long_context, rows

GB = 1e9
KINDS = (
    "export",
    "runtime",
    "quant-quality",
    "quality-per-byte",
    "long-context",
    "speculative",
    "mask-count",
)


def sources(kind: str, results: Path = common.RESULTS) -> list[Path]:
    """The kind's files, cited (results/) and archived (results/archive/) alike."""
    found = [*results.glob(f"{kind}-*.json"), *(results / "archive").glob(f"{kind}-*.json")]
    return sorted(found, key=lambda p: p.name)


def where(payload: dict, path: Path) -> dict:
    load = payload.get("load", {}).get("start", [])
    info = payload.get("machine", payload)  # long_context.py wrote the machine's fields inline
    fields = rows.machine_fields(info, load, payload.get("started", ""))
    return {**fields, "source": path.name}


def export_rows(payload: dict, path: Path) -> list[rows.Row]:
    """Per size, precision and tool: seconds and peak RSS (median and spread of the runs that
    finished), output size; a builder run skipped as too large gives what it needs instead."""
    ep, stamp, out = payload["args"].get("ep", "cpu"), where(payload, path), []
    for entry in payload["summary"]:
        variant = f"{entry['precision']} {ep}"
        for tool in common_tools(entry):
            result = entry[tool]
            base = {"suite": "export", "model": entry["size"], "variant": variant, "tool": tool}
            if result["status"] != "ok":
                needs = result.get("needs")
                if needs and result["status"].startswith("not run: needs"):
                    params = {"estimate": needs["estimate"], "how": needs["how"]}
                    out.append(
                        rows.Row(
                            **base,
                            metric="needs_gb",
                            value=needs["bytes"] / GB,
                            unit="GB",
                            runs=0,
                            params=params,
                            **stamp,
                        )
                    )
                continue
            runs = [
                r
                for r in payload.get("runs", [])
                if (r.get("size"), r["tool"], r["precision"], r["status"])
                == (entry["size"], tool, entry["precision"], "ok")
            ]
            for metric, key, scale, unit in (
                ("seconds", "seconds", 1, "s"),
                ("peak_rss_gb", "peak_rss_bytes", GB, "GB"),
            ):
                values = [r[key] / scale for r in runs] or [result[key] / scale]
                spread = rows.measured(values) if runs else {"value": result[key] / scale}
                out.append(rows.Row(**base, metric=metric, unit=unit, **spread, **stamp))
            if result.get("output_bytes"):
                out.append(
                    rows.Row(
                        **base,
                        metric="output_gb",
                        unit="GB",
                        value=result["output_bytes"] / GB,
                        **stamp,
                    )
                )
    return out


def common_tools(entry: dict) -> list[str]:
    return [tool for tool in ("ours", "builder") if entry.get(tool, {}).get("status") != "not run"]


def runtime_rows(payload: dict, path: Path) -> list[rows.Row]:
    """Per folder and prompt length: prompt and generation tok/s (median and spread of the raw
    runs) and the fraction of the memory-bandwidth bound reached."""
    args, stamp, out = payload["args"], where(payload, path), []
    ep = args.get("ep", "cpu")
    for entry in payload["results"]:
        folder = Path(entry["folder"]).name
        base = {
            "suite": "decode",
            "model": first(r"(1\.8b|7b|20b|tiny)", folder) or first(r"(1\.8b|7b|20b)", path.name),
            "variant": " ".join(filter(None, [precision_of(entry, folder, path), ep])),
            "tool": entry["model"],
            "params": {"prompt": entry["prompt_len"], "gen": entry["gen_tokens"]},
        }
        raw = entry.get("raw") or []
        for metric, value, values in (
            ("prompt_tok_s", entry["prompt_tok_s"], [entry["prompt_len"] / p for p, _ in raw]),
            ("gen_tok_s", entry["gen_tok_s"], [entry["gen_tokens"] / g for _, g in raw]),
        ):
            # The file's figure (tokens / median seconds) is the value; the runs, the spread.
            spread = {**rows.measured(values), "value": value} if values else {"value": value}
            out.append(rows.Row(**base, metric=metric, unit="tok/s", **spread, **stamp))
        if entry.get("fraction_of_bound") is not None:
            out.append(
                rows.Row(
                    **base, metric="of_bound", value=entry["fraction_of_bound"], unit="", **stamp
                )
            )
    return out


def precision_of(entry: dict, folder: str, path: Path) -> str:
    found = first(r"(int4|int8|fp16|fp32|bf16)", f"{folder} {entry['model']}")
    if found:
        return found
    # The fewest bits a graph holds names it (a mixed int4/int8 layout is an int4 build); a set's
    # own order would change with the process's hash seed.
    bits = min((key.split()[0] for key in entry.get("graph") or {}), default="")
    return {"bits=4": "int4", "bits=8": "int8"}.get(bits, "") or first(
        r"(int4|int8|fp16|fp32)", path.name
    )


def first(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match.group(1) if match else ""


def quant_quality_rows(payload: dict, path: Path) -> list[rows.Row]:
    """Per method, block setting and lm_head (SmolLM2-135M real weights): perplexity, KL to the
    fp32 build and top-1 agreement on held-out prose, code and both; bits per weight, build
    seconds and peak RSS. One run each (no spread)."""
    stamp, out = where(payload, path), []
    for entry in payload["rows"]:
        if entry["method"] == "fp32":
            variant = "fp32 cpu"
        else:
            variant = f"int4 {entry['method']} {entry['setting']} {entry['lm_head']}-head cpu"
        base = {"suite": "quality", "model": "smollm2-135m", "variant": variant, "tool": "ours"}
        params = {"eval_tokens": payload["args"].get("eval_tokens")}
        found = [
            ("bits_per_weight", entry["bpw"], ""),
            ("seconds", entry["seconds"], "s"),
            ("peak_rss_gb", entry["peak_rss"] / GB, "GB"),
        ]
        for text, suffix in (("prose+code", ""), ("prose", "_prose"), ("code", "_code")):
            scores = entry.get(text, {})
            for key, metric, unit in (
                ("perplexity", "ppl", ""),
                ("kl", "kl", "nats"),
                ("top1", "top1", ""),
            ):
                if scores.get(key) is not None:
                    found.append((metric + suffix, scores[key], unit))
        for metric, value, unit in found:
            out.append(
                rows.Row(**base, metric=metric, value=value, unit=unit, params=params, **stamp)
            )
    return out


SCORES = (("perplexity", "ppl", ""), ("kl", "kl", "nats"), ("top1", "top1", ""))


def per_byte_rows(entry: dict, eval_tokens: int, **stamp) -> list[rows.Row]:
    """One row of the per-byte study (benchmarks/quality_per_byte.py, the SmolLM2 bed): MB, then
    perplexity, KL to the bed's fp32 logits and top-1 on both texts (`all`), prose, code and,
    where scored, the held-out text. One run each (no spread)."""
    tool = "llama.cpp" if entry["kind"] == "llama.cpp" else "ours"
    base = {"suite": "quality", "model": "smollm2-135m-bed", "variant": entry["name"], "tool": tool}
    out = [rows.Row(**base, metric="mb", value=entry["bytes"] / 1e6, unit="MB", **stamp)]
    for text in ("all", "prose", "code", *(("held",) if "held" in entry else ())):
        suffix = "" if text == "all" else f"_{text}"
        for key, metric, unit in SCORES:
            if entry[text].get(key) is not None:
                value, params = entry[text][key], {"eval_tokens": eval_tokens}
                out.append(rows.Row(**base, metric=metric + suffix, value=value, unit=unit,
                                    params=params, **stamp))  # fmt: skip
    return out


def quality_per_byte_rows(payload: dict, path: Path) -> list[rows.Row]:
    """The per-byte study's files, written before it returned rows."""
    tokens, stamp = payload["args"]["eval_tokens"], where(payload, path)
    return [row for entry in payload["rows"] for row in per_byte_rows(entry, tokens, **stamp)]


def long_context_rows(payload: dict, path: Path) -> list[rows.Row]:
    """The file's timing and capacity as long_context's rows; the size and precision come from
    the file's name (`--machine h200-7b-int4-...`)."""
    precision = first(r"-(int4|int8|fp16)", path.name)

    def variant(name: str) -> str:
        return f"{precision} cuda {name.split(':', 1)[1]} KV"

    model = first(r"-(1\.8b|7b|20b)-", path.name)
    timing, caps = payload.get("timing", {}), payload.get("capacity", {})
    return long_context.rows_of(timing, caps, model, variant, **where(payload, path))


def speculative_rows(payload: dict, path: Path) -> list[rows.Row]:
    """Per prompt and setting: tok/s (median and spread of the timed runs), the speed-up over
    plain decoding (median of the paired ratios), acceptance; whether the tokens were plain
    decoding's (greedy runs) is in params."""
    args, stamp, out = payload["args"], where(payload, path), []
    gen, ep = args["gen"], args.get("ep", "cpu")
    source = payload.get("source", "")
    model = "smollm2-135m" if "SmolLM2" in source else first(r"(tiny|1\.8b|7b|20b)", source)
    folder = payload.get("folder", "")  # ...-<checkpoint dtype>-<precision>-<ep>-draft-int4
    precision = first(r"-(fp32|fp16|bf16|int4|int8)-(?:cpu|cuda)", folder) or first(
        r"(fp32|fp16)", source
    )
    for entry in payload["results"]:
        if entry.get("error") or not entry.get("seconds"):
            continue
        base = {
            "suite": "speculative",
            "model": model,
            "tool": entry["setting"],
            "variant": f"{precision} {ep} {entry['prompt']}",
        }
        params = {
            "kind": entry.get("kind"),
            "identical": entry.get("identical"),
            "options": entry.get("options"),
            "sampled": bool(args.get("sample")),
        }
        tok_s = {**rows.measured([gen / s for s in entry["seconds"]]), "value": entry["tok_s"]}
        out.append(rows.Row(**base, metric="tok_s", unit="tok/s", params=params, **tok_s, **stamp))
        ratios = entry.get("vs_plain_ratios") or []
        if ratios:
            speedup = {**rows.measured(ratios), "value": entry["vs_plain"]}
            out.append(
                rows.Row(**base, metric="speedup", unit="x", params=params, **speedup, **stamp)
            )
        if entry.get("acceptance") is not None:
            out.append(
                rows.Row(
                    **base,
                    metric="acceptance",
                    value=entry["acceptance"],
                    unit="",
                    params=params,
                    **stamp,
                )
            )
    return out


def mask_count_rows(payload: dict, path: Path) -> list[rows.Row]:
    """Microseconds per run of each way of counting the mask, at each mask row length: int64
    (the builder's graph) against float32 (ours), int32 beside them."""
    stamp, out = where(payload, path), []
    ep = "cuda" if payload.get("gpu") else "cpu"
    tools = {"int64": "builder", "float32": "ours", "int32": "int32"}
    for length, ways in payload["results"].items():
        for way, micros in ways.items():
            out.append(
                rows.Row(
                    suite="kernels",
                    model="-",
                    variant=f"mask count {length} {ep}",
                    tool=tools[way],
                    metric="us_per_run",
                    value=micros,
                    unit="us",
                    params={"way": way},
                    **stamp,
                )
            )
    return out


CONVERT = {
    "export": export_rows,
    "runtime": runtime_rows,
    "quant-quality": quant_quality_rows,
    "quality-per-byte": quality_per_byte_rows,
    "long-context": long_context_rows,
    "speculative": speculative_rows,
    "mask-count": mask_count_rows,
}


def convert(kind: str, results: Path = common.RESULTS) -> list[rows.Row]:
    return [row for path in sources(kind, results) for row in CONVERT[kind](load(path), path)]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def kind_of(name: str) -> str | None:
    """The kind a results file of this name (without suffix) belongs to, if it has a converter."""
    return next((kind for kind in KINDS if name.startswith(f"{kind}-")), None)


def write(kind: str) -> Path:
    made = convert(kind)
    path = rows.write(made, rows.ROWS / f"converted-{kind}.json")
    print(f"wrote {path}: {len(made)} rows")
    return path


def main() -> None:
    for kind in KINDS:
        write(kind)


if __name__ == "__main__":
    main()
