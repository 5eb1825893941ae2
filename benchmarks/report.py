"""Everything shown about results, made from the rows: the README's headline table,
docs/benchmarks.md (every row, by suite) and its plots.

    python -m benchmarks headline   # README.md between <!-- headline:start/end -->
    python -m benchmarks report     # docs/benchmarks.md + benchmarks/results/plots/*.png

HEADLINE names the rows the README quotes: for each line, the result file and the row's
model, variant, tool names and (decode) prompt length. Numbers are never typed in by hand; the
tests compare the committed README and docs/benchmarks.md with what these functions make.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks import common, rows

README = common.REPO / "README.md"
PAGE = common.REPO / "docs" / "benchmarks.md"
PLOTS = common.RESULTS / "plots"
START, END = "<!-- headline:start -->", "<!-- headline:end -->"
MODELS = {"1.8b": "1.8B", "7b": "7B", "20b": "20B"}


@dataclass(frozen=True)
class Line:
    """One line of a headline table: which rows of which result file it quotes."""

    source: str  # results file name
    model: str
    variant: str  # "int4 cpu"
    ours: str = "ours"  # tool names as the file has them
    builder: str = "builder"
    prompt: int | None = None  # decode: prompt length


EXPORT = [
    Line("export-cpu2-1.8b-int4.json", "1.8b", "int4 cpu"),
    Line("export-cpu2.json", "1.8b", "fp32 cpu"),
    Line("export-cpu2-7b-20b.json", "7b", "int4 cpu"),
    Line("export-cpu2-7b-20b.json", "7b", "fp16 cpu"),
    Line("export-cpu2-7b-20b.json", "20b", "int4 cpu"),
    Line("export-cpu2-7b-20b.json", "20b", "fp16 cpu"),
    Line("export-h100-7b-int4-apart.json", "7b", "int4 cuda"),
]
DECODE = [
    Line("runtime-cpu2-1.8b-int4-final-cpu.json", "1.8b", "int4 cpu", prompt=128),
    Line("runtime-h100-1.8b-cuda.json", "1.8b", "int4 cuda", "ours-int4", "builder-int4", 128),
    Line("runtime-h100-1.8b-cuda.json", "1.8b", "fp16 cuda", "ours-fp16", "builder-fp16", 128),
    Line("runtime-h100-7b-int4-apart-cuda.json", "7b", "int4 cuda", prompt=128),
    Line("runtime-h100-7b-fp16-cuda.json", "7b", "fp16 cuda", "ours-fp16", "builder-fp16", 128),
    Line("runtime-h100-20b-int4-cuda.json", "20b", "int4 cuda", "ours-20b-int4", "", 128),
]
QUALITY_SOURCE = "quant-quality-cpu2-gptaq.json"
QUALITY = [
    Line(QUALITY_SOURCE, "smollm2-135m", "fp32 cpu"),
    *(
        Line(QUALITY_SOURCE, "smollm2-135m", f"int4 {method} {setting} int4-head cpu")
        for setting in ("128-sym", "32-sym")
        for method in ("rtn", "gptq", "gptaq")
    ),
]
LONG_TIMING, LONG_CAPACITY = (
    "long-context-h200-7b-int4-r4.json",
    "long-context-h200-7b-int4-capacity.json",
)
LONG = ["fp16", "int8_per_channel", "fp8_per_channel"]  # KV cache schemes
# Quality per byte on the SmolLM2 bed (quality_per_byte.py's files, as converted rows):
# (file, row name, label), largest first.
PER_BYTE_SOURCE = "quality-per-byte-cpu2-asym.json"
PER_BYTE_32 = "quality-per-byte-cpu2-calib32.json"
PER_BYTE = [
    (PER_BYTE_SOURCE, "fp32", "fp32"),
    (PER_BYTE_SOURCE, "llama.cpp-Q5_K_M-imatrix8", "llama.cpp Q5_K_M + imatrix"),
    (PER_BYTE_SOURCE, "llama.cpp-Q4_K_M-imatrix8", "llama.cpp Q4_K_M + imatrix"),
    (PER_BYTE_SOURCE, "llama.cpp-Q4_K_M", "llama.cpp Q4_K_M"),
    (PER_BYTE_SOURCE, "gptaq8-F", "ours `q4_mixed`, gptaq"),
    (PER_BYTE_32, "llama.cpp-Q4_K_M-imatrix", "llama.cpp Q4_K_M + imatrix, 32 chunks"),
    (PER_BYTE_32, "gptaq32-F", "ours `q4_mixed`, gptaq 32 sequences"),
    (PER_BYTE_SOURCE, "llama.cpp-Q4_K_S-imatrix8", "llama.cpp Q4_K_S + imatrix"),
    (PER_BYTE_SOURCE, "llama.cpp-Q4_1", "llama.cpp Q4_1"),
    (PER_BYTE_SOURCE, "llama.cpp-IQ4_XS-imatrix8", "llama.cpp IQ4_XS + imatrix"),
    (PER_BYTE_SOURCE, "gptaq8-q4_small", "ours `q4_small`, gptaq"),
]


def pick(found: list[rows.Row], line: Line, tool: str, metric: str, **params) -> rows.Row | None:
    """The row of `line`'s file, model and variant with this tool and metric (and params)."""
    if line.prompt is not None:
        params["prompt"] = line.prompt
    for row in found:
        if (row.source, row.model, row.variant, row.tool, row.metric) == (
            line.source,
            line.model,
            line.variant,
            tool,
            metric,
        ) and all(row.params.get(k) == v for k, v in params.items()):
            return row
    return None


