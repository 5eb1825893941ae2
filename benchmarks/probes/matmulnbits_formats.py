"""What each MatMulNBits format costs a decode step on the CPU: one node, one token, timed.

    python -m benchmarks.probes.matmulnbits_formats [--shapes 576x49152,576x1536,1536x576]
        [--threads 2] [--accuracy-level 4]

One com.microsoft MatMulNBits node (random codes, scales and zero points: the kernel's time
does not depend on the values) per shape K x N and format, run by onnxruntime's CPU provider
on a [1, K] input: the median of 7 rounds of 50 runs, after 20 warm-up runs. The shapes are
SmolLM2-135M's (the bed of docs/quality-per-byte.md): the tied head, wqkv, w1/w3, wo, w2.
Prints microseconds and the bytes the node reads (codes, scales, zero points).

Finding (VM: 2-core AMD EPYC, AVX2, 2 threads, accuracy_level 4, onnxruntime 1.32, quiet,
2026-12-08): the 49152 x 576 tied head is the one big difference: int8 b64 2.69 ms (30.1 MB)
against int4 b32 sym 1.83 ms (17.7 MB), +0.86 ms a token, half of `q4_mixed`'s 1.66 ms gap to
plain int4 b32 (12.72 against 11.06 ms a token in the decode suite). Asymmetric int4 costs 2-8%
more than symmetric on the body's shapes (576 x 1536: 80.0 against 85.5 us; 1536 x 576: 80.2
against 86.2 us); int8 b64 7-15% more than int4 b32 sym (576 x 1536: 91.8 us).
"""

from __future__ import annotations

import argparse
import time

FORMATS = [  # bits, block, asymmetric
    (4, 32, False),
    (4, 32, True),
    (4, 64, False),
    (4, 64, True),
    (8, 64, False),
    (8, 128, False),
]


def node_model(k: int, n: int, bits: int, block: int, asym: bool, level: int) -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    blocks, rng = -(-k // block), np.random.default_rng(0)
    inputs = [
        numpy_helper.from_array(
            rng.integers(0, 256, (n, blocks, block * bits // 8), np.uint8), "B"
        ),
        numpy_helper.from_array((rng.random(n * blocks) * 0.01 + 1e-3).astype(np.float32), "S"),
    ]
    if asym:
        zp = rng.integers(0, 256, n * -(-blocks * bits // 8), np.uint8)
        inputs.append(numpy_helper.from_array(zp, "Z"))
    node = helper.make_node("MatMulNBits", ["A", *(i.name for i in inputs)], ["Y"],
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                            accuracy_level=level)  # fmt: skip
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inputs,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def read_bytes(k: int, n: int, bits: int, block: int, asym: bool) -> int:
    blocks = -(-k // block)
    return n * blocks * (block * bits // 8 + 4) + (n * -(-blocks * bits // 8) if asym else 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="576x49152,576x960,576x1536,576x576,1536x576")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-level", type=int, default=4)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        x = np.random.default_rng(1).random((1, k), np.float32)
        for bits, block, asym in FORMATS:
            model = node_model(k, n, bits, block, asym, args.accuracy_level)
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            for _ in range(20):
                session.run(None, {"A": x})
            rounds = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(50):
                    session.run(None, {"A": x})
                rounds.append((time.perf_counter() - start) / 50 * 1e6)
            size = read_bytes(k, n, bits, block, asym) / 1e6
            name = f"int{bits} b{block} {'asym' if asym else 'sym'}"
            low, high = min(rounds), max(rounds)
            print(f"{k}x{n} {name:14s} {np.median(rounds):8.1f} us "
                  f"(range {low:.1f}-{high:.1f})  {size:6.2f} MB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
