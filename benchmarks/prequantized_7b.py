"""Importing a 7B-shaped pre-quantized checkpoint on the CPU: wall time, CPU time, peak RSS.

Goal (issue 22): a 7B AWQ checkpoint converts with `-p int4` in under a minute and under
1.5 GB peak memory on the 2-core CPU machine. Each format gets a synthetic 7B checkpoint with
random codes (synthetic.prequantized.write_random_prequantized: a layer per shard, bf16
embedding/norms/output), written once, then converted in a child process; wait4's rusage gives
its peak RSS and CPU seconds. With --baseline, a bf16 7B checkpoint of the same shapes is
converted with plain round-to-nearest int4 in the same rounds (alternating), the float build
whose memory profile the import should keep. The box may be shared: the load average is
recorded before and after each run, and CPU seconds (user + sys) are load-independent.

    python -m benchmarks.prequantized_7b [--formats awq gptq compressed-tensors gptq-act]
        [--rounds 1] [--baseline] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    load_average,
    machine_info,
    markdown_table,
    median,
    write_results,
)
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.synthetic.prequantized import write_random_prequantized

DEFAULT_WORKDIR = Path("/tmp/internlm2-bench/prequantized-7b")
FORMATS = {  # name -> (format, symmetric, act_order)
    "awq": ("awq", False, False),
    "gptq": ("gptq", True, False),
    "compressed-tensors": ("compressed-tensors", True, False),
    "gptq-act": ("gptq", False, True),  # desc_act: a real act-order g_idx
}


def measure(command: list[str], log: Path) -> dict:
    """One child: wall and CPU seconds, peak RSS (its rusage), load before and after."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = load_average()
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "wall_s": seconds,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "load_before": before,
        "load_after": load_average(),
        "log": str(log),
    }


def checkpoint(workdir: Path, name: str) -> Path:
    folder = workdir / f"ckpt-{name}"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    if name == "baseline":
        write_checkpoint(folder, make_config("7b"), seed=0)
    else:
        fmt, symmetric, act_order = FORMATS[name]
        write_random_prequantized(folder, make_config("7b"), fmt, 128, symmetric, act_order)
    print(f"{name}: checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", action="store_true", help="also RTN int4 from bf16")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--name", default="prequantized-7b-cpu2")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    names = [*args.formats, *(["baseline"] if args.baseline else [])]
    folders = {name: checkpoint(args.workdir, name) for name in names}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:  # alternating: every format sees the same load pattern
            out = args.workdir / f"out-{name}"
            command = [sys.executable, "-m", "internlm2_graph", "-i", str(folders[name])]
            command += ["-o", str(out), "-p", "int4", "--overwrite", "-q"]
            result = measure(command, args.workdir / f"{name}-{round_}.log")
            result["output_gb"] = sum(f.stat().st_size for f in out.rglob("*")) / 1e9
            runs[name].append(result)
            print(name, {k: v for k, v in result.items() if k != "log"}, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    rows = []
    for name, results in runs.items():
        ok = [r for r in results if r["returncode"] == 0]
        walls = [r["wall_s"] for r in ok]
        rows.append(
            [
                name,
                f"{median(walls):.1f}" if ok else "failed",
                f"{min(walls):.1f}-{max(walls):.1f}" if ok else "",
                f"{median([r['cpu_s'] for r in ok]):.1f}" if ok else "",
                f"{max(r['peak_rss_gb'] for r in ok):.2f}" if ok else "",
                f"{ok[0]['output_gb']:.2f}" if ok else "",
                " / ".join(f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}" for r in results),
            ]
        )
    table = markdown_table(
        ["checkpoint", "wall s (median)", "wall range", "CPU s", "peak RSS GB", "out GB", "load"],
        rows,
    )
    markdown = (
        f"7B-shaped pre-quantized checkpoints -> int4 cpu, {args.rounds} round(s), "
        f"alternating; machine: {machine_info()}\n\n{table}\n\n"
        "CPU s = user + sys of the converting process (threads included); load = 1-minute "
        "load average before -> after each run (the box is shared).\n"
    )
    path = write_results(args.name, {"runs": runs, "machine": machine_info()}, markdown)
    print(markdown)
    print(path)


if __name__ == "__main__":
    main()
