"""Which quantized KV cache schemes run where, and how far each moves the logits.

    python -m benchmarks.probes.kv_cache_schemes [--ep cuda] [--workdir DIR]

Builds one small synthetic checkpoint (head_dim 64, as real models) with every
kv_cache_quant_scheme, feeds the same 256 tokens one at a time through onnxruntime-genai (so
every step reads the quantized cache back) and prints, per scheme, whether it ran and the
median / max |logit difference| to the same build with a float cache. Scales are a fixed
generous threshold (random weights: the mechanics, not the quality; quality needs
real weights). Also checks the refusals: a scheme refused at build time never reaches the
runtime.

Finding (2026-11-30; results/archive/kv-cache-schemes-h200.txt): on the H200 every scheme
runs, fp8 included (|logit difference| to the float cache, median/max: int8 0.069/0.19, fp8
0.13/0.30, int4 1.1/2.8 on random weights); on the CPU onnxruntime 1.32 runs the int8 and int4
caches and has no fp8 kernel, which the build refuses in one line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from internlm2_graph import build
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import KV_GRANULARITY, KV_QMAX
from internlm2_graph.runtime import load_model
from internlm2_graph.synthetic import make_config, write_checkpoint

THRESHOLD = 8.0


def forced_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    """og's logits after each of `ids`, appended one at a time (og keeps the cache, in
    whatever dtype the graph declares: fp8 included)."""
    from internlm2_graph.runtime import genai

    model = load_model(folder)
    params = genai().GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    generator = genai().Generator(model, params)
    out = []
    for token in ids:
        generator.append_tokens(np.array([[token]], np.int32))
        out.append(np.array(generator.get_logits(), np.float32).reshape(-1))
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kv-schemes-"))
    config = make_config(
        "tiny", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, num_hidden_layers=2, max_position_embeddings=1024,
    )  # fmt: skip
    ckpt = write_checkpoint(work / "ckpt", config, chat=False, seed=3)
    precision = "fp16" if args.ep == "cuda" else "fp32"
    ids = np.array([1, *np.random.default_rng(0).integers(3, 1000, 255)])
    build(ckpt, work / "float", precision, args.ep, overwrite=True)
    reference = forced_logits(work / "float", ids)
    print(f"{args.ep}, {precision} activations; |logit difference| to the float cache, 256 tokens")
    for kind, qmax in KV_QMAX.items():
        for granularity in KV_GRANULARITY:
            scheme = f"{kind}_{granularity}"
            size = 2 * 64 if granularity == "per_channel" else 1
            scales = [[THRESHOLD / qmax] * size] * config["num_hidden_layers"]
            path = work / f"{scheme}.json"
            path.write_text(json.dumps({"scales": {"k_scales": scales, "v_scales": scales}}))
            options = {"kv_cache_quant_scheme": scheme, "kv_cache_scale_file": str(path)}
            out = work / scheme
            try:
                build(ckpt, out, precision, args.ep, options, overwrite=True)
            except InternLM2GraphError as err:
                print(f"  {scheme:18s} refused: {err}")
                continue
            try:
                errors = np.abs(forced_logits(out, ids) - reference).max(axis=-1)
            except Exception as err:  # the runtime's own failure is the finding
                print(f"  {scheme:18s} built, FAILED to run: {str(err)[:160]}")
                continue
            print(f"  {scheme:18s} median {np.median(errors):.3g}  max {errors.max():.3g}")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
