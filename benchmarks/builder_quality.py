"""Builder quality: the onnxruntime-genai builder's int4 on real weights, beside ours.

    python -m benchmarks run quality --tools ours,builder --workdir /tmp/internlm2-bench \
        --param study=builder

SmolLM2-135M-Instruct (fixtures/smollm2.py) as a Llama-layout copy (llama_layout.py) with its
real tokenizer; the builder's int4 CPU builds at the settings of benchmarks/quant_quality.py
(rtn at block 128 symmetric / asymmetric and block 32 symmetric, accuracy level 0) and its
k_quant methods; perplexity on the same 4096 tokens each of prose and code with windows of 1024
(quality.perplexity), ours at fp32 and with rtn / gptq beside them in the same run, and bits
per weight of the decoder's matrices (MatMulNBits initializers / their weights), as rows per
tool and method. Needs the `bench` extra (torch); a builder method that fails is left out.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks import harness
from benchmarks.rows import Row
from fixtures.llama_layout import write_llama_copy
from fixtures.smollm2 import built_model, code_text, encode, eval_text, smollm2_checkpoint
from internlm2_graph.evaluate import perplexity

PARAMS: dict = {}
SMOKE: dict = {}  # real weights: SmolLM2-135M (fixtures.smollm2)
BUILDER = {
    "rtn 128-sym": ["algo_config=rtn", "block_size=128", "is_symmetric=true"],
    "rtn 128-asym": ["algo_config=rtn", "block_size=128", "is_symmetric=false"],
    "rtn 32-sym": ["algo_config=rtn", "block_size=32", "is_symmetric=true"],
    "default 128-sym": ["block_size=128", "is_symmetric=true"],  # its MatMulNBitsQuantizer RTN
    "default 32-sym": ["block_size=32", "is_symmetric=true"],
    # k_quant at block 128 fails on SmolLM2's K=576 (not a multiple of 128): "cannot reshape".
    "k_quant 128": ["algo_config=k_quant", "block_size=128"],
    "k_quant 32": ["algo_config=k_quant", "block_size=32"],
    "k_quant_last 32": ["algo_config=k_quant_last", "block_size=32"],
    "k_quant_mixed 32": ["algo_config=k_quant_mixed", "block_size=32"],
}
OURS = {
    "fp32": ("fp32", {}),
    "rtn 128-sym": ("int4", {"block_size": "128", "accuracy_level": "0"}),
    "gptq 128-sym": ("int4", {"block_size": "128", "accuracy_level": "0", "algo_config": "gptq"}),
    "rtn 128-asym": ("int4", {"block_size": "128", "accuracy_level": "0", "is_symmetric": "false"}),
    "gptq 128-asym": (
        "int4",
        {
            "block_size": "128",
            "accuracy_level": "0",
            "is_symmetric": "false",
            "algo_config": "gptq",
        },
    ),
    "rtn 32-sym": ("int4", {"block_size": "32", "accuracy_level": "0"}),
    "gptq 32-sym": ("int4", {"block_size": "32", "accuracy_level": "0", "algo_config": "gptq"}),
}


def bits_per_weight(folder: Path) -> float:
    """Bits of the quantized matrices (packed codes, scales, zero points) per weight they hold."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype
    sizes = {
        t.name: int(np.prod(t.dims)) * itemsize(t.data_type).itemsize
        for t in model.graph.initializer
    }
    stored = weights = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            weights += attrs["K"] * attrs["N"]
            stored += sum(sizes.get(name, 0) for name in node.input[1:])
    return 8 * stored / weights if weights else 32.0


def run(ctx: harness.Context) -> list[Row]:
    work = ctx.workdir
    checkpoint = smollm2_checkpoint(work / "smollm2")
    llama = work / "smollm2-llama"
    if not (llama / "config.json").is_file():
        write_llama_copy(checkpoint, llama, checkpoint / "smollm2-tokenizer" / "tokenizer.json")
    texts = {
        "prose": encode(checkpoint, eval_text(), 4096),
        "code": encode(checkpoint, code_text(), 4096),
    }
    calibration = work / "gptq-calibration.json"
    if not calibration.is_file():
        from internlm2_graph.calibration.data import SEQUENCE_TOKENS, default_text

        ids = encode(checkpoint, default_text(), 8192)
        chunks = [
            ids[i : i + SEQUENCE_TOKENS].tolist() for i in range(0, len(ids), SEQUENCE_TOKENS)
        ]
        calibration.write_text(json.dumps(chunks))
    rows = []
    for name, (precision, options) in OURS.items():
        if options.get("algo_config") == "gptq":
            options = {**options, "calibration_data": str(calibration)}
        folder = work / f"bq-ours-{name.replace(' ', '-')}"
        start = time.perf_counter()
        built_model(checkpoint, folder, precision, "cpu", options)
        rows.append(measure("ours", name, folder, texts, time.perf_counter() - start))
    for name, options in BUILDER.items():
        folder = work / f"bq-builder-{name.replace(' ', '-')}"
        start = time.perf_counter()
        if not (folder / "genai_config.json").is_file():
            cmd = harness.builder_command(
                llama, folder, "int4", "cpu", ["accuracy_level=0", *options]
            )
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"builder {name} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
        rows.append(measure("builder", name, folder, texts, time.perf_counter() - start))
    out = []
    metrics = {"bits": "bits_per_weight", "prose": "ppl_prose", "code": "ppl_code", "seconds": ""}
    for row in rows:
        variant = "fp32 cpu" if row["method"] == "fp32" else f"int4 {row['method']} cpu"
        for key, metric in metrics.items():
            out.append(
                ctx.row(
                    model="smollm2-135m",
                    variant=variant,
                    tool=row["tool"],
                    metric=metric or key,
                    value=row[key],
                    unit="s" if key == "seconds" else "",
                    params={"eval_tokens": 4096, "window": 1024},
                )
            )
    return out


def measure(tool: str, method: str, folder: Path, texts: dict, seconds: float) -> dict:
    row = {"tool": tool, "method": method, "bits": bits_per_weight(folder), "seconds": seconds}
    for name, ids in texts.items():
        row[name] = perplexity(folder, ids, window=1024)
    print(json.dumps(row), flush=True)
    return row
