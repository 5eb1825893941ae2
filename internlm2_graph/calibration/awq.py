"""AWQ without torch: activation-aware scales folded into the float weights, then rounding.

AWQ (Lin et al. 2023, arXiv:2306.00978) keeps round-to-nearest but first moves each input
channel's importance into the weights: a linear's columns are multiplied by ``s`` and its input
divided by ``s``, which leaves the float model unchanged, and ``s = mean|x|^alpha`` (alpha
searched) gives the channels that carry large activations more of the grid's resolution. The
division is folded into whatever makes the input: the RMSNorm weight before wqkv and before
w1/w3, the rows of w3 before w2, and the value rows of wqkv before wo. Only those float weights
and the codes change: the graph is the same. The per-layer driver is drivers.py; the options
are a recipes.AWQ.
"""

from __future__ import annotations

import numpy as np

from internlm2_graph.calibration.compute import NUMPY
from internlm2_graph.calibration.forward import LayerWeights, chunked
from internlm2_graph.config import InternLM2Config
from internlm2_graph.precision import QuantSpec
from internlm2_graph.quantize import dequantize, quantize, to_blocks

# AutoAWQ's grids. Exponents 0, 0.05, ..., 0.95: alpha = 0 is s = 1, plain round-to-nearest, so
# the search never ends worse than RTN on the tokens it sees. Clip: a block's largest |w| times
# 1, 0.95, ..., 0.55 (r = 1 is no clipping).
ALPHAS = np.arange(20, dtype=np.float32) / np.float32(20)
CLIP_SHRINK = np.float32(1) - np.arange(10, dtype=np.float32) / np.float32(20)
# Rows of input the searches measure output error on. With fewer input channels than that, the
# K rows of a square root of the Gram matrix stand in for all the tokens (the same error,
# exactly, at the cost of K rows); with more (w2 of 1.8B+), evenly spaced tokens, which bounds
# the search at 20 * 2 * SEARCH_ROWS * N * K flops per linear, about one GPTQ of the same weight.
SEARCH_ROWS = 2048


def search_rows(inputs: np.ndarray) -> np.ndarray:
    """Rows R [m, K] whose Gram matrix R^T R is that of `inputs` [tokens, K] (when that takes
    fewer rows), or evenly spaced tokens, SEARCH_ROWS of them: ||R d||^2 is then the output error
    of a weight error d on all the tokens, or on a sample of them."""
    tokens, k = inputs.shape
    if tokens <= SEARCH_ROWS:
        return np.asarray(inputs, np.float32)
    if k <= SEARCH_ROWS:
        # R = L^T for the Cholesky factor L; a millionth of the mean diagonal keeps a Gram
        # matrix with dead channels positive definite and moves errors by about as much.
        gram = NUMPY.gram(inputs).astype(np.float64)
        gram[np.diag_indices(k)] += 1e-6 * max(float(np.mean(np.diagonal(gram))), 1e-30)
        return np.linalg.cholesky(gram).T.astype(np.float32)
    picks = np.linspace(0, tokens - 1, SEARCH_ROWS).round().astype(int)
    return np.asarray(inputs[picks], np.float32)