def what(line: Line, row: rows.Row | None) -> str:
    precision, ep = line.variant.split()
    machine = row.machine if row else "?"
    return (
        f"{MODELS.get(line.model, line.model)} {precision} | {machine if ep == 'cuda' else 'CPU'}"
    )


def export_cell(found: list[rows.Row], line: Line, tool: str) -> str:
    seconds, peak = (pick(found, line, tool, m) for m in ("seconds", "peak_rss_gb"))
    if seconds and peak:
        return f"{seconds.value:.0f} s, {peak.value:.2f} GB"
    needs = pick(found, line, tool, "needs_gb")
    if needs:
        estimate = "~" if needs.params.get("estimate") else ""
        return f"not run here: needs {estimate}{needs.value:.0f} GB"
    return "-"


def export_table(found: list[rows.Row]) -> str:
    body = []
    for line in EXPORT:
        ours = pick(found, line, line.ours, "seconds")
        cells = [export_cell(found, line, line.ours), export_cell(found, line, line.builder)]
        body.append([*what(line, ours).split(" | "), *cells])
    return common.markdown_table(["model", "machine", "ours", "builder"], body)


def decode_table(found: list[rows.Row]) -> str:
    body = []
    for line in DECODE:
        ours = pick(found, line, line.ours, "gen_tok_s")
        theirs = pick(found, line, line.builder, "gen_tok_s") if line.builder else None
        bound = pick(found, line, line.ours, "of_bound")
        ratio = f"{ours.value / theirs.value:.2f}x" if ours and theirs else "-"
        body.append(
            [
                *what(line, ours).split(" | "),
                rows.number(ours.value) if ours else "-",
                rows.number(theirs.value) if theirs else "-",
                ratio,
                f"{100 * bound.value:.0f}%" if bound else "-",
            ]
        )
    header = ["model", "machine", "ours tok/s", "builder tok/s", "ours/builder", "of the bound"]
    return common.markdown_table(header, body)


def quality_table(found: list[rows.Row]) -> str:
    body = []
    for line in QUALITY:
        words = line.variant.split()
        method, setting = (words[1], words[2]) if len(words) > 2 else (words[0], "-")
        cell = {m: pick(found, line, "ours", m) for m in QUALITY_METRICS}
        body.append(
            [
                method,
                setting.replace("-", " ") if setting != "-" else "-",
                f"{cell['bits_per_weight'].value:.2f}",
                f"{cell['ppl'].value:.2f}",
                f"{cell['kl'].value:.2f}",
                f"{cell['seconds'].value:.0f} s",
                f"{cell['peak_rss_gb'].value:.2f} GB",
            ]
        )
    header = ["method", "block", "bits/weight", "perplexity", "KL to fp32", "build", "peak RSS"]
    return common.markdown_table(header, body)


