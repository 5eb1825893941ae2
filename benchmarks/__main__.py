"""The benchmark harness: `python -m benchmarks COMMAND`.

    python -m benchmarks list                                   # the suites and their settings
    python -m benchmarks run decode --model 1.8b -p int4 --tools ours,builder --repeat 5
    python -m benchmarks run export,decode,quality,speculative,kernels --model tiny --smoke
    python -m benchmarks table [--format md|csv|json] [--suite decode] [ROWS.json ...]
    python -m benchmarks report                                 # docs/benchmarks.md, plots
    python -m benchmarks headline                               # the README's table

`run` writes benchmarks/results/rows/<suites>-<machine>-<stamp>.json (or --out), one row per
measured number (benchmarks/rows.py); `report` and `headline` regenerate every table and plot
from the committed rows, so what the README and docs/ say cannot drift from the results.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import rows

MODELS = ("tiny", "1.8b", "7b", "20b")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the suites, what each measures and its settings")
    run = commands.add_parser("run", help="run suites, write result rows")
    run.add_argument("suites", help="comma list: export,decode,quality,speculative,kernels")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--model", default="tiny", choices=MODELS, help="synthetic checkpoint")
    source.add_argument("--checkpoint", type=Path, help="an InternLM2 checkpoint folder instead")
    run.add_argument("-p", "--precisions", default="int4", help="comma list (int4,fp32,...)")
    run.add_argument("-e", "--ep", default="cpu", choices=("cpu", "cuda"))
    run.add_argument("--tools", default="ours", help="ours and/or builder (the `bench` extra)")
    run.add_argument("--repeat", type=int, default=3, help="measured runs of each point")
    run.add_argument(
        "--param", nargs="+", default=[], metavar="KEY=VALUE", help="suite settings (see list)"
    )
    run.add_argument("--smoke", action="store_true", help="seconds-long settings: does it run?")
    run.add_argument("--workdir", type=Path, help="checkpoints and builds (default: a temp dir)")
    run.add_argument("--machine", default=None, help="name in the rows file (default: detected)")
    run.add_argument(
        "--label",
        help="the rows' model (default: --model or the checkpoint's folder name; set "
        "it when the settings name built folders of another model)",
    )
    run.add_argument("--out", type=Path, help="rows file to write (default: results/rows/...)")
    table = commands.add_parser("table", help="rows as a table")
    table.add_argument("files", nargs="*", type=Path, help="rows files (default: all committed)")
    table.add_argument("--format", default="md", choices=("md", "csv", "json"))
    table.add_argument("--suite", help="only this suite's rows")
    commands.add_parser("report", help="docs/benchmarks.md and the plots, from the rows")
    headline = commands.add_parser("headline", help="the README's table, from the rows")
    headline.add_argument("--check", action="store_true", help="fail if the README differs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        return list_suites()
    if args.command == "run":
        return run(args)
    if args.command == "table":
        found = [r for f in args.files for r in rows.read(f)] if args.files else rows.read_all()
        print(rows.table([r for r in found if args.suite in (None, r.suite)], args.format))
        return 0
    from benchmarks import report

    if args.command == "report":
        print(f"wrote {report.write_report()[0]}")  # and the plots, which say so themselves
        return 0
    if args.check:
        return 0 if report.readme_is_current() else _stale()
    print(f"wrote {report.write_headline()}")
    return 0


def list_suites() -> int:
    from benchmarks import harness
    from benchmarks.suites import SUITES

    for name, suite in SUITES.items():
        print(describe(name, suite))
        for study in getattr(suite, "STUDIES", ()):
            print(describe(f"  study={study}", harness.study(suite, study)))
    return 0


def describe(name: str, module) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in module.PARAMS.items()) or "-"
    return f"{name:12s} {module.__doc__.splitlines()[0]}\n{'':14s} settings: {settings}"


def run(args) -> int:
    from benchmarks import common, harness
    from benchmarks.suites import SUITES

    names = args.suites.split(",")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"error: unknown suite {unknown}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    tools = args.tools.split(",")
    if set(tools) - {"ours", "builder"}:
        print(f"error: --tools takes ours and/or builder, not {args.tools}", file=sys.stderr)
        return 2
    if "builder" in tools and not common.has_module("torch", "transformers"):
        print(
            "error: the onnxruntime-genai builder needs torch and transformers: "
            'pip install -e ".[cpu,bench]"',
            file=sys.stderr,
        )
        return 2
    if any("=" not in p for p in args.param):
        print(f"error: --param takes KEY=VALUE, got {args.param}", file=sys.stderr)
        return 2
    params = dict(p.split("=", 1) for p in args.param)
    with tempfile.TemporaryDirectory(prefix="internlm2-bench-") as scratch:
        workdir = args.workdir or Path(scratch)
        ctx = harness.Context(
            model=args.label or (args.checkpoint.name if args.checkpoint else args.model),
            source=args.checkpoint,
            workdir=workdir,
            ep=args.ep,
            precisions=tuple(args.precisions.split(",")),
            tools=tuple(tools),
            repeat=1 if args.smoke else args.repeat,
            params=params,
        )
        made = harness.run_suites(names, ctx, smoke=args.smoke)
    machine = args.machine or common.default_machine_name()
    out = args.out or rows.ROWS / f"{'-'.join(names)}-{machine}-{time.strftime('%Y%m%d-%H%M')}.json"
    made = [r.__class__(**{**r.__dict__, "source": out.name}) for r in made]
    print(rows.table(made))
    print(f"wrote {rows.write(made, out)}")
    return 0


def _stale() -> int:
    print(
        "error: README.md's headline table differs from the results; run "
        "`python -m benchmarks headline` and commit README.md",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
