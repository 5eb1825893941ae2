"""GPTQ of one weight, numpy against onnxruntime (calibration/compute.py): seconds per step,
and agreement.

    python -m benchmarks.probes.gptq_device [--provider CUDAExecutionProvider] [--shapes 4096x14336]
        [--tokens 8192] [--block 32]

For each K x N (input x output channels, a 7B's w1 is 4096x14336, its w2 14336x4096): random
correlated inputs [tokens, K] and weights; the Gram matrix, the Hessian factor (act_order) and
GPTQ with the searched grid, each timed on numpy and on the provider; then how many codes
agree and the output error of each, against round-to-nearest's. Prints one line per step.

Finding (H200, 2026-11-30; results/archive/h200-2026-11-30c/gptq_device.log): GPTQ
of one w1 (4096x14336, 8192 tokens) takes 6.6 s in numpy and 4.0 s with the column loop on the
GPU; the rest of a layer is the threaded grid search on the CPU. Threading the column loop on
the CPU instead made the 7B slower (43 s a layer against 28 s: small numpy operations fighting
over the GIL), so it stays single-threaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, uninstalled
from internlm2_graph.calibration import compute  # noqa: E402
from internlm2_graph.calibration import gptq as cal  # noqa: E402
from internlm2_graph.precision import QuantSpec  # noqa: E402
from internlm2_graph.quantize import dequantize, quantize  # noqa: E402


def inputs(tokens: int, k: int, seed: int = 0) -> np.ndarray:
    """Correlated channels and a few large ones, as activations have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    x += np.roll(x, 1, axis=1) * np.float32(0.5)
    x[:, rng.choice(k, k // 16, replace=False)] *= 8
    return x


def timed(f, *args, **kwargs):
    start = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - start


def one_shape(k: int, n: int, devices: list, spec: QuantSpec, tokens: int) -> None:
    x = inputs(tokens, k)
    weight = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32)
    restored = {}
    for device in devices:
        gram, t_gram = timed(device.gram, x)
        order = cal.act_order(gram)
        factor, t_factor = timed(cal.hessian_factor, gram, order=order, device=device)
        importance = np.diagonal(gram).copy()
        q, t_gptq = timed(cal.gptq, weight, factor, spec, order, importance, device=device)
        restored[device.name] = dequantize(q)
        print(f"{k}x{n} {device.name:12s} gram {t_gram:6.2f} s  factor {t_factor:6.2f} s  "
              f"gptq {t_gptq:6.2f} s", flush=True)  # fmt: skip
    sample = x[:: max(1, tokens // 1024)]

    def output_error(w):
        return float(np.linalg.norm(sample @ (w - weight).T))

    rtn = output_error(dequantize(quantize(weight, spec)))
    line = f"{k}x{n} output error / RTN's:"
    for name, w in restored.items():
        line += f" {name} {output_error(w) / rtn:.4f}"
    if len(restored) == 2:
        a, b = restored.values()
        line += f"; codes agreeing {np.mean(a == b):.4%}"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider", default="CUDAExecutionProvider")
    parser.add_argument("--shapes", default="4096x14336")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--skip-numpy", action="store_true", help="time the provider only")
    args = parser.parse_args(argv)

    spec = QuantSpec(bits=4, block_size=args.block, symmetric=True)
    devices = [compute.OnnxRuntime(args.provider)]
    if not args.skip_numpy:
        devices.insert(0, compute.NUMPY)
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        one_shape(k, n, devices, spec, args.tokens)


if __name__ == "__main__":
    main()
