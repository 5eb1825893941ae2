"""The one result schema: a flat row per measured number, with its machine and versions.

Like llama-bench's rows, every row stands alone (no file header to lose on the way to a
spreadsheet): what ran (suite, model, variant, tool), what was measured (metric, value, unit,
the spread over `runs`), its settings (`params`), and where and with what it ran (machine,
cpu/gpu, versions, commit, load average, date). A run writes its rows to
benchmarks/results/rows/<suite>-<machine>-<stamp>.json; tables and plots are made from them.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from benchmarks import common

ROWS = common.RESULTS / "rows"


@dataclass(frozen=True)
class Row:
    suite: str  # export, decode, quality, speculative, kernels, ...
    model: str  # the checkpoint: tiny, 1.8b, 7b, 20b, smollm2-135m
    variant: str  # what was built or run from it: "int4 cpu", "gptq 32-sym", "int8 KV 32k"
    tool: str  # ours, builder, or a setting compared in the same run (plain, ngram4-k6)
    metric: str  # seconds, peak_rss_gb, output_gb, prompt_tok_s, gen_tok_s, ppl, kl, top1, ...
    value: float  # the median over `runs`
    unit: str
    runs: int = 1
    low: float | None = None  # smallest and largest of the runs: the spread
    high: float | None = None
    params: dict = field(default_factory=dict)  # prompt and gen lengths, window, options, ...
    machine: str = ""  # short label used in tables: "CPU 2 cores", "H100", "H200"
    cpu: str = ""
    gpu: str = ""
    memory_gb: float | None = None
    versions: dict = field(default_factory=dict)  # python, onnxruntime(-genai), torch, ...
    commit: str = ""
    load: list = field(default_factory=list)  # 1/5/15-minute load average at the start
    date: str = ""  # YYYY-MM-DD HH:MM:SS +ZZZZ of the run's start
    source: str = ""  # the results file the row came from (a converted one names the original)


COLUMNS = [f.name for f in fields(Row)]


def measured(values: list[float]) -> dict:
    """value (median), runs, low, high of repeated measurements."""
    return {
        "value": statistics.median(values),
        "runs": len(values),
        "low": min(values),
        "high": max(values),
    }


def machine_fields(info: dict, load: list | None = None, date: str | None = None) -> dict:
    """The Row fields that say where a run happened, from common.machine_info()'s dict."""
    versions = {"python": info.get("python", ""), **info.get("versions", {})}
    return {
        "machine": machine_label(info),
        "cpu": f"{info.get('cpu', '')}, {info.get('cpu_count')} cores",
        "gpu": info.get("gpu") or "",
        "memory_gb": info.get("memory_gb"),
        "versions": versions,
        "commit": info.get("git", {}).get("commit", ""),
        "load": list(load or []),
        "date": date or "",
    }


def machine_label(info: dict) -> str:
    gpu = info.get("gpu")
    if gpu:
        return gpu.replace("NVIDIA ", "").split()[0]
    return f"CPU {info.get('cpu_count')} cores"


def this_machine() -> dict:
    return machine_fields(
        common.machine_info(), common.load_average(), time.strftime("%Y-%m-%d %H:%M:%S %z")
    )


def write(rows: list[Row], path: Path) -> Path:
    """A JSON list with one row a line: small, and a diff shows which rows changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(asdict(r)) for r in rows)
    path.write_text(f"[\n{lines}\n]\n")
    return path


def read(path: Path) -> list[Row]:
    return [Row(**entry) for entry in json.loads(Path(path).read_text())]


def read_all(folder: Path = ROWS) -> list[Row]:
    return [row for path in sorted(Path(folder).glob("*.json")) for row in read(path)]


# --- tables: md, csv, json (llama-bench's -o) ------------------------------------------------

TABLE = [
    "suite",
    "model",
    "variant",
    "tool",
    "metric",
    "value",
    "spread",
    "runs",
    "machine",
    "date",
]


def number(value: float | None) -> str:
    """Three significant figures, plainly written: 0.0114, 9.33, 618, 14396."""
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def spread(row: Row) -> str:
    if row.runs < 2 or row.low is None or row.high is None:
        return "-"
    return f"{number(row.low)}-{number(row.high)}"


def cells(row: Row) -> dict[str, str]:
    return {
        **{k: str(v) for k, v in asdict(row).items()},
        "value": f"{number(row.value)} {row.unit}".strip(),
        "spread": spread(row),
        "date": row.date[:10],
    }


def table(rows: list[Row], form: str = "md", columns: list[str] = TABLE) -> str:
    if form == "json":
        return json.dumps([asdict(r) for r in rows], indent=1)
    if form == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: json.dumps(v) if isinstance(v, dict | list) else v
                    for k, v in asdict(row).items()
                }
            )
        return out.getvalue()
    return common.markdown_table(columns, [[cells(r)[c] for c in columns] for r in rows])
