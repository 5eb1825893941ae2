"""Peak memory of our build, against the targets: 1.8B < 2 GB (fp32 and int4), 7B int4 < 4 GB.

    python -m benchmarks.peak_rss                        # 1.8b fp32 + int4
    python -m benchmarks.peak_rss --cases 1.8b:int4,7b:int4 --keep

Each build is a fresh `python -m internlm2_graph` process on a synthetic bf16 checkpoint; its
peak RSS (whole process tree) comes from the kernel. Output folders are deleted after each build,
checkpoints at the end unless --keep. Results: benchmarks/results/peak-rss-<machine>.{json,md}.
Exits 1 if a build fails or misses its target.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from benchmarks import common

GB = 1e9
TARGETS_GB = {("1.8b", "fp32"): 2.0, ("1.8b", "int4"): 2.0, ("7b", "int4"): 4.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="1.8b:fp32,1.8b:int4", help="SIZE:PRECISION list")
    parser.add_argument("-e", "--ep", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workdir", default="/tmp/internlm2-bench", help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--machine", default=None, help="name in the results file")
    return parser.parse_args(argv)


def checkpoint(size: str, work: Path) -> Path:
    from internlm2_graph.synthetic import make_config, write_checkpoint

    folder = work / f"{size}-internlm2"
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        write_checkpoint(folder, make_config(size), chat=True, seed=0)
        print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def build(size: str, precision: str, args, work: Path) -> dict:
    source = checkpoint(size, work)
    out = work / f"{size}-{precision}-{args.ep}-peak"
    cmd = [
        sys.executable,
        "-m",
        "internlm2_graph",
        "-i",
        str(source),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        args.ep,
        "--overwrite",
        "-q",
    ]
    measured = common.run_measured(cmd, work / "logs" / f"{out.name}.log")
    shutil.rmtree(out, ignore_errors=True)
    target = TARGETS_GB.get((size, precision))
    peak = measured.peak_rss_bytes / GB
    passed = measured.ok and (target is None or peak < target)
    print(
        f"{size} {precision}: {measured.status}, {measured.seconds:.0f} s, peak {peak:.2f} GB "
        f"(target {target or '-'} GB)",
        flush=True,
    )
    if not measured.ok:
        print(common.tail(measured.log), flush=True)
    return {
        "size": size,
        "precision": precision,
        "ep": args.ep,
        "status": measured.status,
        "seconds": measured.seconds,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "target_gb": target,
        "pass": passed,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir)
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    results = [build(size, precision, args, work) for size, precision in cases]
    if not args.keep:
        for size in dict.fromkeys(size for size, _ in cases):
            shutil.rmtree(work / f"{size}-internlm2", ignore_errors=True)
    header = ["size", "precision", "status", "wall s", "peak RSS GB", "target GB", "pass"]
    rows = [
        [
            r["size"],
            f"{r['precision']} {r['ep']}",
            r["status"],
            f"{r['seconds']:.0f}",
            f"{r['peak_rss_bytes'] / GB:.2f}",
            r["target_gb"] or "-",
            "yes" if r["pass"] else "NO",
        ]
        for r in results
    ]
    text = "Peak RSS of internlm2_graph builds (child process tree)\n\n"
    text += common.markdown_table(header, rows)
    print("\n" + text)
    name = f"peak-rss-{args.machine or common.default_machine_name()}"
    payload = {"machine": common.machine_info(), "args": vars(args), "results": results}
    print(f"\nwrote {common.write_results(name, payload, text)}")
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
