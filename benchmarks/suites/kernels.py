"""Kernels: single operations a decode step runs, timed alone on the device.

Today: counting the attention mask for GroupQueryAttention's seqlens_k (int64 ReduceSum, as the
builder's graph does, against ours: Cast to float32 first), with the mask already on the device,
at mask rows up to 1M (benchmarks/probes/mask_count.py has the why). A CUPTI trace of a whole decode
step (torch on CUDA) is this suite's study=kernel_profile.
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness
from benchmarks.probes import mask_count
from benchmarks.rows import measured

PARAMS = {"lengths": "4096,32768,131072,1048576", "runs": 200}
SMOKE = {"lengths": "4096", "runs": 20}
STUDIES = {"kernel_profile": "kernel_profile"}


def run(ctx: harness.Context) -> list:
    out = []
    for length in (int(n) for n in ctx.param("lengths", PARAMS["lengths"]).split(",")):
        mask = np.zeros((1, length), np.int64)
        filled = length - length // 3  # a static buffer: the context so far, then zeros
        mask[0, :filled] = 1
        for way in ("int64", "float32"):
            times, count = mask_count.run_times(
                mask_count.WAYS[way], mask, ctx.ep, ctx.param("runs", 200)
            )
            if count != filled - 1:
                raise RuntimeError(f"mask count {way} at {length}: {count}, not {filled - 1}")
            tool = "ours" if way == "float32" else "builder"
            out.append(
                ctx.row(
                    model="-",
                    variant=f"mask count {length} {ctx.ep}",
                    tool=tool,
                    metric="us_per_run",
                    unit="us",
                    params={"way": way},
                    **measured(times),
                )
            )
    return out