def long_cell(found: list[rows.Row], source: str, scheme: str, metric: str, **params) -> str:
    """`ours / builder (ratio)` of one measure of the 7B long-context runs."""
    line = Line(source, "7b", f"int4 cuda {scheme} KV")
    side = [pick(found, line, tool, metric, **params) for tool in ("ours", "builder")]
    if not all(side):
        return "-"
    ours, theirs = (r.value for r in side)
    if metric == "max_length_loads":
        return f"{ours:,.0f} / {theirs:,.0f}"
    return f"{ours:.0f} / {theirs:.0f} ({ours / theirs:.2f}x)"


def long_table(found: list[rows.Row]) -> str:
    body = [
        [
            scheme.replace("_per_channel", " per channel"),
            long_cell(found, LONG_CAPACITY, scheme, "max_length_loads"),
            long_cell(found, LONG_TIMING, scheme, "gen_tok_s", context=32768),
            long_cell(found, LONG_TIMING, scheme, "gen_tok_s", context=131072),
            long_cell(found, LONG_TIMING, scheme, "gen_tok_s_long_buffer", context=4096),
        ]
        for scheme in LONG
    ]
    header = [
        "KV cache",
        "longest max_length that loads",
        "decode tok/s @ 32k",
        "@ 128k",
        "@ 4k, max_length 262,144",
    ]
    return common.markdown_table(header, body)


QUALITY_METRICS = ("bits_per_weight", "ppl", "kl", "seconds", "peak_rss_gb")


def quality_tokens(found: list[rows.Row]) -> int:
    return pick(found, QUALITY[0], "ours", "ppl").params["eval_tokens"]


def decode_runs(found: list[rows.Row]) -> str:
    """How many runs the decode lines' medians are of: "5" or "3-5"."""
    counts = sorted({r.runs for line in DECODE if (r := pick(found, line, line.ours, "gen_tok_s"))})
    return f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])


PER_BYTE_DIGITS = {"mb": 1, "ppl": 3, "kl": 4, "top1": 3}  # decimals shown


def per_byte_table(found: list[rows.Row]) -> str:
    body = []
    for source, name, label in PER_BYTE:
        line, tool = Line(source, "smollm2-135m-bed", name), name.split("-")[0]
        cell = {m: pick(found, line, "ours" if tool != "llama.cpp" else tool, m)
                for m in ("mb", "ppl", "kl", "top1")}  # fmt: skip
        body.append([label, *(f"{cell[m].value:.{d}f}" for m, d in PER_BYTE_DIGITS.items())])
    return common.markdown_table(["model", "MB", "perplexity", "KL to fp32", "top-1"], body)


def headline(found: list[rows.Row]) -> str:
    return (
        "Export: wall time and peak RSS of the whole process tree.\n\n"
        f"{export_table(found)}\n\n"
        "Decode: greedy, batch 1, 128 new tokens after a 128-token prompt, median of "
        f"{decode_runs(found)} runs\n"
        "alternating with the builder's; the bound is memory bandwidth / bytes a step reads.\n\n"
        f"{decode_table(found)}\n\n"
        "Quality per byte: SmolLM2-135M moved off its Q4_1 grid, llama.cpp's mixes (built from\n"
        "source, dequantized) beside our presets, 2048 tokens each of prose and code, the same 8\n"
        "calibration sequences for GPTAQ and llama-imatrix unless said; 2-core CPU\n"
        "([more](docs/quality-per-byte.md)).\n\n"
        f"{per_byte_table(found)}\n"
    )


def highlights(found: list[rows.Row]) -> list[str]:
    """docs/benchmarks.md's first section: calibrated int4 and long context at a glance."""
    return [
        "## At a glance",
        "",
        "Calibrated int4 on real weights (SmolLM2-135M-Instruct, 2-core CPU, int4 lm_head):",
        f"perplexity on {quality_tokens(found)} tokens of held-out prose and as many of code, KL "
        "to the fp32 build per token ([more](quantization.md)).",
        "",
        quality_table(found),
        "",
        "Long context, 7B int4 on one H200 (7B shapes with InternLM2.5-7B-Chat-1M's rotary",
        "settings), ours / the builder with CUDA graph on, same KV scheme and scales; decode",
        "medians of alternating runs ([more](long-context.md)).",
        "",
        long_table(found),
    ]


def readme_block(text: str) -> str:
    match = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    if not match:
        raise SystemExit(f"README.md has no {START} ... {END} block")
    return match.group(1)


def readme_is_current(found: list[rows.Row] | None = None) -> bool:
    return readme_block(README.read_text()) == headline(found or rows.read_all())


