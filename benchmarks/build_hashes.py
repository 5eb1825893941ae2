"""Same bytes: build a tiny synthetic checkpoint at every precision, algorithm and KV-cache
kind, and print a sha256 per output file, so a refactor can be checked against the list
made before it (`diff` the two files).

    python -m benchmarks.build_hashes WORKDIR > hashes.txt

Builds run through the CLI entry point (`internlm2_graph.cli.main`), in this process, one
after another. CUDA builds are included where they build without a GPU (calibration then runs
on numpy, as compute.for_execution_provider decides).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

CALIBRATION_TEXT = (
    "The quick brown fox jumps over the lazy dog. A calibration file is plain text like the "
    "prompts the model will see: questions, answers, code and prose.\n\n"
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
) * 40

# name -> (precision, execution provider, extra options); "{data}" is the small text file.
BUILDS = {
    "cpu-fp32": ("fp32", "cpu", []),
    "cpu-fp16": ("fp16", "cpu", []),
    "cpu-int4-rtn": ("int4", "cpu", []),
    "cpu-int4-rtn-asym-b16": ("int4", "cpu", ["is_symmetric=false", "block_size=16"]),
    "cpu-int4-gptq": ("int4", "cpu", ["algo_config=gptq"]),
    "cpu-int4-gptq-asym": ("int4", "cpu", ["algo_config=gptq", "is_symmetric=false"]),
    "cpu-int4-gptaq": ("int4", "cpu", ["algo_config=gptaq"]),
    "cpu-int4-awq": ("int4", "cpu", ["algo_config=awq"]),
    "cpu-int4-gptq-data": ("int4", "cpu", ["algo_config=gptq", "calibration_data={data}"]),
    "cpu-int4-gptaq-data": ("int4", "cpu", ["algo_config=gptaq", "calibration_data={data}"]),
    "cpu-int4-awq-data": ("int4", "cpu", ["algo_config=awq", "calibration_data={data}"]),
    "cpu-int4-awq-lmhead-float": ("int4", "cpu", ["algo_config=awq", "lm_head_precision=float"]),
    "cpu-int8-gptq": ("int8", "cpu", ["algo_config=gptq"]),
    "cpu-fp32-kv-int8": ("fp32", "cpu", ["kv_cache_quant_scheme=int8_per_channel"]),
    "cpu-fp32-kv-int4-tensor": ("fp32", "cpu", ["kv_cache_quant_scheme=int4_per_tensor"]),
    "cpu-int4-awq-kv-int8": (
        "int4", "cpu", ["algo_config=awq", "kv_cache_quant_scheme=int8_per_channel"]
    ),
    "cpu-int4-gptq-kv-int8-data": (
        "int4", "cpu",
        ["algo_config=gptq", "kv_cache_quant_scheme=int8_per_channel", "calibration_data={data}"],
    ),
    "cuda-fp16": ("fp16", "cuda", []),
    "cuda-bf16": ("bf16", "cuda", []),
    "cuda-int4-rtn": ("int4", "cuda", []),
    "cuda-int4-gptq": ("int4", "cuda", ["algo_config=gptq"]),
    "cuda-int4-gptaq": ("int4", "cuda", ["algo_config=gptaq"]),
    "cuda-int4-awq": ("int4", "cuda", ["algo_config=awq"]),
    "cuda-int4-gptq-data": ("int4", "cuda", ["algo_config=gptq", "calibration_data={data}"]),
    "cuda-int8-gptq": ("int8", "cuda", ["algo_config=gptq"]),
    "cuda-fp16-kv-int8": ("fp16", "cuda", ["kv_cache_quant_scheme=int8_per_channel"]),
    "cuda-fp16-kv-fp8": ("fp16", "cuda", ["kv_cache_quant_scheme=fp8_per_tensor"]),
}  # fmt: skip


def file_hashes(folder: Path) -> list[tuple[str, str]]:
    return [
        (str(path.relative_to(folder)), hashlib.sha256(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]


def main(argv: list[str] | None = None) -> int:
    from internlm2_graph import cli
    from internlm2_graph.synthetic.checkpoint import make_config, write_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--only", nargs="*", help="build names to run (default: all)")
    args = parser.parse_args(argv)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    checkpoint = write_checkpoint(work / "ckpt", make_config("tiny"), chat=True, seed=0)
    data = work / "calibration.txt"
    data.write_text(CALIBRATION_TEXT, encoding="utf-8")
    for path, digest in file_hashes(checkpoint):
        print(f"{digest}  ckpt/{path}")
    for name, (precision, provider, options) in BUILDS.items():
        if args.only and name not in args.only:
            continue
        out = work / name
        extra = [o.format(data=data) for o in options]
        argv = ["-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", provider, "-q"]
        start = time.perf_counter()
        rc = cli.main(argv + (["--extra_options", *extra] if extra else []))
        seconds = time.perf_counter() - start
        if rc != 0:
            print(f"{name}: exit {rc}")
            continue
        for path, digest in file_hashes(out):
            print(f"{digest}  {name}/{path}")
        print(f"# {name}: {seconds:.1f} s", file=sys.stderr)
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
