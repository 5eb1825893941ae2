"""How each calibrated algo_config runs: frozen recipe objects, one per method.

A build takes the recipe of its algo_config (`recipe_for`); an ablation passes its own
(`dataclasses.replace(GPTQ_RECIPE, act_order=False)`) to `internlm2_graph.build(recipe=...)`
or to the drivers, and nothing global changes. The defaults are the measured choices; the
comments say where they were measured (benchmarks/quant_quality.py on SmolLM2-135M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Calibration tokens in all: the layer forwards cost ~2 * parameters * tokens, the main cost of
# a build. GPTAQ takes twice as many: its maps have K^2 unknowns per linear; on SmolLM2 the
# doubling lowered its KL to fp32 by 5-12% (plain GPTQ got worse on prose with 16384).
TOKENS = 8192
GPTAQ_TOKENS = 16384


@dataclass(frozen=True)
class GPTQ:
    """GPTQ (calibration/gptq.py), and GPTAQ with `float_aim`."""

    # act_order (static blocks) is clearly better on SmolLM2; the grid search (searched_grid)
    # is a smaller gain at more cost.
    act_order: bool = True
    search: bool = True
    # Fraction of the mean Hessian diagonal added to it. GPTQ's paper uses 0.01; on SmolLM2
    # 0.1 generalises better from calibration text to other text (prose perplexity gap to fp32
    # at block 128: 37% of RTN's, against 54% with 0.01; code unchanged).
    damp: float = 0.1
    # GPTAQ: each linear aimed at the float model's output rather than its own float weight
    # (gptq.float_aim_map).
    float_aim: bool = False
    # GPTAQ's ridge, times the mean Hessian diagonal: 1 gave the lowest prose KL of 0.1, 0.5, 1
    # and 2; lower ones fit the calibration text's own quantization errors too closely.
    aim_ridge: float = 1.0
    tokens: int = TOKENS

    @property
    def name(self) -> str:
        return "gptaq" if self.float_aim else "gptq"


@dataclass(frozen=True)
class AWQ:
    """AWQ (calibration/awq.py): activation-aware scales, then round to nearest."""

    # Clip each block's range by AWQ's search (awq.awq_clip).
    clip: bool = True
    # Scale wo's input, one scale per KV head, folded into wqkv's value rows: on SmolLM2 it
    # lowers wo's output error on held-out text by 2-5% (and on calibration text by 7-9%). A
    # quantized KV cache turns it off (its scales are the float model's values').
    scale_values: bool = True
    # The lm_head (a fifth of SmolLM2's weights) is rounded by GPTQ, as algo_config=gptq rounds
    # it: with an int4 RTN head AWQ kept 82% of RTN's prose gap at block 128. "rtn": left to
    # the saver.
    head: str = "gptq"
    # "gptq": GPTQ rounds the scaled weights (an ablation, not an option).
    rounding: str = "rtn"
    # How GPTQ runs where AWQ uses it (the head; rounding="gptq").
    gptq: GPTQ = field(default_factory=GPTQ)
    tokens: int = TOKENS

    name = "awq"

    def __post_init__(self) -> None:
        if self.head not in ("gptq", "rtn") or self.rounding not in ("gptq", "rtn"):
            raise ValueError(f"AWQ head and rounding are 'gptq' or 'rtn', got {self}")


Recipe = GPTQ | AWQ
RECIPES: dict[str, Recipe] = {
    "gptq": GPTQ(),
    "gptaq": GPTQ(float_aim=True, tokens=GPTAQ_TOKENS),
    "awq": AWQ(),
}


def recipe_for(algorithm: str) -> Recipe:
    """The default recipe of a calibrated algo_config (gptq, gptaq, awq)."""
    return RECIPES[algorithm]
