"""What `q4_mixed` would reach on the bed with a 5-bit kernel: GPTAQ on Q5_0's grid, simulated.

    python -m benchmarks.probes.five_bit_ceiling [--sequences 8] [--eval-tokens 2048]
        [--workdir DIR]

onnxruntime's CPU MatMulNBits runs 2, 4 and 8 bits only; llama.cpp's Q4_K_M of SmolLM2 gives
most of the body 5-bit Q5_0 (576 is not a multiple of 256, so its 4-bit K-quants fall back).
This probe builds the bed with every decoder linear on Q5_0's own grid (32 symmetric levels per
block of 32 inputs, one fp16 scale a block: 5.5 bits a weight) by GPTAQ, the codes held in an
8-bit MatMulNBits (levels 112..143 around its implicit 128, so onnxruntime runs it exactly),
the shared int8 b64 table as `q4_mixed` has it, and scores it on the bed like every other row
(quality_per_byte.Bench). Its bytes are counted as a 5-bit packing would store them: the build's
own bytes less 3.5 bits per decoder weight (9 bits a weight as stored: 8-bit codes, fp32 scale
per 32; 5.5 in Q5_0's packing).

The patch is narrow and lives here: for 8-bit specs with blocks of 32, GPTQ's grids and rounding
(calibration/gptq.py's `levels` and `grid_of_range`) use 32 levels around 16, and its packed
codes are moved up by 112 with their scales rounded to fp16.

Finding (VM, 2 cores, 2026-12-08; 2048 tokens each of prose and code; 8 calibration
sequences): KL 0.0374 (prose 0.0477, code 0.0270), perplexity 14.769, top-1 0.900, at 105.7 MB
counted as 5-bit, against llama.cpp's Q4_K_M + imatrix 0.0558 (0.0612 / 0.0504), 14.944, 0.879
at 105.5 MB; `q4_mixed` (4 and 8 bits) reaches 0.0893 at 105.4 MB. The same algorithm on 5-bit
codes beats Q4_K_M by a third in KL at its bytes: the gap is the kernel's bit widths.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, uninstalled
from fixtures import smollm2  # noqa: E402

LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3")  # fmt: skip
OPTIONS = {
    "algo_config": "gptaq",
    "accuracy_level": "0",
    "embedding_precision": "int8-b64-sym",
    "lm_head_precision": "int8-b64-sym",
    "tensor_precision": ",".join(f"{n}:int8-b32-sym" for n in LINEARS),
}
STORED_BITS, FIVE_BIT_BITS = 9.0, 5.5  # a weight: int8 b32 with fp32 scales; Q5_0


def five_bit_patch() -> None:
    """GPTQ's grids and rounding for 8-bit b32 specs use Q5_0's grid (in this process only);
    dequantization, packing and everything else stay 8-bit."""
    import numpy as np

    from internlm2_graph.calibration import gptq

    plain_levels, plain_range, pack = gptq.levels, gptq.grid_of_range, gptq.from_codes

    def five(spec) -> bool:
        return (spec.bits, spec.block_size) == (8, 32)

    def levels(spec):
        return (31, 16) if five(spec) else plain_levels(spec)

    def grid_of_range(lo, hi, spec):
        if not five(spec):
            return plain_range(lo, hi, spec)
        ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        return ext * np.float32(-1 / 16), np.float32(16)

    def from_codes(codes, scales, zero_points, spec):
        q = pack(codes, scales, zero_points, spec)
        if five(spec):
            np.add(q.packed, np.uint8(128 - 16), out=q.packed)  # code - 16 == code + 112 - 128
            q.scales[:] = q.scales.astype(np.float16).astype(np.float32)
        return q

    gptq.levels, gptq.grid_of_range, gptq.from_codes = levels, grid_of_range, from_codes


def build_child(checkpoint: str, out: str, options: str) -> None:
    five_bit_patch()
    from internlm2_graph import build

    build(checkpoint, out, "int4", "cpu", json.loads(options), overwrite=True)
    smollm2.install_tokenizer(Path(out), Path(checkpoint))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=smollm2.DEFAULT_WORKDIR / "bed")
    parser.add_argument("--build-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_child:
        return build_child(*args.build_child)

    from benchmarks.quality_per_byte import Bench, model_bytes
    from internlm2_graph.checkpoint import Checkpoint

    bench = Bench(args.workdir, args.eval_tokens, 2, args.sequences)
    ids_file, _ = bench.calibration()
    out = bench.builds / f"five-bit-gptaq{args.sequences}"
    if not (out / "genai_config.json").is_file():
        options = json.dumps({**OPTIONS, "calibration_data": str(ids_file)})
        command = [sys.executable, "-m", "benchmarks.probes.five_bit_ceiling", "--build-child",
                   str(bench.checkpoint), str(out), options]  # fmt: skip
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[2])
    body = sum(math.prod(t.shape) for t in Checkpoint(bench.checkpoint)
               if any(f".{n}." in t.name for n in LINEARS))  # fmt: skip
    stored = model_bytes(out)
    row = bench.score(out)
    packed = stored - body * (STORED_BITS - FIVE_BIT_BITS) / 8
    print(f"5-bit GPTAQ ({args.sequences} sequences): {stored / 1e6:.1f} MB as stored, "
          f"{packed / 1e6:.1f} MB as 5-bit")  # fmt: skip
    for text in ("all", "prose", "code"):
        r = row[text]
        print(f"  {text}: KL {r['kl']:.4f}, perplexity {r['perplexity']:.3f}, "
              f"top-1 {r['top1']:.3f}")  # fmt: skip
    for name in (f"llama.cpp-Q4_K_M-imatrix{args.sequences}", "llama.cpp-Q4_K_M-imatrix"):
        cached = bench.rows_dir / f"{name}.json"
        if cached.is_file():
            theirs = json.loads(cached.read_text())
            print(f"  {name} (cached row): {theirs['bytes'] / 1e6:.1f} MB, "
                  f"KL {theirs['all']['kl']:.4f}, perplexity {theirs['all']['perplexity']:.3f}")


if __name__ == "__main__":
    main()
