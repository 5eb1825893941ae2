"""How much quant_quality's gaps move with the calibration sample: several runs, one table.

    python -m benchmarks.quant_quality --methods rtn,gptq,gptaq --machine cpu2-gptaq
    python -m benchmarks.quant_quality --methods rtn,gptq,gptaq --calibration-subset 1 \\
        --machine cpu2-gptaq-subset1                 # and 2, ...
    python -m benchmarks.quality_spread quant-quality-cpu2-gptaq \\
        quant-quality-cpu2-gptaq-subset1 quant-quality-cpu2-gptaq-subset2

Reads those results (benchmarks/results/NAME.json) and prints, per method, setting and text,
the perplexity gap to fp32 as a share of RTN's (same setting, same lm_head) in each run, their
mean and their largest; writes benchmarks/results/<first name>-spread.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, uninstalled
from benchmarks import common  # noqa: E402

TEXTS = ("prose", "code", "prose+code")


def gaps(rows: list[dict]) -> dict[tuple, float]:
    """(method, setting, lm_head, text) -> gap to fp32 / RTN's gap, in percent."""
    fp32 = next(r for r in rows if r["method"] == "fp32")
    out = {}
    for row in rows:
        if row["method"] in ("fp32", "rtn"):
            continue
        rtn = next(r for r in rows if r["method"] == "rtn" and r["setting"] == row["setting"]
                   and r["lm_head"] == row["lm_head"])  # fmt: skip
        for text in TEXTS:
            ppl, base = row[text]["perplexity"], fp32[text]["perplexity"]
            key = (row["method"], row["setting"], row["lm_head"], text)
            out[key] = 100 * (ppl - base) / (rtn[text]["perplexity"] - base)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="results names, without .json")
    args = parser.parse_args(argv)
    runs = [
        gaps(json.loads((common.RESULTS / f"{n}.json").read_text())["rows"]) for n in args.names
    ]
    keys = [k for k in runs[0] if all(k in run for run in runs)]
    header = ["method", "setting", "lm_head", "text", *[f"run {i + 1}" for i in range(len(runs))],
              "mean", "largest"]  # fmt: skip
    table = []
    for key in sorted(keys, key=lambda k: (k[1], k[2], k[3], k[0])):
        values = [run[key] for run in runs]
        table.append([*key, *(f"{v:.0f}%" for v in values), f"{sum(values) / len(values):.0f}%",
                      f"{max(values):.0f}%"])  # fmt: skip
    markdown = (
        "# Perplexity gap to fp32 as a share of RTN's, over calibration samples\n\n"
        f"Runs: {', '.join(f'`{n}`' for n in args.names)} (`python -m benchmarks.quality_spread`)."
        "\n\n" + common.markdown_table(header, table)
    )
    (common.RESULTS / f"{args.names[0]}-spread.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
