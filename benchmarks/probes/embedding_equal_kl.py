"""Is a quantized embedding's KL equal to the float table's? Per-token KL, paired, bootstrapped.

    python -m benchmarks.probes.embedding_equal_kl [--tables float,int8,int4-asym]
        [--eval-tokens 2048] [--workdir DIR]

RTN int4 b32 builds of the bed (quality_per_byte.Bench: SmolLM2 off its Q4_1 grid) that differ
only in `embedding_precision` (the int4 lm_head stays apart from the table); each token's
KL(bed fp32 || build) on the same prose and code windows, then the difference to the float
table's, token by token, with a 95% interval from a bootstrap over blocks of 64 tokens
(neighbouring tokens' KLs are correlated). "Equal" means the interval holds 0.

Finding (VM, 2 cores, 2026-12-08; 4,092 tokens): int8 +0.00036 nats (+0.06%), 95% interval
-0.00002 .. +0.00074: equal; that is InternLM2-7B's CPU int4 folder 1.09 GB smaller
(docs/quality-per-byte.md, sizes). int4 asymmetric b32 +0.0085 (+1.45%), interval +0.0017 ..
+0.0158: not equal; int4-b16-asym +0.0091 (+0.0039 .. +0.0153). On CUDA (fp16 tables) only
a 4-bit table saves 0.5 GB on the 7B, so there the goal is not met by these formats.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, uninstalled
from fixtures import smollm2  # noqa: E402

BASE = {"algo_config": "rtn", "accuracy_level": "0", "block_size": "32",
        "lm_head_precision": "int4"}  # fmt: skip
BLOCK = 64  # tokens per bootstrap block


def token_kl(bench, folder: Path):
    """KL(bed || folder) of every scored token, prose then code (numpy float64 [tokens])."""
    import numpy as np

    from internlm2_graph.evaluate import Decoder, log_softmax, windows

    model, out = Decoder(folder, bench.threads), []
    for text in ("prose", "code"):
        ids = np.asarray(bench.texts[text], np.int64)
        for part in windows(len(ids), 1024):
            ours, theirs = model.logits(ids[part])[:-1], bench.reference.logits(ids[part])[:-1]
            for row in range(0, len(ours), 256):
                logp, ref = log_softmax(ours[row : row + 256]), log_softmax(theirs[row : row + 256])
                out.append((np.exp(ref) * (ref - logp)).sum(-1))
    return np.concatenate(out)


def interval(diff, rounds: int = 5000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of diff's mean, resampling blocks of BLOCK tokens."""
    import numpy as np

    blocks = diff[: len(diff) // BLOCK * BLOCK].reshape(-1, BLOCK).mean(1)
    rng = np.random.default_rng(seed)
    means = blocks[rng.integers(0, len(blocks), (rounds, len(blocks)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", default="float,int8,int4-asym")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=smollm2.DEFAULT_WORKDIR / "bed")
    args = parser.parse_args(argv)

    from benchmarks import quant_quality
    from benchmarks.quality_per_byte import Bench, model_bytes

    bench = Bench(args.workdir, args.eval_tokens, 2)
    kls, sizes = {}, {}
    for table in ["float", *(t for t in args.tables.split(",") if t != "float")]:
        folder = bench.builds / f"embedding-{table}"
        options = {**BASE, **({} if table == "float" else {"embedding_precision": table})}
        quant_quality.measured_build(bench.checkpoint, folder, "int4", options)
        kls[table], sizes[table] = token_kl(bench, folder), model_bytes(folder)
        shutil.rmtree(folder)
    float_kl = kls.pop("float")
    print(f"float table: {sizes['float'] / 1e6:.1f} MB, KL {float_kl.mean():.5f} "
          f"({len(float_kl)} tokens)")  # fmt: skip
    for table, kl in kls.items():
        diff = kl - float_kl
        lo, hi = interval(diff)
        verdict = "equal" if lo <= 0 <= hi else ("lower" if hi < 0 else "higher")
        print(f"{table}: {sizes[table] / 1e6:.1f} MB, KL {kl.mean():.5f}, difference "
              f"{diff.mean():+.5f} ({100 * diff.mean() / float_kl.mean():+.2f}%), 95% interval "
              f"{lo:+.5f} .. {hi:+.5f}: {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
