"""Peak RSS: our build's peak memory against the targets, 1.8B < 2 GB (fp32, int4), 7B int4 < 4 GB.

    python -m benchmarks run export --param study=peak_rss cases=1.8b:fp32,1.8b:int4,7b:int4

Each build is a fresh `python -m internlm2_graph` process on a synthetic bf16 checkpoint (the
harness's, in --workdir); its peak RSS (whole process tree) comes from the kernel. Output
folders are deleted after each build. Rows: seconds and peak_rss_gb per case, the target and
whether it was met in params (a failed build stops the run).
"""

from __future__ import annotations

import shutil

from benchmarks import common, harness
from benchmarks.rows import Row

GB = 1e9
TARGETS_GB = {("1.8b", "fp32"): 2.0, ("1.8b", "int4"): 2.0, ("7b", "int4"): 4.0}
PARAMS = {"cases": "1.8b:fp32,1.8b:int4"}  # SIZE:PRECISION,...
SMOKE = {"cases": "tiny:int4"}


def run(ctx: harness.Context) -> list[Row]:
    out = []
    for case in ctx.param("cases", PARAMS["cases"]).split(","):
        size, precision = case.split(":")
        out += build(ctx, size, precision)
    return out


def build(ctx: harness.Context, size: str, precision: str) -> list[Row]:
    source = harness.synthetic_checkpoint(size, ctx.workdir)
    folder = ctx.workdir / f"{size}-{precision}-{ctx.ep}-peak"
    command = harness.our_command(source, folder, precision, ctx.ep)
    measured = common.run_measured(command, ctx.workdir / "logs" / f"{folder.name}.log")
    shutil.rmtree(folder, ignore_errors=True)
    if not measured.ok:
        raise RuntimeError(f"peak_rss {size} {precision}: {measured.status}; see {measured.log}")
    target = TARGETS_GB.get((size, precision))
    peak = measured.peak_rss_bytes / GB
    met = target is None or peak < target
    print(f"{size} {precision}: {measured.seconds:.0f} s, peak {peak:.2f} GB (target "
          f"{target or '-'} GB{'' if met else ': MISSED'})", flush=True)  # fmt: skip
    params = {"target_gb": target, "met": met}
    return [
        ctx.row(
            model=size,
            variant=f"{precision} {ctx.ep}",
            tool="ours",
            metric=metric,
            value=value,
            unit=unit,
            params=params,
        )
        for metric, value, unit in (("seconds", measured.seconds, "s"), ("peak_rss_gb", peak, "GB"))
    ]
