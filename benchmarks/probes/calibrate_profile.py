"""Where a calibrated build's time goes: a few full-size decoder layers, profiled.

    python -m benchmarks.probes.calibrate_profile [--size 7b] [--layers 2] [--algorithm gptaq]
        [--ep cuda] [--workdir DIR]

A synthetic checkpoint of the size's shapes with `--layers` decoder layers (streaming holds one
layer at a time, so a layer costs what it costs in the whole model) is calibrated as the build
does it (calibration.drivers.calibrated_weights: its device, its recipe's tokens, the default
text), under
timers. Prints the wall time of each layer and of the lm_head, then the wall time spent inside
each of the main steps (inclusive: gptq contains its column loop and packing; the main thread
only, so work in threads counts as the main thread waiting for it).

Finding (H200 with 16 cores, 2026-11-30; results/calibrate-profile-7b-h200.md): the searched
grid was 60% of a GPTAQ layer's time; with the grid search, attention's scores and softmax on
the GPU and the norms and SwiGLU in threads, a 7B GPTAQ layer went from 36.3 s to 20.9 s and
its lm_head from 47.7 s to 11.8 s.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, uninstalled
from benchmarks.calibrated_synthetic import synthetic_checkpoint  # noqa: E402
from fixtures import smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--algorithm", default="gptaq", choices=("gptq", "gptaq"))
    parser.add_argument("--ep", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=smollm2.DEFAULT_WORKDIR)
    args = parser.parse_args(argv)

    from internlm2_graph.calibration.compute import for_execution_provider
    from internlm2_graph.calibration.data import calibration_tokens
    from internlm2_graph.calibration.drivers import calibrated_weights
    from internlm2_graph.calibration.recipes import recipe_for
    from internlm2_graph.checkpoint import Checkpoint
    from internlm2_graph.config import InternLM2Config
    from internlm2_graph.precision import resolve_target
    from internlm2_graph.progress import Progress
    from internlm2_graph.tokenizer import prepare_tokenizer

    folder = synthetic_checkpoint(args.workdir, args.size, args.layers)
    config = InternLM2Config.from_dir(folder)
    options = {"algo_config": args.algorithm, "block_size": str(args.block)}
    target = resolve_target("int4", args.ep, options)
    budget = recipe_for(args.algorithm).tokens
    encode = prepare_tokenizer(folder, config.vocab_size).encode
    sequences = calibration_tokens(None, encode, config, budget)
    device = for_execution_provider(args.ep)
    print(f"{args.size} x {args.layers} layers, {args.algorithm}, {sum(map(len, sequences))} "
          f"tokens, products on {device.name}")  # fmt: skip

    marks = [time.perf_counter()]

    class Timed(Progress):
        """Prints each step's wall time as the build's progress reports it."""

        @contextlib.contextmanager
        def task(self, *_, **__):
            def update(item, index, total):
                marks.append(time.perf_counter())
                print(f"  {item.name}: {marks[-1] - marks[-2]:.1f} s", flush=True)

            yield update

    totals = instrument()
    with tempfile.TemporaryDirectory() as scratch:
        calibrated_weights(Checkpoint(folder), config, sequences, target, Path(scratch), Timed())
    print(f"total {time.perf_counter() - marks[0]:.1f} s")
    for label, (seconds, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"  {label:<28} {seconds:7.1f} s  {calls:5d} calls")


# Public steps, wrapped where they are looked up: a function in each module that calls it by
# name (imported names are the importing module's own), methods on their class.
STEPS = {
    "internlm2_graph.calibration.drivers": (
        "gptq",
        "factor_for",
        "float_aim_map",
        "float_aim_weight",
        "dequantize",
    ),
    "internlm2_graph.calibration.gptq": (
        "hessian_factor",
        "cholesky_inverse",
        "searched_grid",
        "from_codes",
    ),
    "internlm2_graph.calibration.forward": ("attention", "rmsnorm", "swiglu"),
    "internlm2_graph.quantize": ("from_codes",),
}
METHODS = {
    "internlm2_graph.calibration.compute.OnnxRuntime": (
        "linear",
        "gram",
        "matmul",
        "gptq_columns",
        "attention",
    ),
    "internlm2_graph.calibration.compute.Numpy": ("linear", "gram", "matmul", "attention"),
    "internlm2_graph.calibration.store.Calibrated": ("save",),
    "internlm2_graph.calibration.forward.LayerWeights": ("read",),
}


def instrument() -> dict:
    """Wrap the main steps with wall-time counters (outermost call per step, main thread)."""
    import importlib

    totals, depth = {}, {}
    main_thread = threading.main_thread()

    def wrap(label, f):
        @functools.wraps(f)
        def timed(*args, **kwargs):
            if threading.current_thread() is not main_thread or depth.get(label):
                return f(*args, **kwargs)
            depth[label] = 1
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                depth[label] = 0
                seconds, calls = totals.get(label, (0.0, 0))
                totals[label] = (seconds + time.perf_counter() - start, calls + 1)

        return timed

    for module_name, names in STEPS.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, wrap(name, getattr(module, name)))
    for path, names in METHODS.items():
        module_name, cls_name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), cls_name)
        for name in names:
            setattr(cls, name, wrap(f"{cls_name}.{name}", getattr(cls, name)))
    return totals


if __name__ == "__main__":
    main()
