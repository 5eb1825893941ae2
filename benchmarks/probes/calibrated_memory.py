"""Peak memory of a calibrated build, layer by layer: is it the same for every layer?

    python -m benchmarks.probes.calibrated_memory [--size 7b] [--layers 2] [--algorithm gptaq]
        [--workdir DIR] [--machine NAME]

Calibration streams one decoder layer at a time, so a build's peak memory should not depend on
how many layers the model has: every layer costs the same, then the lm_head. This builds a
synthetic checkpoint of the size's shapes with `--layers` decoder layers (a 7B with 2 layers
takes minutes on 2 cores, with 32 hours) as int4 `-e cpu` with the algorithm, in a child
process, samples its resident memory every 0.1 s, and splits the samples by the build's own
progress lines: before calibration, each layer, the lm_head, writing the model. If each layer's
peak is the same, the full model's peak is the largest of these.
Results: benchmarks/results/calibrated-memory-<size>-<algorithm>-<machine>.{json,md}.

Finding (2-core CPU, 2026-11-30; results/calibrated-memory-7b-gptaq-cpu2.md): a GPTAQ layer of
7B shapes peaks at 5.19-5.20 GB and the lm_head at 1.97 GB, the same for every layer, so a
32-layer build peaks there too (6.22 GB before the in-place Gram permutation, the borrowed
ridge diagonal and the block-wise Cholesky inverse).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, uninstalled
from benchmarks import common  # noqa: E402
from benchmarks.calibrated_synthetic import synthetic_checkpoint  # noqa: E402
from fixtures import smollm2  # noqa: E402

GB = 1e9
STEP = re.compile(r"calibrating \(\w+\): (\d+)/(\d+) layers")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--algorithm", default="gptaq")
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=smollm2.DEFAULT_WORKDIR)
    parser.add_argument("--machine", default=common.default_machine_name())
    args = parser.parse_args(argv)

    source = synthetic_checkpoint(args.workdir, args.size, args.layers)
    out = args.workdir / f"calibrated-memory-{args.size}-{args.algorithm}"
    options = [f"algo_config={args.algorithm}", f"block_size={args.block}", "accuracy_level=0"]
    command = [sys.executable, "-m", "internlm2_graph", "-i", str(source), "-o", str(out),
               "-p", "int4", "-e", "cpu", "--overwrite", "--extra_options", *options]  # fmt: skip
    phase = ["reading, tokenizing, layer 0"]
    peaks: dict[str, int] = {}
    start = time.perf_counter()
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=common.REPO)

    def sample() -> None:
        while child.poll() is None:
            peaks[phase[0]] = max(peaks.get(phase[0], 0), common.tree_rss(child.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in child.stderr:
        lines.append(line)
        hit = STEP.search(line)
        if hit:
            done, total = int(hit[1]), int(hit[2])
            print(line.rstrip(), flush=True)
            # Line "d/N" ends step d - 1: layer d comes next, or the lm_head, or the writing.
            last = done == total
            phase[0] = (
                "writing the model" if last else "lm_head" if done == total - 1 else f"layer {done}"
            )
    child.wait()
    sampler.join()
    seconds = time.perf_counter() - start
    if child.returncode:
        raise SystemExit("build failed:\n" + "".join(lines[-20:]))
    rows = [[name, f"{rss / GB:.2f}"] for name, rss in peaks.items()]
    peak = max(peaks.values())
    print(f"{args.size} x {args.layers} {args.algorithm}: {seconds:.0f} s, {peak / GB:.2f} GB")
    info = common.machine_info()
    markdown = (
        f"# Peak memory of a calibrated build, by step: {args.size} shapes, {args.layers} layers, "
        f"{args.algorithm}\n\n{info['cpu']}, {info['cpu_count']} cores; "
        f"`python -m benchmarks.probes.calibrated_memory --size {args.size} --layers {args.layers} "
        f"--algorithm {args.algorithm}`; int4 block {args.block} symmetric, -e cpu; "
        "resident memory sampled every 0.1 s.\n\n"
        + common.markdown_table(["step", "peak RSS GB"], rows)
        + f"\n\nWhole build: {seconds:.0f} s, peak {peak / GB:.2f} GB.\n"
    )
    name = f"calibrated-memory-{args.size}-{args.algorithm}-{args.machine}"
    common.write_results(name, {"peaks": peaks, "seconds": seconds, **info}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
