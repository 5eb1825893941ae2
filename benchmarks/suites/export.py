"""Export: wall time, peak RSS of the build's process tree and output size, per precision and tool.

Each build runs in its own process (peak RSS from wait4: the whole tree); tools alternate
order between repeats. The builder (`--tools ours,builder`, needs the `bench` extra) reads a
Llama-layout copy of the same checkpoint. Several sizes at once, with the builder's memory
limit, disk checks and estimates of builds too large to run: study=sizes (benchmarks/export.py).
"""

from __future__ import annotations

import shutil

from benchmarks import common, harness
from benchmarks.rows import measured

PARAMS = {"options": ""}  # --extra_options for both tools, space separated
SMOKE: dict = {}
STUDIES = {  # name: module of benchmarks/
    "sizes": "export",
    "peak_rss": "peak_rss",
    "prequantized": "prequantized_7b",
}
GB = 1e9


def run(ctx: harness.Context) -> list:
    options = tuple(ctx.param("options", "").split())
    results: dict[tuple[str, str], list[common.Measured]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for rep in range(ctx.repeat):
        for precision in ctx.precisions:
            for tool in ctx.tools if rep % 2 == 0 else ctx.tools[::-1]:
                out = ctx.workdir / "export" / f"{tool}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                source = ctx.checkpoint if tool == "ours" else ctx.llama_copy()
                make = harness.our_command if tool == "ours" else harness.builder_command
                m = common.run_measured(
                    make(source, out, precision, ctx.ep, options),
                    ctx.workdir / "logs" / f"export-{tool}-{precision}-{rep}.log",
                    env={"HF_HUB_OFFLINE": "1"},
                )
                if not m.ok:
                    raise RuntimeError(f"export {tool} {precision}: {m.status}; see {m.log}")
                results.setdefault((tool, precision), []).append(m)
                sizes[tool, precision] = common.folder_bytes(out)
                shutil.rmtree(out, ignore_errors=True)
    out = []
    for (tool, precision), runs in results.items():
        variant, params = f"{precision} {ctx.ep}", {"options": list(options)}
        for metric, unit, values in (
            ("seconds", "s", [m.seconds for m in runs]),
            ("peak_rss_gb", "GB", [m.peak_rss_bytes / GB for m in runs]),
        ):
            out.append(
                ctx.row(
                    variant=variant,
                    tool=tool,
                    metric=metric,
                    unit=unit,
                    params=params,
                    **measured(values),
                )
            )
        out.append(
            ctx.row(
                variant=variant,
                tool=tool,
                metric="output_gb",
                unit="GB",
                value=sizes[tool, precision] / GB,
                params=params,
            )
        )
    return out
