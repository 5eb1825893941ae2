"""What counting the attention mask costs a decode step, per way of counting it.

    python -m benchmarks.probes.mask_count [--ep cuda] [--lengths 4096,32768,131072,1048576]

GroupQueryAttention takes each row's length - 1 (seqlens_k), which the graph counts from the 2D
attention mask once per step. With CUDA graphs onnxruntime-genai keeps the mask as a static
[batch, max_length] int64 buffer, so the count reads max_length values at every step, whatever
the context. Three one-op-chain graphs, the mask already on the device (I/O binding), wall
microseconds per run (median of --runs), each checked against numpy's count:
- int64: ReduceSum of the int64 mask (the builder's graph, and ours before);
- float32: Cast to float32, then ReduceSum (ours; exact to 2**24 positions);
- int32: Cast to int32, then ReduceSum.

Finding (H200 and 2-core CPU, 2026-12-01; results/mask-count-h200.md, mask-count-cpu2.md):
onnxruntime's CUDA ReduceSum gives an int64 row one thread block: 148 us at 131k, 289 us at
262k, 1.0 ms at 1M, 5.1 ms at 4M, every step with a static mask; Cast to float32 first runs
`reduce_matrix_rows_kernel` (28-37 us of wall time per run at any length). On 2 CPU cores
float32 is 4-7x faster than int64. Ours counts in float32 since. The kernels suite re-measures it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, uninstalled
from benchmarks import common  # noqa: E402

WAYS = {"int64": None, "float32": TensorProto.FLOAT, "int32": TensorProto.INT32}


def counting_graph(cast_to: int | None) -> bytes:
    """mask [1, N] int64 -> seqlens_k [1] int32, counted in the mask's type or `cast_to`."""
    nodes, counted = [], "mask"
    if cast_to is not None:
        nodes.append(helper.make_node("Cast", ["mask"], ["cast"], to=cast_to))
        counted = "cast"
    kind = TensorProto.INT64 if cast_to is None else cast_to
    one = helper.make_tensor("one", kind, [], [1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes += [
        helper.make_node("ReduceSum", [counted, "axes"], ["sum"], keepdims=0),
        helper.make_node("Sub", ["sum", "one"], ["last"]),
        helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "mask_count",
        [helper.make_tensor_value_info("mask", TensorProto.INT64, [1, "N"])],
        [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1])],
        initializer=[one, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


def time_way(cast_to: int | None, mask: np.ndarray, ep: str, runs: int) -> tuple[float, int]:
    """(median wall microseconds per run, the count it returned)."""
    times, count = run_times(cast_to, mask, ep, runs)
    return statistics.median(times), count


def run_times(cast_to: int | None, mask: np.ndarray, ep: str, runs: int) -> tuple[list, int]:
    """(wall microseconds of each run, the count it returned)."""
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider"] if ep == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(counting_graph(cast_to), providers=providers)
    device = "cuda" if ep == "cuda" else "cpu"
    binding = session.io_binding()
    binding.bind_ortvalue_input("mask", ort.OrtValue.ortvalue_from_numpy(mask, device, 0))
    binding.bind_output("seqlens_k", device)
    for _ in range(10):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        times.append((time.perf_counter() - start) * 1e6)
    return times, int(binding.copy_outputs_to_cpu()[0][0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ep", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--lengths", default="4096,32768,131072,262144,1048576,4194304")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--machine", default=common.default_machine_name())
    args = parser.parse_args(argv)
    rows, results = [], {}
    for length in (int(n) for n in args.lengths.split(",")):
        mask = np.zeros((1, length), np.int64)
        filled = length - length // 3  # a static buffer: the context so far, then zeros
        mask[0, :filled] = 1
        row = {}
        for name, cast_to in WAYS.items():
            micros, count = time_way(cast_to, mask, args.ep, args.runs)
            if count != filled - 1:
                raise SystemExit(f"{name} at {length}: counted {count}, expected {filled - 1}")
            row[name] = micros
        results[length] = row
        rows.append([str(length)] + [f"{row[name]:.1f}" for name in WAYS])
        print(f"  {length}: " + ", ".join(f"{n} {v:.1f} us" for n, v in row.items()), flush=True)
    info = common.machine_info()
    table = common.markdown_table(["mask row length"] + [f"{n} us/run" for n in WAYS], rows)
    markdown = (
        f"# Counting the attention mask ({info.get('gpu') or info.get('cpu')}, {args.ep})\n\n"
        f"`python -m benchmarks.probes.mask_count --ep {args.ep}` (median of {args.runs} runs, "
        "wall time of a ReduceSum chain with I/O binding; every count checked)\n\n"
        f"{table}\n"
    )
    print(markdown)
    common.write_results(f"mask-count-{args.machine}", {"results": results, **info}, markdown)


if __name__ == "__main__":
    main()