def awq_scales(
    weights: list[np.ndarray], rows: np.ndarray, mean_abs: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """AWQ's scale per input channel [K] for linears that share their input (HF layout [N, K]).

    Candidates are ``mean_abs ** alpha`` for alpha in ALPHAS, normalised so that the largest
    and smallest scale multiply to 1 (AutoAWQ's rule); the winner minimises the summed output
    error ``||rows (Q(W s) / s - W)^T||^2`` of the linears, Q being quantize.py's rounding.
    `mean_abs` is the mean |input| per channel (tied channels given equal values)."""
    best, best_error = np.ones_like(mean_abs, dtype=np.float32), np.inf
    for alpha in ALPHAS:
        s = np.maximum(np.asarray(mean_abs, np.float32) ** alpha, np.float32(1e-4))
        s /= np.sqrt(s.max() * s.min())
        error = sum(output_error(_scaled_rtn(w, s, spec) - w, rows) for w in weights)
        if error < best_error:
            best, best_error = s, error
    return best


def _scaled_rtn(weight: np.ndarray, s: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Q(W s) / s: the weight as the quantized model computes with it, in the unscaled frame."""
    return dequantize(quantize(weight * s, spec)) / s


def output_error(difference: np.ndarray, rows: np.ndarray) -> float:
    """||rows difference^T||^2: the output error of a weight error on the rows' tokens."""
    y = chunked(rows, lambda c: c @ difference.T)
    return float(np.vdot(y, y))


def awq_clip(weight: np.ndarray, rows: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The weight [N, K] with each block of each row clipped to ±r max|w| of that block, r from
    CLIP_SHRINK minimising that block's share of the output error on `rows` [m, K] (AWQ's clip
    search): a narrower grid rounds the other weights of the block more finely."""
    n, k = weight.shape
    blocks = spec.blocks(k)
    w = to_blocks(weight, blocks, spec.block_size)  # [N, blocks, bs]
    x = to_blocks(rows, blocks, spec.block_size)  # [m, blocks, bs]
    # Each block's own Gram matrix [blocks, bs, bs], one plain matmul each (a stacked matmul
    # of these strided views is several times slower).
    gram = np.stack([x[:, b].T @ x[:, b] for b in range(blocks)])
    peak = np.abs(w).max(axis=-1, keepdims=True)
    best_bound, best_error = peak, np.full((n, blocks), np.inf, np.float32)
    for r in CLIP_SHRINK:
        bound = peak * r
        clipped = np.clip(w, -bound, bound).reshape(n, -1)[:, :k]
        d = to_blocks(dequantize(quantize(clipped, spec)) - weight, blocks, spec.block_size)
        d = d.transpose(1, 0, 2)  # [blocks, N, bs]
        error = np.sum((d @ gram) * d, axis=-1).T  # [N, blocks]
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_bound = np.where(better[..., None], bound, best_bound)
    return np.clip(w, -best_bound, best_bound).reshape(n, -1)[:, :k]


def tied_per_kv_head(mean_abs: np.ndarray, config: InternLM2Config) -> np.ndarray:
    """wo's input statistic averaged over the query heads of each KV head: all the heads of a
    group read the same value rows, so one scale per (KV head, channel) is all a fold into them
    can express."""
    kv, g, d = config.num_key_value_heads, config.group, config.head_dim
    per_kv = mean_abs.reshape(kv, g, d).mean(axis=1, keepdims=True)
    return np.broadcast_to(per_kv, (kv, g, d)).reshape(-1).copy()


# The linears AWQ scales together (they share an input), in the order the layer runs them.
GROUPS = (
    ("attention.wqkv",),
    ("attention.wo",),
    ("feed_forward.w1", "feed_forward.w3"),
    ("feed_forward.w2",),
)


def fold_scales(weights: LayerWeights, scales: dict, config: InternLM2Config) -> LayerWeights:
    """The layer with each group's input divided by its scale and the group's columns
    multiplied by it, which computes the same function in exact arithmetic. `scales` maps the
    names of an GROUPS entry to s [K] (a missing group keeps s = 1). The division goes into
    the RMSNorm weight before wqkv and before w1/w3, into the rows of w3 before w2 (the SwiGLU
    product is linear in w3's output) and into wqkv's value rows (and bias) before wo (attention
    output is linear in the values); wo's s must then be equal across each KV head's group."""
    linears = {name: w.copy() for name, w in weights.linears.items()}
    biases = {name: b.copy() for name, b in weights.biases.items()}
    attention_norm, ffn_norm = weights.attention_norm.copy(), weights.ffn_norm.copy()
    for names, s in scales.items():
        for name in names:
            linears[name] *= s
    if (s := scales.get(("attention.wqkv",))) is not None:
        attention_norm /= s
    if (s := scales.get(("feed_forward.w1", "feed_forward.w3"))) is not None:
        ffn_norm /= s
    if (s := scales.get(("feed_forward.w2",))) is not None:
        linears["feed_forward.w3"] /= s[:, None]
    if (s := scales.get(("attention.wo",))) is not None:
        kv, g, d = config.num_key_value_heads, config.group, config.head_dim
        per_kv = s.reshape(kv, g, d)[:, 0]  # [kv, d]
        for table in (linears, biases):
            if "attention.wqkv" in table:
                grouped = table["attention.wqkv"].reshape(kv, g + 2, d, -1)
                grouped[:, g + 1] /= per_kv[..., None]
    return LayerWeights(attention_norm, ffn_norm, linears, biases)
