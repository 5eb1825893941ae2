"""Pre-quantized import: a 7B-shaped AWQ/GPTQ checkpoint to int4 on the CPU, time and peak RSS.

Goal (issue 22): a 7B AWQ checkpoint converts with `-p int4` in under a minute and under
1.5 GB peak memory on the 2-core CPU machine. Each format gets a synthetic 7B checkpoint with
random codes (synthetic.prequantized.write_random_prequantized: a layer per shard, bf16
embedding/norms/output), written once, then converted in a child process; wait4's rusage gives
its peak RSS and CPU seconds. With baseline=true, a bf16 7B checkpoint of the same shapes is
converted with plain round-to-nearest int4 in the same rounds (alternating), the float build
whose memory profile the import should keep. The box may be shared: the load average is
recorded before and after each run, and CPU seconds (user + sys) are load-independent.

    python -m benchmarks run export --repeat 3 --workdir DIR --param study=prequantized \
        formats=awq,gptq,compressed-tensors,gptq-act baseline=true

Rows per format: wall and CPU seconds, peak RSS, output size over the --repeat rounds; the load
average before and after each run in params.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.common import load_average, run_measured
from benchmarks.rows import Row, measured
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.synthetic.prequantized import write_random_prequantized

PARAMS = {"formats": "awq,gptq,compressed-tensors,gptq-act", "baseline": False, "keep": False}
SMOKE: dict = {}  # 7B-shaped: minutes and 15 GB of disk
FORMATS = {  # name -> (format, symmetric, act_order)
    "awq": ("awq", False, False),
    "gptq": ("gptq", True, False),
    "compressed-tensors": ("compressed-tensors", True, False),
    "gptq-act": ("gptq", False, True),  # desc_act: a real act-order g_idx
}


def measure(command: list[str], log: Path) -> dict:
    """One child: wall and CPU seconds, peak RSS (its rusage), load before and after."""
    before = load_average()
    m = run_measured(command, log)
    return {
        "returncode": m.returncode,
        "wall_s": m.seconds,
        "cpu_s": m.cpu_seconds,
        "peak_rss_gb": m.peak_rss_bytes / 1e9,
        "load_before": before,
        "load_after": load_average(),
        "log": m.log,
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


def run(ctx: harness.Context) -> list[Row]:
    args = harness.settings(ctx, PARAMS)
    workdir = ctx.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    names = [*args.formats.split(","), *(["baseline"] if args.baseline else [])]
    folders = {name: checkpoint(workdir, name) for name in names}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(ctx.repeat):
        for name in names:  # alternating: every format sees the same load pattern
            out = workdir / f"out-{name}"
            command = [sys.executable, "-m", "internlm2_graph", "-i", str(folders[name])]
            command += ["-o", str(out), "-p", "int4", "--overwrite", "-q"]
            result = measure(command, workdir / f"{name}-{round_}.log")
            if result["returncode"]:
                raise RuntimeError(f"{name}: exit {result['returncode']}; see {result['log']}")
            result["output_gb"] = sum(f.stat().st_size for f in out.rglob("*")) / 1e9
            runs[name].append(result)
            print(name, {k: v for k, v in result.items() if k != "log"}, flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    out = []
    for name, results in runs.items():
        loads = [[r["load_before"][0], r["load_after"][0]] for r in results]
        for metric, unit in (("wall_s", "s"), ("cpu_s", "s"), ("peak_rss_gb", "GB")):
            out.append(
                ctx.row(
                    model="7b",
                    variant=f"{name} -> int4 cpu",
                    tool="ours",
                    metric={"wall_s": "seconds"}.get(metric, metric),
                    unit=unit,
                    params={"loads": loads},
                    **measured([r[metric] for r in results]),
                )
            )
        size = results[0]["output_gb"]
        out.append(ctx.row(model="7b", variant=f"{name} -> int4 cpu", tool="ours",
                           metric="output_gb", value=size, unit="GB"))  # fmt: skip
    return out