def write_headline(found: list[rows.Row] | None = None) -> Path:
    text = README.read_text()
    block = headline(found or rows.read_all())
    text = text.replace(f"{START}\n{readme_block(text)}{END}", f"{START}\n{block}{END}")
    README.write_text(text)
    return README


# --- docs/benchmarks.md: every row, by suite --------------------------------------------------


def pivot(found: list[rows.Row]) -> tuple[list[str], list[list[str]]]:
    """One line per measured thing (model, variant, tool, params, machine, source), one column
    per metric: the long rows read as a table."""
    metrics = list(dict.fromkeys(r.metric for r in found))
    lines: dict[tuple, dict[str, str]] = {}
    for r in found:
        params = ", ".join(f"{k} {v}" for k, v in r.params.items() if k in ("prompt", "gen"))
        key = (r.model, r.variant, r.tool, params, r.machine, r.date[:10], r.source)
        cell = rows.number(r.value) + (f" ({rows.spread(r)})" if r.runs > 1 else "")
        lines.setdefault(key, {})[r.metric] = cell
    header = ["model", "variant", "tool", "settings", *metrics, "machine", "date", "source"]
    body = [
        [*key[:4], *(cells.get(m, "") for m in metrics), *key[4:6], source_link(key[6])]
        for key, cells in lines.items()
    ]
    return header, body


def source_link(name: str) -> str:
    for folder in (common.RESULTS, common.RESULTS / "archive", rows.ROWS):
        if (folder / name).exists():
            return f"[{name}](../{(folder / name).relative_to(common.REPO).as_posix()})"
    return name


def machines(found: list[rows.Row]) -> list[str]:
    """Each machine once, with every set of versions its rows ran with."""
    described: dict[str, str] = {}
    versions: dict[str, list[str]] = {}
    for r in found:
        described.setdefault(
            r.machine, f"- {r.machine}: {r.cpu}, {r.memory_gb} GB; {r.gpu or 'no GPU'}"
        )
        line = "  - " + ", ".join(f"{k} {v}" for k, v in r.versions.items())
        if line not in versions.setdefault(r.machine, []):
            versions[r.machine].append(line)
    return [text for name, head in described.items() for text in (head, *versions[name])]


def page(found: list[rows.Row]) -> str:
    out = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks report` from the result rows in "
        "[benchmarks/results/rows/](../benchmarks/results/rows/) (do not edit by hand). Each "
        "value is a median, with the spread of its runs in brackets; `source` is the file it was "
        "measured into. How to run the suites: [benchmarks/README.md](../benchmarks/README.md); "
        "what the numbers mean: the [lab notes](lab-notes/README.md).",
        "",
        "![export](../benchmarks/results/plots/export.png)",
        "![decode](../benchmarks/results/plots/decode.png)",
        "",
        *highlights(found),
        "",
        "Machines and versions:",
        "",
        *machines(found),
    ]
    for suite in dict.fromkeys(r.suite for r in found):
        header, body = pivot([r for r in found if r.suite == suite])
        out += ["", f"## {suite}", "", common.markdown_table(header, body)]
    return "\n".join(out) + "\n"


def plots(found: list[rows.Row]) -> list[Path]:
    """Bar charts of the headline lines (matplotlib, if installed)."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []
    labels = [what(line, None).split(" | ")[0] + f" {line.variant.split()[1]}" for line in EXPORT]
    for metric, title in (("seconds", "export seconds"), ("peak_rss_gb", "export peak RSS, GB")):
        series = {
            tool: [getattr(pick(found, line, tool, metric), "value", None) for line in EXPORT]
            for tool in ("ours", "builder")
        }
        path = PLOTS / ("export.png" if metric == "seconds" else "export-peak.png")
        if common.try_plot(path, title, labels, series):
            made.append(path)
    labels = [what(line, None).split(" | ")[0] + f" {line.variant.split()[1]}" for line in DECODE]
    series = {
        side: [
            getattr(pick(found, line, getattr(line, side), "gen_tok_s"), "value", None)
            for line in DECODE
        ]
        for side in ("ours", "builder")
    }
    if common.try_plot(PLOTS / "decode.png", "decode tok/s", labels, series):
        made.append(PLOTS / "decode.png")
    return made


def write_report() -> list[Path]:
    found = rows.read_all()
    PAGE.write_text(page(found))
    return [PAGE, *plots(found)]
