"""KV quality: quantized KV caches on real weights, perplexity, KL and top-1 against float KV.

    python -m benchmarks run quality --workdir /tmp/internlm2-bench --param study=kv_quality \
        window=2048 chunk=256

Teacher-forced, SmolLM2-135M-Instruct in the InternLM2 layout.
Each scheme is built fp32 on the CPU with scales calibrated inside the build
(`kv_cache_quant_scheme` alone, calibration_data = the stdlib text of calibration.data.default_text,
tokenized with SmolLM2's real tokenizer and passed as id lists); evaluation is 4096 tokens each
of prose (smollm2.eval_text) and code (smollm2.code_text), other text than the calibration's.
Windows are fed `chunk` tokens per call, so every token after the first chunk attends to keys
and values read back from the quantized cache. Rows per scheme and text: perplexity, KL, top-1.

`builder=true` adds the onnxruntime-genai builder's int8_per_channel on the same weights (its
Llama-layout copy with the real tokenizer), scales from its own kv_cache_calibration tool at
its defaults, against its own float-KV build; and ours with the builder's scale file. Needs the
`bench` extra (torch).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.rows import Row
from fixtures.smollm2 import built_model, code_text, encode, eval_text, smollm2_checkpoint
from internlm2_graph.calibration.data import SEQUENCE_TOKENS, default_text
from internlm2_graph.evaluate import kl_and_top1

SCHEMES = ("int8_per_channel", "int8_per_tensor", "int4_per_channel", "int4_per_tensor")
PARAMS = {"window": 2048, "chunk": 256, "builder": False}
SMOKE: dict = {}  # real weights: SmolLM2-135M (fixtures.smollm2)


def builder_rows(work: Path, checkpoint: Path, texts: dict, args) -> list[dict]:
    """The builder's fp32 and int8_per_channel-KV builds (its calibration tool's scales), and
    ours with those scales, each against its own tool's float-KV build."""
    from fixtures.llama_layout import write_llama_copy

    llama = work / "smollm2-llama"
    if not (llama / "config.json").is_file():
        write_llama_copy(checkpoint, llama, checkpoint / "smollm2-tokenizer" / "tokenizer.json")

    def builder(out: Path, *options: str) -> Path:
        if not (out / "genai_config.json").is_file():
            cmd = harness.builder_command(llama, out, "fp32", "cpu", options)
            subprocess.run(cmd, check=True, capture_output=True)
        return out

    base = builder(work / "kvq-builder-fp32")
    scales = work / "kvq-builder-scales.json"
    if not scales.is_file():
        tool = "onnxruntime_genai.models.quantization.kv_cache_calibration"
        cmd = [sys.executable, "-m", tool, "--model", str(base), "--tokenizer", str(llama),
               "--out", str(scales)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    scheme = "kv_cache_quant_scheme=int8_per_channel"
    theirs = builder(work / "kvq-builder-int8", scheme, f"kv_cache_scale_file={scales}")
    ours = built_model(
        checkpoint, work / "kvq-ours-builder-scales",
        extra_options={"kv_cache_quant_scheme": "int8_per_channel",
                       "kv_cache_scale_file": str(scales)},
    )  # fmt: skip
    rows = []
    for label, folder, reference in (
        ("builder int8_per_channel (its tool's scales)", theirs, base),
        ("ours int8_per_channel (the builder's scales)", ours, work / "kvq-fp32"),
    ):
        row = {"scheme": label, "build_seconds": 0.0}
        for name, text in texts.items():
            q = kl_and_top1(
                folder, reference, text, args.window, chunk=args.chunk, reference_chunk=args.chunk
            )
            row[name] = {
                "perplexity": q.perplexity, "reference": q.reference_perplexity,
                "kl": q.kl, "top1": q.top1,
            }  # fmt: skip
        print(row["scheme"], json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run(ctx: harness.Context) -> list[Row]:
    args = harness.settings(ctx, PARAMS)
    work = ctx.workdir
    checkpoint = smollm2_checkpoint(work / "smollm2")
    ids = encode(checkpoint, default_text(), 2048 * 4)
    calibration = work / "kv-calibration.json"
    calibration.write_text(
        json.dumps(
            [ids[i : i + SEQUENCE_TOKENS].tolist() for i in range(0, len(ids), SEQUENCE_TOKENS)]
        )
    )
    texts = {
        "prose": encode(checkpoint, eval_text(), 4096),
        "code": encode(checkpoint, code_text(), 4096),
    }
    reference = built_model(checkpoint, work / "kvq-fp32")
    rows = []
    for scheme in ("float", *SCHEMES):
        folder = reference
        seconds = 0.0
        if scheme != "float":
            folder = work / f"kvq-{scheme}"
            options = {"kv_cache_quant_scheme": scheme, "calibration_data": str(calibration)}
            start = time.perf_counter()
            built_model(checkpoint, folder, extra_options=options)
            seconds = time.perf_counter() - start
        row = {"scheme": scheme, "build_seconds": seconds}
        for name, text in texts.items():
            q = kl_and_top1(
                folder, reference, text, args.window, chunk=args.chunk, reference_chunk=args.chunk
            )
            row[name] = {
                "perplexity": q.perplexity,
                "reference": q.reference_perplexity,
                "kl": q.kl,
                "top1": q.top1,
            }
        rows.append(row)
        print(scheme, json.dumps(row), flush=True)
    if args.builder:
        rows += builder_rows(work, checkpoint, texts, args)
    return [row for found in rows for row in rows_of(ctx, found, args)]


def rows_of(ctx: harness.Context, found: dict, args) -> list[Row]:
    out = []
    for text in ("prose", "code"):
        q = found[text]
        params = {"window": args.window, "chunk": args.chunk, "reference_ppl": q["reference"]}
        for metric, unit in (("perplexity", ""), ("kl", "nats"), ("top1", "")):
            name = {"perplexity": "ppl"}.get(metric, metric) + f"_{text}"
            out.append(
                ctx.row(
                    model="smollm2-135m",
                    variant=f"fp32 cpu {found['scheme']} KV",
                    tool="builder" if found["scheme"].startswith("builder") else "ours",
                    metric=name,
                    value=q[metric],
                    unit=unit,
                    params=params,
                )
            )
    return out
