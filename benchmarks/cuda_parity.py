"""CUDA builds against the fp32 numpy reference, on a small config (run on the GPU machine).

    PYTHONPATH=. python -m benchmarks.cuda_parity [--workdir /tmp/cuda-parity]

For each CUDA precision: max |logit difference| relative to the logit range over a prompt and
decode steps, top-1 agreement, and greedy tokens. int4 is also compared with the reference on
its own dequantized weights, which isolates the runtime's arithmetic from quantization noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks import common
from internlm2_graph import build
from internlm2_graph.precision import resolve_target
from internlm2_graph.reference import Reference, quantized_reference
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.verify import eos_ids, og_greedy

PROMPT = [1, 17, 230, 5, 981, 44, 12, 600, 73, 8, 19, 400]
STEPS = 10
CASES = [
    ("fp16", []),
    ("bf16", []),
    ("int4", []),
    ("int4", ["use_cuda_bf16=true"]),
    ("int8", []),
]


def compare(model_dir: Path, reference: Reference) -> dict:
    want_tokens, want = reference.greedy(PROMPT, STEPS, eos_ids(model_dir))
    (tokens,), got = og_greedy(model_dir, [PROMPT], STEPS)
    pairs = list(zip(got, want))
    scale = max(float(np.max(np.abs(w))) for _, w in pairs)
    return {
        "max_rel_error": max(float(np.max(np.abs(g[0] - w))) for g, w in pairs) / scale,
        "top1": float(np.mean([int(np.argmax(g[0]) == np.argmax(w)) for g, w in pairs])),
        "tokens_equal": tokens[: len(want_tokens)] == want_tokens,
        "steps": len(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="/tmp/cuda-parity")
    args = parser.parse_args()
    common.require_genai()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    config = make_config(
        "tiny",
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        num_hidden_layers=3,
        max_position_embeddings=512,
    )
    checkpoint = write_checkpoint(root / "ckpt", config, chat=False)
    results = {}
    for precision, options in CASES:
        name = "-".join([precision, *options])
        out = root / name
        build(checkpoint, out, precision, "cuda", options)
        results[name] = {"vs_fp32_reference": compare(out, Reference(checkpoint))}
        if precision in ("int4", "int8"):
            target = resolve_target(precision, "cuda", dict(o.split("=") for o in options))
            results[name]["vs_dequantized_reference"] = compare(
                out, quantized_reference(checkpoint, target)
            )
        print(name, json.dumps(results[name]), flush=True)
    results["machine"] = common.machine_info()
    out = common.RESULTS / "cuda-parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
