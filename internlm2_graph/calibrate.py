"""Calibrated int4/int8 (GPTQ, AWQ) without torch: numpy, streamed one decoder layer at a time.

Round-to-nearest (quantize.py) rounds each weight on its own. GPTQ (Frantar et al. 2022,
arXiv:2210.17323) rounds the columns of a linear layer one after another and spreads each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
``H = X^T X`` of the layer's input X on calibration text: it minimises the error of the layer's
OUTPUT on that text, not of its weights.

Layout. The result must be what MatMulNBits reads, so GPTQ runs on the same block grid as RTN:
blocks of ``block_size`` consecutive input columns per output row, one scale (and zero point)
each, computed with quantize.py's rounding rules from the block's values at the moment GPTQ
reaches its first column (the standard "groupsize" GPTQ). No g_idx, no reordering: a folder
built with GPTQ decodes exactly as fast as an RTN one. With ``act_order`` the columns are
processed by decreasing Hessian diagonal but every block's scale is fixed up front ("static
groups"), so the stored layout stays the plain grid.

Float target (algo_config=gptaq). Layers quantized in turn see inputs already perturbed by the
layers before, and plain GPTQ then matches the float WEIGHT on those inputs, passing the earlier
errors on. GPTAQ runs a float copy of the hidden states beside the quantized ones and aims each
linear at the float MODEL's output on the float input (asymmetric calibration): the weight
is first mapped to the least-squares (ridge) fit of that output on the quantized input, then
rounded by plain GPTQ, which is then exactly the minimiser of the error against the float output
(float_target_map). Cost: one more float forward per layer, one more K x K Cholesky inverse per
input, and GPTAQ_TOKENS of calibration text rather than MAX_TOKENS. Only the float model's input
to each group is kept, or its output where that is smaller (w2: float_target_weight).

Streaming (`calibrate`). Calibration hidden states ``[tokens, hidden]`` plus one decoder layer's
weights are in memory at a time. Inside a layer the linears are quantized in the order they run
(wqkv; wo; w1 and w3, which share their input; w2), each Hessian taken from activations that
already went through the quantized linears before it ("true sequential"), and the quantized
layer's output feeds the next layer, so each quantized layer corrects the errors of those
before it. Results are spilled to a scratch folder, one .npz per linear, and read back when the
saver asks for that weight. The products (layer forwards, attention, Gram matrices, inverses)
and, with act_order, the grid search and GPTQ's column loop run where compute.py says: numpy, or
onnxruntime's CUDA provider for a CUDA build on a machine that has one.

AWQ (Lin et al. 2023, arXiv:2306.00978) keeps round-to-nearest but first moves each input
channel's importance into the weights: a linear's columns are multiplied by ``s`` and its input
divided by ``s``, which leaves the float model unchanged, and ``s = mean|x|^alpha`` (alpha
searched) gives the channels that carry large activations more of the grid's resolution. The
division is folded into whatever makes the input: the RMSNorm weight before wqkv and before
w1/w3, the rows of w3 before w2, and the value rows of wqkv before wo. Only those float weights
and the codes change: the graph is the same.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.compute import NUMPY, TOKEN_CHUNK, Numpy, OnnxRuntime, for_execution_provider
from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.kv_scales import attention_path, scales_from_thresholds, thresholds
from internlm2_graph.precision import KVCacheSpec, QuantSpec, Target
from internlm2_graph.progress import Progress
from internlm2_graph.quantize import QuantizedWeight, dequantize, from_codes, quantize
from internlm2_graph.rope import rotary_tables

# Calibration text is cut into sequences of this many tokens (<s> first), at most this many
# tokens in all: the layer forwards cost ~2 * parameters * tokens, the main cost of a build.
# GPTAQ takes twice as many: its maps have K^2 unknowns per linear; on SmolLM2 the doubling
# lowered its KL to fp32 by 5-12% (plain GPTQ got worse on prose with 16384, see the README).
SEQUENCE_TOKENS = 512
MAX_TOKENS = 8192
GPTAQ_TOKENS = 16384
# Fraction of the mean Hessian diagonal added to it. GPTQ's paper uses 0.01; on SmolLM2 0.1
# generalises better from calibration text to other text (prose perplexity gap to fp32 at
# block 128: 37% of RTN's, against 54% with 0.01; code unchanged).
# Tokens for KV cache scales: a float forward pass costs ~2 * parameters * tokens (1.8B: 31 s on
# 2 cores, peak RSS 0.71 GB for the whole int4 build), and a channel's largest value settles
# within a few thousand tokens.
KV_TOKENS = 2048
DAMP = 0.1
LAZY_COLUMNS = 128  # GPTQ's lazy batch: columns whose updates are applied as one matmul
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
HEAD_ROWS = 16384  # lm_head rows quantized at a time (the Hessian factor is shared)
# GPTQ's variants, measured on SmolLM2-135M (benchmarks/quant_quality.py): act_order (static
# blocks) is clearly better there; the grid search is a smaller gain at more cost.
ACT_ORDER = True
SEARCH = True
# Shrink factors searched_grid tries for a block's range (1 - 0.04 k): clipping the largest
# weights of a block a little often lowers the error of all the others.
SHRINK = np.float32(1) - np.float32(0.04) * np.arange(1, 11, dtype=np.float32)


# GPTAQ's ridge (float_target_map), times the mean Hessian diagonal. Measured on SmolLM2-135M
# (benchmarks/quant_quality.py): 1 gave the lowest prose KL of 0.1, 0.5, 1 and 2; lower ones fit
# the calibration text's own quantization errors too closely.
FLOAT_TARGET_DAMP = 1.0


# --- GPTQ, pure numpy -----------------------------------------------------------------------


def hessian_factor(
    hessian: np.ndarray,
    damp: float | None = None,
    order: np.ndarray | None = None,
    device: Numpy | OnnxRuntime = NUMPY,
    consume: bool = False,
) -> np.ndarray:
    """The upper-triangular U with ``U^T U = inverse(H + damp * mean(diag H) * I)``.

    GPTQ reads row i of U as "how column i's error spreads to the columns after it". Computed
    with one Cholesky and one triangular inverse: for the reversal P, ``P chol(P H P) P = R`` is
    upper triangular with ``H = R R^T``, so ``U = R^-1``. `order` permutes columns first
    (act_order). Inputs that never fire (zero diagonal) get a unit diagonal: their columns are
    then rounded to nearest with nothing to compensate. `device` runs the products. With
    `consume`, `hessian` (float32, C order) is the caller's to lose: it is permuted and
    overwritten in place rather than copied (a 7B w2 Hessian is 0.8 GB, at the build's peak).
    """
    flipped = np.arange(len(hessian))[::-1] if order is None else np.asarray(order)[::-1]
    if consume:
        h = _permute_in_place(hessian, flipped)
    else:  # one float32 copy, already permuted and reversed
        h = np.asarray(hessian, dtype=np.float32)[np.ix_(flipped, flipped)]
    diag = np.diagonal(h).copy()
    diag[diag <= 0] = 1.0
    damp = DAMP if damp is None else damp
    h[np.diag_indices_from(h)] = diag + damp * float(np.mean(diag))
    try:
        inverse = _cholesky_inverse(h, device)
    except np.linalg.LinAlgError:
        raise InternLM2GraphError(
            "GPTQ: the calibration Hessian is not positive definite even after dampening; "
            "the calibration data is degenerate, give more varied calibration_data"
        ) from None
    del h
    return _reverse_in_place(inverse)


def _permute_in_place(a: np.ndarray, order: np.ndarray) -> np.ndarray:
    """a[order][:, order], overwriting the square `a`: rows by following the permutation's
    cycles (one row in hand), then columns a slab of rows at a time."""
    done = np.zeros(len(a), bool)
    for start in range(len(a)):
        if done[start] or order[start] == start:
            continue
        held, i = a[start].copy(), start
        while order[i] != start:
            a[i], done[i], i = a[order[i]], True, order[i]
        a[i], done[i] = held, True
    for row in range(0, len(a), 512):
        a[row : row + 512] = a[row : row + 512][:, order]
    return a


def _reverse_in_place(a: np.ndarray) -> np.ndarray:
    """a[::-1, ::-1] of the square `a`, in its own memory (C order)."""
    n = len(a)
    for i in range(n // 2):
        held = a[i, ::-1].copy()
        a[i] = a[n - 1 - i, ::-1]
        a[n - 1 - i] = held
    if n % 2:
        a[n // 2] = a[n // 2, ::-1].copy()
    return a


def _cholesky_inverse(h: np.ndarray, device: Numpy | OnnxRuntime = NUMPY) -> np.ndarray:
    """inverse(L) for the lower Cholesky factor L of h, recursively by 2x2 blocks, so that
    nearly all the work is matmuls (numpy's Cholesky and inverse are several times slower):
    with L = [[A, 0], [B, C]], B = H21 A^-T and C = chol(H22 - B B^T), and
    L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. Each block goes into the result as soon as it is
    known, so a level holds little more than the result itself."""
    n = h.shape[0]
    if n <= 512:
        return np.tril(np.linalg.inv(np.linalg.cholesky(h)))
    m = n // 2
    out = np.zeros_like(h)
    out[:m, :m] = _cholesky_inverse(h[:m, :m], device)
    a_inv = out[:m, :m]
    b = device.matmul(h[m:, :m], a_inv, transpose_b=True)
    out[m:, m:] = _cholesky_inverse(h[m:, m:] - device.matmul(b, b, transpose_b=True), device)
    out[m:, :m] = -device.matmul(out[m:, m:], device.matmul(b, a_inv))
    return out


def block_grid(block: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of ``block`` [block_size, N] (transposed weights), by
    quantize.py's rules (symmetric: the extreme lands on code 0; asymmetric: [min, max]
    including 0, a 4-bit integer zero point). float32 [N] each."""
    qmax, mid = (1 << spec.bits) - 1, 1 << (spec.bits - 1)
    hi = block.max(axis=0)
    lo = block.min(axis=0)
    if spec.symmetric:
        ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        return ext * np.float32(-1.0 / mid), np.full(hi.shape, mid, np.float32)
    lo = np.minimum(lo, 0)
    hi = np.maximum(hi, 0)
    scale = (hi - lo) / np.float32(qmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(scale != 0, np.float32(0) - lo / scale, lo)
    return scale, np.clip(np.floor(zp + np.float32(0.5)), 0, qmax).astype(np.float32)


def searched_grid(
    block: np.ndarray, spec: QuantSpec, importance: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The grid (scale, zero point per column of ``block`` [block_size, N]) that minimises the
    rounding error weighted by ``importance`` [block_size] (the Hessian's diagonal: how much
    each input moves the output), among block_grid's and narrowed ones that clip the extremes.

    Symmetric candidates map the block's extreme to the lowest code (block_grid's choice) or to
    the highest, times a shrink factor; asymmetric ones shrink the low end, the high end or
    both. The layout is unchanged: only the values of scale and zero point differ.
    """
    qmax, mid = (1 << spec.bits) - 1, 1 << (spec.bits - 1)
    best_scale, best_zp = block_grid(block, spec)
    best = _grid_error(block, best_scale, best_zp, importance, qmax)
    hi = block.max(axis=0)
    lo = block.min(axis=0)
    candidates = []
    if spec.symmetric:
        ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        zp = np.full(hi.shape, mid, np.float32)
        for r in SHRINK:
            candidates.append((ext * np.float32(-r / mid), zp))
            candidates.append((ext * np.float32(r / (mid - 1)), zp))
    else:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        for r in SHRINK:
            for a, b in ((r, r), (r, 1), (1, r)):
                scale = (hi * np.float32(b) - lo * np.float32(a)) / np.float32(qmax)
                with np.errstate(divide="ignore", invalid="ignore"):
                    zp = np.where(scale != 0, -(lo * np.float32(a)) / scale, 0)
                zp = np.clip(np.floor(zp + np.float32(0.5)), 0, qmax).astype(np.float32)
                candidates.append((scale.astype(np.float32), zp))
    for scale, zp in candidates:
        error = _grid_error(block, scale, zp, importance, qmax)
        better = error < best
        best = np.where(better, error, best)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def search_candidates(spec: QuantSpec) -> tuple:
    """searched_grid's candidates as factors (compute.searched_grid_graph), in its order."""
    mid = 1 << (spec.bits - 1)
    if spec.symmetric:
        pairs = ((np.float32(-r / mid), np.float32(r / (mid - 1))) for r in SHRINK)
        return (np.float32(-1.0 / mid), *(f for pair in pairs for f in pair))
    one = np.float32(1)
    triples = (((r, r), (r, one), (one, r)) for r in SHRINK)
    return ((one, one), *(ab for triple in triples for ab in triple))


def _grid_error(block, scale, zp, importance, qmax) -> np.ndarray:
    restored = (_round(block, _reciprocal(scale), zp, qmax) - zp) * scale
    restored -= block
    restored *= restored
    return importance @ restored


def _round(w: np.ndarray, recip: np.ndarray, zp: np.ndarray, qmax: int) -> np.ndarray:
    """Codes as quantize.py (and MLAS) round: clamp(w * (1/scale) + zp + 0.5, 0, qmax), cut."""
    y = w * recip
    y += zp
    y += np.float32(0.5)
    np.clip(y, 0, qmax, out=y)
    return y.astype(np.uint8)


def _reciprocal(scale: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        recip = np.float32(1) / scale
    recip[~np.isfinite(recip)] = 0
    return recip


def gptq(
    weight: np.ndarray,
    factor: np.ndarray,
    spec: QuantSpec,
    order: np.ndarray | None = None,
    importance: np.ndarray | None = None,
    device: Numpy | OnnxRuntime = NUMPY,
) -> QuantizedWeight:
    """GPTQ of an HF-layout [N=out, K=in] weight on MatMulNBits' block grid.

    `factor` is ``hessian_factor(H, order=order)`` of the weight's input; rows are independent,
    so a big weight can be done in row chunks with one factor. Without `order`, each block's
    scale comes from its values as updated by the error feedback of the blocks before it. With
    `order` (act_order: a permutation of the K columns), scales are fixed from the original
    weight first and columns are rounded in that order. With `importance` (the Hessian's
    diagonal, in the weight's column order) each block's grid is searched (searched_grid)
    rather than taken from its range. On an onnxruntime `device`, act_order's column loop
    runs there (compute.OnnxRuntime.gptq_columns: the same rounding, another float order).
    """
    n, k = weight.shape
    bs, qmax = spec.block_size, (1 << spec.bits) - 1
    k_blocks = -(-k // bs)
    wt = np.array(weight.T, dtype=np.float32, order="C")  # [K, N]: a column is a row here
    codes = np.empty((k, n), np.uint8)
    on_device = isinstance(device, OnnxRuntime)

    def grid(block: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
        if importance is None:
            return block_grid(block, spec)
        return searched_grid(block, spec, importance[first : first + len(block)])

    if order is not None:
        # Static blocks: every grid up front, searched on the device in one graph, or in
        # threads (elementwise numpy releases the GIL).
        if importance is not None and k % bs == 0 and on_device:
            scales, zero_points = device.searched_grids(wt, importance, bs, qmax, spec.symmetric,
                                                        search_candidates(spec))  # fmt: skip
        else:
            with ThreadPoolExecutor(THREADS) as pool:
                grids = list(
                    pool.map(lambda b: grid(wt[b * bs : (b + 1) * bs], b * bs), range(k_blocks))
                )
            scales = np.stack([g[0] for g in grids])
            zero_points = np.stack([g[1] for g in grids])
        recips = _reciprocal(scales)
        wt = wt[order]
        positions = np.asarray(order)
    else:
        scales = np.empty((k_blocks, n), np.float32)
        zero_points = np.empty((k_blocks, n), np.float32)
        recips = np.empty_like(scales)
        positions = np.arange(k)

    lazy = max(LAZY_COLUMNS, bs)  # a multiple of bs: a block never straddles two batches
    if order is not None and on_device:
        # Static grids: the whole column loop can run on the device, batch by batch.
        codes[positions] = device.gptq_columns(wt, factor, scales, zero_points, recips,
                                               positions // bs, qmax, lazy)  # fmt: skip
        return from_codes(codes.T, scales.T, zero_points.T, spec)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        err = np.empty((i2 - i1, n), np.float32)
        for i in range(i1, i2):
            column = positions[i]
            b = column // bs
            if order is None and column % bs == 0:
                scales[b], zero_points[b] = grid(wt[i : i + bs], i)
                recips[b] = _reciprocal(scales[b])
            w = wt[i]
            q = _round(w, recips[b], zero_points[b], qmax)
            codes[column] = q
            e = (w - (q - zero_points[b]) * scales[b]) / factor[i, i]
            err[i - i1] = e
            if i + 1 < i2:
                wt[i + 1 : i2] -= factor[i, i + 1 : i2, None] * e[None, :]
        if i2 < k:
            wt[i2:] -= factor[i1:i2, i2:].T @ err
    return from_codes(codes.T, scales.T, zero_points.T, spec)


def float_target_map(
    float_inputs: np.ndarray,
    inputs: np.ndarray,
    gram: np.ndarray,
    device: Numpy | OnnxRuntime = NUMPY,
) -> np.ndarray:
    """M [K, K] such that GPTQ of ``W M^T`` on `inputs` X~ (the quantized model's) minimises
    the error against the FLOAT model's output X W^T on its own inputs `float_inputs` X.

    GPTQ on X~ alone makes each linear match what the float weight would give on the already
    perturbed input, so earlier layers' errors pass through. Asymmetric calibration (GPTAQ, Li
    et al. 2025) aims at X W^T instead; since the least-squares residual
    of ``X W^T ~ X~ W*^T`` is orthogonal to X~'s columns, ``|X W^T - X~ Q^T|^2 = |X W^T -
    X~ W*^T|^2 + |X~ (W* - Q)^T|^2`` for any Q, so plain GPTQ of W* minimises it. W* is solved
    with GPTQ's dampening as a pull towards W (ridge): ``(H~ + l I) W*^T = X~^T X W^T + l W^T``,
    l = FLOAT_TARGET_DAMP * mean(diag H~); with X = X~, W* = W. `gram` is H~ = X~^T X~.
    """
    solve, ridge = _ridge_solver(gram, device)
    cross = device.gram(inputs, float_inputs)  # X~^T X
    cross[np.diag_indices_from(cross)] += ridge
    return solve(cross)  # W*^T = M W^T


def float_target_weight(
    weight: np.ndarray,
    float_outputs: np.ndarray,
    inputs: np.ndarray,
    gram: np.ndarray,
    device: Numpy | OnnxRuntime = NUMPY,
) -> np.ndarray:
    """W* of float_target_map from the float model's outputs X W^T [tokens, N] rather than its
    inputs: N right-hand sides instead of K, and a smaller recording when N < K (w2)."""
    solve, ridge = _ridge_solver(gram, device)
    rhs = device.gram(inputs, float_outputs)
    rhs += ridge * weight.T
    del weight  # the caller's last reference may be this one
    return solve(rhs).T


def _ridge_solver(gram: np.ndarray, device: Numpy | OnnxRuntime):
    """``rhs -> (H~ + l I)^-1 rhs`` and l, through the Cholesky inverse L^-1 of the system
    (``(H~ + l I)^-1 = L^-T L^-1``): all matmuls, on `device`. `gram` is borrowed: its
    diagonal is raised for the factorisation and put back as it was."""
    diagonal = np.diagonal(gram).copy()
    ridge = FLOAT_TARGET_DAMP * max(float(np.mean(diagonal)), 1e-30)
    gram[np.diag_indices_from(gram)] += ridge
    try:
        inverse = _cholesky_inverse(gram, device)
    finally:
        gram[np.diag_indices_from(gram)] = diagonal
    return lambda rhs: device.matmul(inverse, device.matmul(inverse, rhs), transpose_a=True), ridge


def act_order(hessian: np.ndarray) -> np.ndarray:
    """Columns by decreasing Hessian diagonal (stable): GPTQ's act_order."""
    return np.argsort(-np.diagonal(hessian), kind="stable")


# --- AWQ, pure numpy --------------------------------------------------------------------------

# AutoAWQ's grids. Exponents 0, 0.05, ..., 0.95: alpha = 0 is s = 1, plain round-to-nearest, so
# the search never ends worse than RTN on the tokens it sees. Clip: a block's largest |w| times
# 1, 0.95, ..., 0.55 (r = 1 is no clipping).
AWQ_ALPHAS = np.arange(20, dtype=np.float32) / np.float32(20)
AWQ_SHRINK = np.float32(1) - np.arange(10, dtype=np.float32) / np.float32(20)
# Rows of input the searches measure output error on. With fewer input channels than that, the
# K rows of a square root of the Gram matrix stand in for all the tokens (the same error,
# exactly, at the cost of K rows); with more (w2 of 1.8B+), evenly spaced tokens, which bounds
# the search at 20 * 2 * AWQ_ROWS * N * K flops per linear, about one GPTQ of the same weight.
AWQ_ROWS = 2048
# Measured on SmolLM2-135M (benchmarks/quant_quality.py).
AWQ_CLIP = True
# Scale wo's input, one scale per KV head, folded into wqkv's value rows: on SmolLM2 it lowers
# wo's output error on held-out text by 2-5% (and on calibration text by 7-9%).
AWQ_WO = True
# The lm_head (a fifth of SmolLM2's weights) is rounded by GPTQ, as algo_config=gptq rounds it:
# with an int4 RTN head AWQ kept 82% of RTN's prose gap at block 128, see the README. "rtn":
# left to the saver.
AWQ_HEAD = "gptq"
AWQ_ROUNDING = "rtn"  # "gptq": GPTQ rounds the scaled weights (an ablation, not an option)


def search_rows(inputs: np.ndarray) -> np.ndarray:
    """Rows R [m, K] whose Gram matrix R^T R is that of `inputs` [tokens, K] (when that takes
    fewer rows), or evenly spaced tokens, AWQ_ROWS of them: ||R d||^2 is then the output error
    of a weight error d on all the tokens, or on a sample of them."""
    tokens, k = inputs.shape
    if tokens <= AWQ_ROWS:
        return np.asarray(inputs, np.float32)
    if k <= AWQ_ROWS:
        # R = L^T for the Cholesky factor L; a millionth of the mean diagonal keeps a Gram
        # matrix with dead channels positive definite and moves errors by about as much.
        gram = NUMPY.gram(inputs).astype(np.float64)
        gram[np.diag_indices(k)] += 1e-6 * max(float(np.mean(np.diagonal(gram))), 1e-30)
        return np.linalg.cholesky(gram).T.astype(np.float32)
    return np.asarray(inputs[np.linspace(0, tokens - 1, AWQ_ROWS).round().astype(int)], np.float32)


def awq_scales(
    weights: list[np.ndarray], rows: np.ndarray, mean_abs: np.ndarray, spec: QuantSpec
) -> np.ndarray:
    """AWQ's scale per input channel [K] for linears that share their input (HF layout [N, K]).

    Candidates are ``mean_abs ** alpha`` for alpha in AWQ_ALPHAS, normalised so that the largest
    and smallest scale multiply to 1 (AutoAWQ's rule); the winner minimises the summed output
    error ``||rows (Q(W s) / s - W)^T||^2`` of the linears, Q being quantize.py's rounding.
    `mean_abs` is the mean |input| per channel (tied channels given equal values)."""
    best, best_error = np.ones_like(mean_abs, dtype=np.float32), np.inf
    for alpha in AWQ_ALPHAS:
        s = np.maximum(np.asarray(mean_abs, np.float32) ** alpha, np.float32(1e-4))
        s /= np.sqrt(s.max() * s.min())
        error = sum(_output_error(_scaled_rtn(w, s, spec) - w, rows) for w in weights)
        if error < best_error:
            best, best_error = s, error
    return best


def _scaled_rtn(weight: np.ndarray, s: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Q(W s) / s: the weight as the quantized model computes with it, in the unscaled frame."""
    return dequantize(quantize(weight * s, spec)) / s


def _output_error(difference: np.ndarray, rows: np.ndarray) -> float:
    y = _chunked(rows, lambda c: c @ difference.T)
    return float(np.vdot(y, y))


def awq_clip(weight: np.ndarray, rows: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The weight [N, K] with each block of each row clipped to ±r max|w| of that block, r from
    AWQ_SHRINK minimising that block's share of the output error on `rows` [m, K] (AWQ's clip
    search): a narrower grid rounds the other weights of the block more finely."""
    n, k = weight.shape
    blocks = spec.blocks(k)
    w = _to_blocks(weight, blocks, spec.block_size)  # [N, blocks, bs]
    x = _to_blocks(rows, blocks, spec.block_size)  # [m, blocks, bs]
    # Each block's own Gram matrix [blocks, bs, bs], one plain matmul each (a stacked matmul
    # of these strided views is several times slower).
    gram = np.stack([x[:, b].T @ x[:, b] for b in range(blocks)])
    peak = np.abs(w).max(axis=-1, keepdims=True)
    best_bound, best_error = peak, np.full((n, blocks), np.inf, np.float32)
    for r in AWQ_SHRINK:
        bound = peak * r
        clipped = np.clip(w, -bound, bound).reshape(n, -1)[:, :k]
        d = _to_blocks(dequantize(quantize(clipped, spec)) - weight, blocks, spec.block_size)
        d = d.transpose(1, 0, 2)  # [blocks, N, bs]
        error = np.sum((d @ gram) * d, axis=-1).T  # [N, blocks]
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_bound = np.where(better[..., None], bound, best_bound)
    return np.clip(w, -best_bound, best_bound).reshape(n, -1)[:, :k]


def _to_blocks(a: np.ndarray, blocks: int, block_size: int) -> np.ndarray:
    """[rows, K] float32 -> [rows, blocks, block_size], a ragged K zero-padded."""
    out = np.zeros((a.shape[0], blocks * block_size), np.float32)
    out[:, : a.shape[1]] = a
    return out.reshape(a.shape[0], blocks, block_size)


def tied_per_kv_head(mean_abs: np.ndarray, config: InternLM2Config) -> np.ndarray:
    """wo's input statistic averaged over the query heads of each KV head: all the heads of a
    group read the same value rows, so one scale per (KV head, channel) is all a fold into them
    can express."""
    kv, g, d = config.num_key_value_heads, config.group, config.head_dim
    per_kv = mean_abs.reshape(kv, g, d).mean(axis=1, keepdims=True)
    return np.broadcast_to(per_kv, (kv, g, d)).reshape(-1).copy()


# The linears AWQ scales together (they share an input), in the order the layer runs them.
AWQ_GROUPS = (
    ("attention.wqkv",),
    ("attention.wo",),
    ("feed_forward.w1", "feed_forward.w3"),
    ("feed_forward.w2",),
)


def fold_scales(weights: _Weights, scales: dict, config: InternLM2Config) -> _Weights:
    """The layer with each group's input divided by its scale and the group's columns
    multiplied by it, which computes the same function in exact arithmetic. `scales` maps the
    names of an AWQ_GROUPS entry to s [K] (a missing group keeps s = 1). The division goes into
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
    return _Weights(attention_norm, ffn_norm, linears, biases)


# --- calibration data -----------------------------------------------------------------------


def token_budget(algorithm: str) -> int:
    """How many calibration tokens `algorithm` takes by default (module constants, read now)."""
    return GPTAQ_TOKENS if algorithm == "gptaq" else MAX_TOKENS


def calibration_tokens(
    option: str | None,
    checkpoint_dir: Path,
    config: InternLM2Config,
    max_tokens: int | None = None,
) -> list[np.ndarray]:
    """The calibration sequences (int64 ids, <s> first) for `calibration_data=option`.

    A JSON file holding a list of id lists is used as given (sequences longer than
    SEQUENCE_TOKENS are cut); any other file is UTF-8 text, tokenized with the checkpoint's own
    tokenizer. Without the option: docstrings of this Python's standard library (every install
    ships them; technical English prose). At most `max_tokens` (default MAX_TOKENS) in all.
    """
    max_tokens = MAX_TOKENS if max_tokens is None else max_tokens
    if option is None:
        text = default_text()
        ids = _encode(text, checkpoint_dir, "the default calibration text")
        return chop(ids, config, max_tokens)
    path = Path(option).expanduser()
    where = f"--extra_options calibration_data={option}"
    if not path.is_file():
        raise InternLM2GraphError(
            f"{where}: no such file; give a UTF-8 text file or a JSON list of token-id lists"
        )
    raw = path.read_bytes()
    if not raw.strip():
        raise InternLM2GraphError(
            f"{where}: the file is empty; give a few thousand tokens of text like your prompts"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InternLM2GraphError(
            f"{where}: not UTF-8 text (byte {err.start}); save it as UTF-8 or pass a JSON list "
            "of token-id lists"
        ) from None
    if path.suffix.lower() == ".json" or text.lstrip().startswith("[["):
        return _id_lists(text, where, config, max_tokens)
    ids = _encode(text, checkpoint_dir, where)
    if len(ids) < 2:
        raise InternLM2GraphError(f"{where}: the text gives fewer than 2 tokens; give more text")
    return chop(ids, config, max_tokens)


def _id_lists(text: str, where: str, config: InternLM2Config, max_tokens: int) -> list:
    try:
        lists = json.loads(text)
    except ValueError as err:
        raise InternLM2GraphError(f"{where}: not valid JSON ({err})") from None
    ok = (
        isinstance(lists, list)
        and lists
        and all(isinstance(s, list) and s for s in lists)
        and all(isinstance(i, int) and not isinstance(i, bool) for s in lists for i in s)
    )
    if not ok:
        raise InternLM2GraphError(
            f"{where}: expected a JSON list of non-empty lists of token ids, e.g. [[1, 422, 9]]"
        )
    sequences, total = [], 0
    for row, seq in enumerate(lists):
        ids = np.asarray(seq, dtype=np.int64)
        if (bad := _outside_vocabulary(ids, config)) is not None:
            raise InternLM2GraphError(
                f"{where}: id {bad} in list {row} is outside the vocabulary "
                f"(0..{config.vocab_size - 1}); tokenize with this checkpoint's tokenizer"
            )
        length = _sequence_tokens(config)
        for start in range(0, len(ids), length):
            part = ids[start : start + length][: max_tokens - total]
            if len(part):
                sequences.append(part)
                total += len(part)
    return sequences


def _outside_vocabulary(ids: np.ndarray, config: InternLM2Config) -> int | None:
    """The first id without an embedding row, or None."""
    bad = (ids < 0) | (ids >= config.vocab_size)
    return int(ids[bad][0]) if bad.any() else None


def _encode(text: str, checkpoint_dir: Path, where: str) -> np.ndarray:
    model = Path(checkpoint_dir) / "tokenizer.model"
    if model.is_file():
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(model))
        ids = processor.encode(text)
    elif (Path(checkpoint_dir) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(checkpoint_dir) / "tokenizer.json"))
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        raise InternLM2GraphError(
            f"{where}: the checkpoint has no tokenizer.model to tokenize it; pass "
            "calibration_data=FILE.json, a JSON list of token-id lists"
        )
    return np.asarray(ids, dtype=np.int64)


def chop(ids: np.ndarray, config: InternLM2Config, max_tokens: int) -> list[np.ndarray]:
    """<s> + pieces of the stream, SEQUENCE_TOKENS each, max_tokens in all, taken evenly
    spaced from the whole stream (the whole text is sampled, not only its beginning)."""
    if (bad := _outside_vocabulary(ids, config)) is not None:
        raise InternLM2GraphError(
            f"calibration_data: the tokenizer gives id {bad}, outside the model's "
            f"vocabulary (0..{config.vocab_size - 1}); the tokenizer and weights disagree"
        )
    length = _sequence_tokens(config)
    starts = range(0, len(ids), length - 1)
    keep = max(1, max_tokens // length)
    if len(starts) > keep:
        starts = [starts[i] for i in np.linspace(0, len(starts) - 1, keep).round().astype(int)]
    return [
        np.concatenate([[config.bos_token_id], ids[start : start + length - 1]]).astype(np.int64)
        for start in starts
    ]


def _sequence_tokens(config: InternLM2Config) -> int:
    return min(SEQUENCE_TOKENS, config.max_position_embeddings)


@functools.lru_cache(maxsize=1)
def default_text(per_module: int = 3000) -> str:
    """Prose and code that every Python install ships: for each module of the standard library
    (in name order), its docstrings (the module's, then its classes' and functions') up to half
    of `per_module` characters, then its source from the first class or function on, about
    `per_module` characters in all. English technical prose and Python code, about half each
    (module docstrings alone made it a fifth prose, and prose was where int4 lost most), from
    some two hundred modules; the same Python version gives the same text, hence the same build.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = _docstrings(tree)
        first = next((n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))), None)
        code = "" if first is None else "\n".join(source.splitlines()[first.lineno - 1 :])
        text = (doc[: per_module // 2] + "\n\n" + code)[:per_module].strip()
        if len(text) > 200:
            parts.append(text)
    if sum(map(len, parts)) < 50_000:
        raise InternLM2GraphError(
            "calibration_data: this Python install ships no standard library sources to "
            "calibrate on; pass calibration_data=PATH (text like your prompts)"
        )
    return "\n\n".join(parts)


def _docstrings(tree: ast.Module) -> str:
    """The module's docstring, then those of its classes and functions (ast.walk's order)."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return "\n\n".join(d for d in docs if d)


# --- the layer-by-layer driver --------------------------------------------------------------


class Calibrated:
    """Quantized weights by linear path ("model.layers.3.attention.wqkv", "output"), in the
    checkpoint's row order, kept on disk in `folder` until the saver asks for them; and float
    tensors that calibration changed (AWQ's folded norm weights), by checkpoint tensor name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.paths: set[str] = set()
        self.floats: set[str] = set()

    def __contains__(self, path: str) -> bool:
        return path in self.paths

    def save_float(self, name: str, array: np.ndarray) -> None:
        """Replace checkpoint tensor `name` (same shape, checkpoint row order) in the build."""
        np.save(self.folder / f"{name}.npy", np.asarray(array, np.float32))
        self.floats.add(name)

    def load_float(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    def save(self, path: str, q: QuantizedWeight) -> None:
        arrays = {"packed": q.packed, "scales": q.scales}
        if q.zero_points is not None:
            arrays["zero_points"] = q.zero_points
        np.savez(self.folder / f"{path}.npz", **arrays)
        self.paths.add(path)

    def save_rows(self, path: str, parts: list[QuantizedWeight]) -> None:
        first = parts[0]
        joined = QuantizedWeight(
            packed=np.concatenate([p.packed for p in parts]),
            scales=np.concatenate([p.scales for p in parts]),
            zero_points=None
            if first.zero_points is None
            else np.concatenate([p.zero_points for p in parts]),
            k=first.k,
            n=sum(p.n for p in parts),
            spec=first.spec,
        )
        self.save(path, joined)

    def load(self, path: str, k: int, spec: QuantSpec) -> QuantizedWeight:
        with np.load(self.folder / f"{path}.npz") as data:
            packed, scales = data["packed"], data["scales"]
            zero_points = data.get("zero_points")
        return QuantizedWeight(packed, scales, zero_points, k=k, n=len(packed), spec=spec)


@dataclass
class _Weights:
    """One layer's float32 weights, HF layout; wqkv in its grouped rows."""

    attention_norm: np.ndarray
    ffn_norm: np.ndarray
    linears: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]


def calibrate(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    body: QuantSpec,
    head: QuantSpec | None,
    scratch: Path,
    progress: Progress | None = None,
    order: bool | None = None,
    search: bool | None = None,
    device: Numpy | OnnxRuntime = NUMPY,
    float_target: bool = False,
) -> Calibrated:
    """GPTQ every linear of the model, streaming one layer at a time; see the module docstring.

    `body` is the spec of the decoder's linears, or a function of a linear's checkpoint path
    giving its spec (tensor_precision); `head` the lm_head's (None: kept float or tied).
    `order` (act_order) and `search` (searched_grid) default to ACT_ORDER and SEARCH. `device`
    runs the products (compute.py). `float_target`: GPTAQ, each linear aimed at the float
    model's output (float_target_map).
    """
    order = ACT_ORDER if order is None else order
    search = SEARCH if search is None else search
    result = Calibrated(scratch)
    spec_of = body if callable(body) else lambda _path: body

    floats = {}  # float_target: the float model's hidden states, a second stream beside x

    def layer(n, weights, x, lengths, cos, sin):
        prefix = f"model.layers.{n}"
        targets = None
        if float_target:
            targets, by_output = {}, set()

            def record(inputs, *names):
                # What float_target_* needs of each group, the smaller of X and X W^T: w2's
                # output (N < K) is caught by `output` as the float pass computes it.
                ws = [weights.linears[name] for name in names]
                if len(ws) == 1 and len(ws[0]) < inputs.shape[1]:
                    by_output.add(names[0])
                else:
                    targets[names] = inputs
                return ws

            def output(name, y):
                if name in by_output:
                    targets[(name,)] = FloatOutputs(y)

            floats["x"] = _layer(weights, floats.get("x", x), lengths, config, cos, sin, record,
                                 device=device, on_output=output)  # fmt: skip
        return _quantize_layer(
            prefix,
            weights,
            x,
            lengths,
            config,
            cos,
            sin,
            spec_of,
            result,
            order,
            search,
            device,
            targets,
        )

    def lm_head(h):
        float_h = None
        if float_target:
            norm = checkpoint["model.norm.weight"].read()
            float_h = _rmsnorm(floats.pop("x"), norm, config.rms_norm_eps)
        _gptq_head(checkpoint, h, head, result, order, search, device, float_h)

    task = "calibrating (gptaq)" if float_target else "calibrating (gptq)"
    _streamed(checkpoint, config, sequences, progress, task, layer,
              lm_head if head is not None else None)  # fmt: skip
    return result


def _streamed(checkpoint, config, sequences, progress, task, layer, head=None) -> np.ndarray:
    """The calibration sequences through every decoder layer, one layer's weights in memory at
    a time: `layer(n, weights, x, lengths, cos, sin)` returns layer n's output. With `head`,
    it is handed the final norm's output (one more progress step) and nothing is returned;
    without, the last layer's output is."""
    progress = progress or Progress(quiet=True)
    lengths = [len(s) for s in sequences]
    x = _embed(checkpoint, np.concatenate(sequences))
    cos, sin = rotary_tables(config, max(lengths))
    layers = config.num_hidden_layers
    steps = layers + (head is not None)
    with progress.task(task, unit="layers", each=True) as update:
        for n in range(layers):
            x = layer(n, _read_layer(checkpoint, config, n), x, lengths, cos, sin)
            update(_Named(f"layer {n}"), n, steps)
        if head is None:
            return x
        h = _rmsnorm(x, checkpoint["model.norm.weight"].read(), config.rms_norm_eps)
        del x
        head(h)
        update(_Named("lm_head"), steps - 1, steps)
    return None


def _gptq_head(checkpoint, h, head, result, order, search, device=NUMPY, float_h=None) -> None:
    """GPTQ the lm_head on its input h (the final norm's output), HEAD_ROWS rows at a time;
    towards the float model's logits on its own final norm output `float_h`, if given."""
    gram = device.gram(h)
    target = None if float_h is None else float_target_map(float_h, h, gram, device)
    factor, perm, importance = _prepare(gram, order, search, device)
    del gram
    ref = checkpoint["output.weight"]

    def rows(start):
        w = ref.read_rows(start, start + HEAD_ROWS)
        return w if target is None else device.matmul(w, target, transpose_b=True)

    parts = [
        gptq(rows(start), factor, head, perm, importance, device)
        for start in range(0, ref.shape[0], HEAD_ROWS)
    ]
    result.save_rows("output", parts)


@dataclass(frozen=True)
class _Named:
    name: str


def _embed(checkpoint: Checkpoint, ids: np.ndarray) -> np.ndarray:
    """Embedding rows of `ids`, reading the table a slice at a time (it is the largest)."""
    ref = checkpoint["model.tok_embeddings.weight"]
    out = np.empty((len(ids), ref.shape[1]), np.float32)
    step = max(1, (64 << 20) // (4 * ref.shape[1]))
    for start in range(0, ref.shape[0], step):
        hit = (ids >= start) & (ids < start + step)
        if hit.any():
            out[hit] = ref.read_rows(start, start + step)[ids[hit] - start]
    return out


def _read_layer(checkpoint: Checkpoint, config: InternLM2Config, n: int) -> _Weights:
    p = f"model.layers.{n}."
    names = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3")
    names += ("feed_forward.w2",)
    biases = {}
    if config.bias:
        for name in ("attention.wqkv", "attention.wo"):
            biases[name] = checkpoint[p + name + ".bias"].read()
    return _Weights(
        attention_norm=checkpoint[p + "attention_norm.weight"].read(),
        ffn_norm=checkpoint[p + "ffn_norm.weight"].read(),
        linears={name: checkpoint[p + name + ".weight"].read() for name in names},
        biases=biases,
    )


def _prepare(gram: np.ndarray, order: bool, search: bool, device=NUMPY):
    """GPTQ's factor, column order and grid importance for a weight whose input has the Gram
    matrix (Hessian) `gram`, which is used up (overwritten: hessian_factor's `consume`)."""
    perm = act_order(gram) if order else None
    importance = np.diagonal(gram).copy() if search else None
    return hessian_factor(gram, order=perm, device=device, consume=True), perm, importance


@dataclass
class FloatOutputs:
    """The float model's output of a linear, recorded instead of its input when that is
    smaller (float_target_weight)."""

    output: np.ndarray


def _quantize_layer(
    prefix, weights, x, lengths, config, cos, sin, spec, result, order, search, device,
    targets=None,
):  # fmt: skip
    """GPTQ the layer's linears in the order they run; returns the quantized layer's output.
    `spec(path)` is the format of the linear at checkpoint path `path`.
    `targets` maps each group of names to the float model's input to it, or FloatOutputs
    (float_target_map)."""

    def quantized(inputs: np.ndarray, *names: str) -> list[np.ndarray]:
        """GPTQ `names` (sharing `inputs`), save them, return their dequantized weights."""
        gram = device.gram(inputs)
        ws = [weights.linears[each] for each in names]
        for each in names:
            weights.linears[each] = None  # ws holds the float weights now
        if targets is not None:  # before GPTQ's own factor: one K x K inverse at a time
            aim = targets.pop(names)
            if isinstance(aim, FloatOutputs):
                ws = [float_target_weight(ws.pop(), aim.output, inputs, gram, device)]
            else:
                target = float_target_map(aim, inputs, gram, device)
                ws = [device.matmul(w, target, transpose_b=True) for w in ws]
                del target
            del aim
        factor, perm, importance = _prepare(gram, order, search, device)
        del gram
        out = []
        for i, each in enumerate(names):
            q = gptq(ws[i], factor, spec(f"{prefix}.{each}"), perm, importance, device)
            ws[i] = None
            result.save(f"{prefix}.{each}", q)
            out.append(dequantize(q))
        return out

    return _layer(weights, x, lengths, config, cos, sin, quantized, device=device)


def awq(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    body: QuantSpec,
    head: QuantSpec | None,
    scratch: Path,
    progress: Progress | None = None,
    fold_values: bool = True,
) -> Calibrated:
    """AWQ every decoder linear, streaming one layer at a time (see the module docstring); the
    folded norm weights and wqkv biases are kept as float overrides. The lm_head is rounded as
    AWQ_HEAD says (GPTQ on the quantized model's last hidden states, or left to the saver).
    Without `fold_values`, wo's input is not scaled and the values stay the float model's."""
    result = Calibrated(scratch)

    def layer(n, weights, x, lengths, cos, sin):
        prefix, fold = f"model.layers.{n}", fold_values and AWQ_WO
        return _awq_layer(prefix, weights, x, lengths, config, cos, sin, body, result, fold)

    def lm_head(h):
        _gptq_head(checkpoint, h, head, result, ACT_ORDER, SEARCH)

    gptq_head = head is not None and AWQ_HEAD == "gptq"
    _streamed(checkpoint, config, sequences, progress, "calibrating (awq)", layer,
              lm_head if gptq_head else None)  # fmt: skip
    return result


def _awq_layer(prefix, weights, x, lengths, config, cos, sin, spec, result, fold_values):
    """AWQ one layer: a float pass records each group's input, the scales are searched on it
    (AutoAWQ's recipe: every group against the float layer) and folded, then a pass through
    the quantized layer gives the next layer's input."""
    seen = {}

    def record(inputs: np.ndarray, *names: str) -> list[np.ndarray]:
        mean_abs = np.mean(np.abs(inputs), axis=0)
        if names == ("attention.wo",):
            mean_abs = tied_per_kv_head(mean_abs, config)
        seen[names] = (mean_abs, search_rows(inputs))
        return [weights.linears[name] for name in names]

    _layer(weights, x, lengths, config, cos, sin, record)
    scales = {
        names: awq_scales([weights.linears[n] for n in names], rows, mean_abs, spec)
        for names, (mean_abs, rows) in seen.items()
        if fold_values or names != ("attention.wo",)
    }
    folded = fold_scales(weights, scales, config)
    weights.linears.clear()  # the folded copies replace the float weights
    result.save_float(f"{prefix}.attention_norm.weight", folded.attention_norm)
    result.save_float(f"{prefix}.ffn_norm.weight", folded.ffn_norm)
    if "attention.wqkv" in folded.biases and ("attention.wo",) in scales:
        result.save_float(f"{prefix}.attention.wqkv.bias", folded.biases["attention.wqkv"])

    def quantized(inputs: np.ndarray, *names: str) -> list[np.ndarray]:
        """Round `names` (clipped first), save them, return their dequantized weights."""
        if AWQ_ROUNDING == "gptq":
            factor, perm, importance = _prepare(NUMPY.gram(inputs), ACT_ORDER, SEARCH)
        out = []
        for name in names:
            weight = folded.linears[name]
            if AWQ_ROUNDING == "gptq":
                q = gptq(weight, factor, spec, perm, importance)
            else:
                if AWQ_CLIP:
                    s = scales.get(names, np.float32(1))
                    weight = _clipped(name, weight, seen[names][1] / s, spec, config)
                q = quantize(weight, spec)
            result.save(f"{prefix}.{name}", q)
            out.append(dequantize(q))
            folded.linears[name] = None  # free the float weight
        return out

    return _layer(folded, x, lengths, config, cos, sin, quantized)


def _clipped(name, weight, rows, spec, config) -> np.ndarray:
    """awq_clip of a weight; of wqkv only the value rows, as AutoAWQ: the query and key rows'
    error reaches the output through softmax, which a linear output error misjudges."""
    if name != "attention.wqkv":
        return awq_clip(weight, rows, spec)
    kv, g, d = config.num_key_value_heads, config.group, config.head_dim
    grouped = weight.reshape(kv, g + 2, d, -1).copy()
    values = grouped[:, g + 1].reshape(kv * d, -1)
    grouped[:, g + 1] = awq_clip(values, rows, spec).reshape(kv, d, -1)
    return grouped.reshape(weight.shape)


def calibrated_weights(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    target: Target,
    scratch: Path,
    progress: Progress | None = None,
) -> Calibrated:
    """The weights of a calibrated algo_config (gptq, awq; "rtn" is the saver's own)."""
    # A tied head reads the embedding's codes (rounded to nearest): nothing to calibrate.
    body, head = target.quant, None if target.tied_head else target.lm_head_quant
    if target.algorithm in ("gptq", "gptaq"):
        device = for_execution_provider(target.execution_provider)
        specs = target.linear_spec if target.tensor_rules else body
        return calibrate(checkpoint, config, sequences, specs, head, scratch, progress,
                         device=device, float_target=target.algorithm == "gptaq")  # fmt: skip
    # A quantized KV cache stores the values with scales taken from the float model's values
    # (calibrate_kv_cache, or a scale file): AWQ must leave them, and so wo, unscaled.
    fold_values = target.kv_cache is None
    return awq(checkpoint, config, sequences, body, head, scratch, progress, fold_values)


def _layer(weights, x, lengths, config, cos, sin, take, on_kv=None, device=NUMPY,
           on_output=None) -> np.ndarray:  # fmt: skip
    """One decoder layer on the calibration hidden states x [tokens, hidden]; returns its output.

    `take(inputs, *names)` gives the weights of the linears `names`, which all read `inputs`
    (GPTQ quantizes them there; a float pass hands them back as they are). `on_kv(keys,
    values)` sees the layer's keys, before rotary, and values: [tokens, kv_heads, head_dim].
    `on_output(name, y)` sees the outputs of wqkv, wo and w2, before bias. `device` runs the
    linears, `device.token_chunk` tokens at a time.
    """
    eps = config.rms_norm_eps

    def linear(a: np.ndarray, w: np.ndarray, name: str) -> np.ndarray:
        y = _chunked(a, lambda c: device.linear(c, w), device.token_chunk)
        if on_output is not None:
            on_output(name, y)
        bias = weights.biases.get(name)
        return y if bias is None else y + bias

    h = _rmsnorm(x, weights.attention_norm, eps)
    (wqkv,) = take(h, "attention.wqkv")
    qkv = linear(h, wqkv, "attention.wqkv")
    if on_kv is not None:
        g = config.group
        grouped = qkv.reshape(len(qkv), config.num_key_value_heads, g + 2, config.head_dim)
        on_kv(grouped[:, :, g], grouped[:, :, g + 1])
    attended = _attention(qkv, lengths, config, cos, sin, device)
    del h, wqkv, qkv
    (wo,) = take(attended, "attention.wo")
    x = x + linear(attended, wo, "attention.wo")
    del attended, wo
    h = _rmsnorm(x, weights.ffn_norm, eps)
    w1, w3 = take(h, "feed_forward.w1", "feed_forward.w3")
    act = np.empty((len(h), w1.shape[0]), np.float32)
    for start in range(0, len(h), device.token_chunk):
        c = h[start : start + device.token_chunk]
        _swiglu(device.linear(c, w1), device.linear(c, w3), act[start : start + len(c)])
    del h, w1, w3
    (w2,) = take(act, "feed_forward.w2")
    x += linear(act, w2, "feed_forward.w2")
    return x


def first_tokens(sequences: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first sequences, up to `count` tokens in all (at least one sequence)."""
    chosen, total = [], 0
    for sequence in sequences:
        if chosen and total + len(sequence) > count:
            break
        chosen.append(sequence)
        total += len(sequence)
    return chosen


def calibrate_kv_cache(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    spec: KVCacheSpec,
    progress: Progress | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scales of a quantized KV cache from the float model's keys and values on the calibration
    text (kv_scales.thresholds: a key channel pair's norm bounds it at every position), streamed
    one decoder layer at a time."""
    scales = {}

    def keep(n: int, keys: np.ndarray, values: np.ndarray) -> None:
        scales[attention_path(n)] = scales_from_thresholds(*thresholds(keys, values), spec)

    float_forward(checkpoint, config, sequences, keep, progress, "calibrating the KV cache")
    return scales


def float_forward(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    on_kv: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    progress: Progress | None = None,
    task: str = "float forward",
) -> np.ndarray:
    """The checkpoint's own float32 model on `sequences` (each from position 0), one decoder
    layer in memory at a time: the last layer's hidden states [tokens, hidden], before the
    final norm. `on_kv(layer, keys, values)` sees each layer's keys (before rotary) and values.
    """

    def layer(n, weights, x, lengths, cos, sin):
        def as_read(inputs, *names):
            return [weights.linears[name] for name in names]

        def seen(keys, values):
            on_kv(n, keys, values)

        return _layer(weights, x, lengths, config, cos, sin, as_read, on_kv and seen)

    return _streamed(checkpoint, config, sequences, progress, task, layer)


def _chunked(
    a: np.ndarray, f: Callable[[np.ndarray], np.ndarray], chunk: int = TOKEN_CHUNK
) -> np.ndarray:
    return np.concatenate([f(a[s : s + chunk]) for s in range(0, len(a), chunk)])


def _swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    def rows(i: int, j: int) -> np.ndarray:
        return gate[i:j] / (1 + np.exp(-gate[i:j])) * up[i:j]

    _in_threads(rows, out)


def _rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    def rows(i: int, j: int) -> np.ndarray:
        a = x[i:j]
        return (a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + eps)) * weight

    return _in_threads(rows, np.empty(x.shape, np.result_type(x, weight)))


def _in_threads(f: Callable, out: np.ndarray, rows: int = 1024) -> np.ndarray:
    """out[i:j] = f(i, j) for slices of `rows` rows, in THREADS threads: a row-wise elementwise
    step over all calibration tokens is seconds of one core otherwise, while the products run
    on many (numpy's elementwise ops release the GIL; the bytes are one call's)."""

    def one(start: int) -> None:
        out[start : start + rows] = f(start, min(start + rows, len(out)))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, range(0, len(out), rows)))
    return out


def _sequences(lengths: list[int]) -> Iterator[tuple[int, int]]:
    start = 0
    for length in lengths:
        yield start, start + length
        start += length


def _attention(qkv, lengths, config: InternLM2Config, cos, sin, device=NUMPY) -> np.ndarray:
    """Causal GQA with rotate-half RoPE on grouped wqkv outputs, one sequence at a time (the
    rotary here, the rest on `device`)."""
    kv, g, d = config.num_key_value_heads, config.group, config.head_dim
    out = np.empty((len(qkv), config.num_attention_heads * d), np.float32)

    def one(span: tuple[int, int]) -> None:
        start, stop = span
        length = stop - start
        grouped = qkv[start:stop].reshape(length, kv, g + 2, d).transpose(1, 2, 0, 3)
        c = np.concatenate([cos[:length], cos[:length]], axis=-1)
        s = np.concatenate([sin[:length], sin[:length]], axis=-1)
        q = _rotate(grouped[:, :g], c, s)  # [kv, g, L, d]
        k = _rotate(grouped[:, g], c, s)  # [kv, L, d]
        attended = device.attention(q, k, grouped[:, g + 1])  # [kv, g, L, d]
        out[start:stop] = attended.transpose(2, 0, 1, 3).reshape(length, -1)

    with ThreadPoolExecutor(device.attention_threads) as pool:
        list(pool.map(one, _sequences(lengths)))
    return out


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
