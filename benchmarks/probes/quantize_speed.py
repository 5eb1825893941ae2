"""How fast is MatMulNBits quantization, numpy port vs onnxruntime's C++ kernel?

    python benchmarks/probes/quantize_speed.py [--repeats 5]

Shapes are InternLM2-1.8B's largest: the MLP down projection (2048 x 8192) and the lm head
(92544 x 2048), HF layout [out, in]. Methods:

- ``ort kernel, whole W.T copy``: what ORT's MatMulNBitsQuantizer amounts to from HF layout, a
  contiguous float32 [K, N] copy of the weight, then one kernel call.
- ``ort kernel, chunked`` (``quantize_ort``): transposes and quantizes a chunk of rows at a time.
- ``ort kernel only``: the kernel on an already-transposed copy, for the kernel's own speed.
- ``numpy, 1 thread`` / ``numpy, N threads`` (``quantize``): the chunked numpy port.

Reported: median and min wall time over --repeats runs (taken round-robin across the methods, so
load from other processes hits them alike), process CPU time / wall (how many cores were busy),
and the peak of Python-visible allocations during one extra run (tracemalloc; numpy arrays are
tracked, the C++ kernel's small internal buffers are not) minus the output size.

Finding (2-core CPU, 2026-11-24): the chunked numpy port is 2-3x faster than onnxruntime's
C++ kernel from the HF layout, because the kernel wants a contiguous [K, N] float32 copy of the
weight and making it costs more than the quantization itself (internlm2_graph/quantize.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, uninstalled
import internlm2_graph.quantize as quant  # noqa: E402
from internlm2_graph.quantize import QuantizedWeight, QuantSpec, quantize, quantize_ort  # noqa: E402

MiB = 1 << 20


def machine() -> str:
    model = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or model
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f", {kib / (1 << 20):.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return (
        f"{model}, {cores} usable cores{mem}; {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, "
        f"onnxruntime {onnxruntime.__version__}"
    )


def ort_whole_transpose(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """One full-size contiguous float32 W.T, then one kernel call (chunk size = all rows)."""
    saved = quant.CHUNK_ELEMENTS
    quant.CHUNK_ELEMENTS = w.size  # one chunk: quantize_ort makes exactly one transposed copy
    try:
        return quantize_ort(w, spec)
    finally:
        quant.CHUNK_ELEMENTS = saved


def kernel_only(w_t: np.ndarray, spec: QuantSpec) -> Callable[[], object]:
    """The C++ kernel alone on a prepared contiguous [K, N] float32 array."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w_t.shape
    empty = quant._empty_outputs(n, k, spec)
    zp = empty.zero_points if empty.zero_points is not None else np.zeros((n, 1), np.uint8)
    kernel = quantize_matmul_4bits if spec.bits == 4 else quantize_matmul_8bits
    return lambda: kernel(
        empty.packed, w_t, empty.scales, zp, spec.block_size, n, k, spec.symmetric
    )


def numpy_threads(threads: int) -> Callable[[np.ndarray, QuantSpec], QuantizedWeight]:
    def run(w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        saved = quant.num_threads
        quant.num_threads = lambda: threads
        try:
            return quantize(w, spec)
        finally:
            quant.num_threads = saved

    return run


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds / wall): the ratio shows how many cores were busy."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    return wall, (time.process_time() - cpu0) / wall


def peak_traced(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(cases: list[tuple[str, str, Callable[[], object]]], repeats: int) -> list[dict]:
    """Round-robin over the cases, so load from other processes hits them all alike."""
    samples: list[list[tuple[float, float]]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (_, _, fn) in enumerate(cases):
            samples[i].append(timed(fn))
    return [
        {
            "median": statistics.median(wall for wall, _ in runs),
            "min": min(wall for wall, _ in runs),
            "cpu": statistics.median(ratio for _, ratio in runs),
            "peak": peak_traced(fn),
        }
        for runs, (_, _, fn) in zip(samples, cases, strict=True)
    ]


def bench_shape(n: int, k: int, spec: QuantSpec, repeats: int, full: bool) -> None:
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((n, k), np.float32)
    w16 = w32.astype(ml_dtypes.bfloat16)
    ref = quantize(w32, spec)
    out_bytes = sum(a.nbytes for a in (ref.packed, ref.scales, ref.zero_points) if a is not None)
    threads = quant.num_threads()
    print(
        f"\n{n} x {k} ({n * k / 1e6:.1f} M weights, float32 {w32.nbytes / MiB:.0f} MiB), "
        f"int{spec.bits} block {spec.block_size} {'sym' if spec.symmetric else 'asym'}; "
        f"output {out_bytes / MiB:.1f} MiB"
    )
    print(f"  {'method':<34} {'input':<6} {'median s':>9} {'min s':>7} {'cpu/wall':>8} "
          f"{'peak extra MiB':>14}")  # fmt: skip
    cases: list[tuple[str, str, Callable[[], object]]] = []
    if full:
        cases.append(("ort kernel, whole W.T copy", "fp32", lambda: ort_whole_transpose(w32, spec)))
        w_t = np.ascontiguousarray(w32.T)
        # Its outputs are allocated up front, outside the measurement: "extra" is all it adds.
        cases.append(("ort kernel only (W.T prepared)", "fp32*", kernel_only(w_t, spec)))
    cases += [
        ("ort kernel, chunked (quantize_ort)", "fp32", lambda: quantize_ort(w32, spec)),
        ("numpy, 1 thread", "fp32", lambda: numpy_threads(1)(w32, spec)),
        (f"numpy, {threads} threads (quantize)", "fp32", lambda: quantize(w32, spec)),
    ]
    if full:
        cases += [
            ("ort kernel, chunked (quantize_ort)", "bf16", lambda: quantize_ort(w16, spec)),
            (f"numpy, {threads} threads (quantize)", "bf16", lambda: quantize(w16, spec)),
        ]
    for (name, dtype, _), r in zip(cases, measure(cases, repeats), strict=True):
        extra = (r["peak"] - (0 if dtype.endswith("*") else out_bytes)) / MiB
        print(f"  {name:<34} {dtype:<6} {r['median']:>9.3f} {r['min']:>7.3f} {r['cpu']:>8.2f} "
              f"{extra:>14.1f}")  # fmt: skip
    if full:
        del w_t
    # The numbers above only count if both paths produce the same codes.
    theirs = quantize_ort(w32, spec)
    same = np.array_equal(ref.packed, theirs.packed) and np.array_equal(ref.scales, theirs.scales)
    print(f"  numpy and ort outputs identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    # Other work on the box skews wall times: cpu/wall below the thread count shows it.
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"numpy path threads: {quant.num_threads()}; ORT kernel: own pool, one per core")
    default = QuantSpec(bits=4, block_size=32)
    for n, k in [(2048, 8192), (92544, 2048)]:
        bench_shape(n, k, default, args.repeats, full=True)
    for spec in (QuantSpec(bits=8, block_size=32), QuantSpec(bits=4, symmetric=False)):
        bench_shape(2048, 8192, spec, args.repeats, full=False)
    print("\nload average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
