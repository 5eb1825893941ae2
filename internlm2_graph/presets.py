"""Named weight layouts: `--extra_options quant_preset=NAME`, like llama.cpp's Q4_K_M.

A preset is a set of --extra_options; options given explicitly win over the preset's. q4_mixed
is the layout the ablation on the untilted SmolLM2 bed favoured (docs/quality-per-byte.md,
benchmarks/quality_per_byte.py); q4_small is the smallest layout the options make. A preset
fixes bytes and formats only, as llama.cpp's types do; how the codes are found is algo_config's
choice (gptaq is the analogue of an imatrix).
"""

from __future__ import annotations

from internlm2_graph.errors import InternLM2GraphError

# name -> (precision it needs, what it is, its options)
PRESETS: dict[str, tuple[str, str, dict[str, str]]] = {
    "q4_mixed": (
        "int4",
        "int4 block 32 for wo, w1, w3; int8 block 32 for wqkv (it carries the values) and w2 "
        "(the down projection) in every layer; int8 embedding, shared with an int8 lm_head "
        "where the checkpoint ties them",
        {
            "block_size": "32",
            "is_symmetric": "true",
            "embedding_precision": "int8",
            "lm_head_precision": "int8",
            "tensor_precision": "feed_forward.w2:int8,attention.wqkv:int8",
        },
    ),
    "q4_small": (
        "int4",
        "int4 block 32 body and lm_head; 4-bit embedding, shared with the head where tied",
        {
            "block_size": "32",
            "is_symmetric": "true",
            "embedding_precision": "int4",
            "lm_head_precision": "int4",
        },
    ),
}


def apply_preset(options: dict[str, str], precision: str) -> dict[str, str]:
    """`options` with its quant_preset expanded: the preset's options under the explicit ones."""
    name = options.get("quant_preset")
    if name is None:
        return options
    if name not in PRESETS:
        raise InternLM2GraphError(
            f"--extra_options quant_preset={name!r}: use one of {', '.join(PRESETS)}"
        )
    needs, _, preset = PRESETS[name]
    if precision != needs:
        raise InternLM2GraphError(
            f"--extra_options quant_preset={name} is a --precision {needs} layout; "
            f"got --precision {precision}"
        )
    explicit = {k: v for k, v in options.items() if k != "quant_preset"}
    return {**preset, **explicit}
