"""Named weight layouts: `--extra_options quant_preset=NAME`, like llama.cpp's Q4_K_M.

A preset is a set of --extra_options; options given explicitly win over the preset's. q4_mixed
is the layout the ablation on the untilted SmolLM2 bed chose within the bytes of llama.cpp's
Q4_K_M + imatrix (docs/quality-per-byte.md, benchmarks/quality_per_byte.py); q4_small is the
smallest layout the options make. A preset fixes bytes and formats only, as llama.cpp's types
do; how the codes are found is algo_config's choice (gptaq is the analogue of an imatrix).
"""

from __future__ import annotations

from internlm2_graph.errors import InternLM2GraphError

# name -> (precision it needs, what it is, its options)
PRESETS: dict[str, tuple[str, str, dict[str, str]]] = {
    "q4_mixed": (
        "int4",
        "asymmetric int4 (4-bit zero point per block): block 32 for wo and w2, block 64 for "
        "w1 and w3; int8 block 64 for wqkv (it carries the values) in every layer and int8 "
        "block 128 for w2 (the down projection) of the first two and last two layers; int8 "
        "block 64 embedding, shared with an int8 lm_head where the checkpoint ties them",
        {
            "block_size": "32",
            "is_symmetric": "false",
            # symmetric: a tied head shares the table's codes only in a symmetric format
            "embedding_precision": "int8-b64-sym",
            "lm_head_precision": "int8-b64-sym",
            "tensor_precision": "attention.wqkv:int8-b64-sym,"
            "feed_forward.w1:int4-b64-asym,feed_forward.w3:int4-b64-asym,"
            "feed_forward.w2@first2+last2:int8-b128-sym",
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
