"""GPTQ and GPTAQ without torch: each linear's columns rounded in turn on MatMulNBits' grid.

Round-to-nearest (quantize.py) rounds each weight on its own. GPTQ (Frantar et al. 2022,
arXiv:2210.17323) rounds the columns of a linear layer one after another and spreads each
column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
``H = X^T X`` of the layer's input X on calibration text: it minimises the error of the layer's
OUTPUT on that text, not of its weights.

Layout. The result must be what MatMulNBits reads, so GPTQ runs on the same block grid as RTN:
blocks of ``block_size`` consecutive input columns per output row, one scale (and zero point)
each, computed with quantize.py's rule (quantize.block_grid) from the block's values at the
moment GPTQ reaches its first column (the standard "groupsize" GPTQ). No g_idx, no reordering: a
folder built with GPTQ decodes exactly as fast as an RTN one. With ``act_order`` the columns are
processed by decreasing Hessian diagonal but every block's scale is fixed up front ("static
groups"), so the stored layout stays the plain grid.

Float aim (algo_config=gptaq). Layers quantized in turn see inputs already perturbed by the
layers before, and plain GPTQ then matches the float WEIGHT on those inputs, passing the earlier
errors on. GPTAQ runs a float copy of the hidden states beside the quantized ones and aims each
linear at the float MODEL's output on the float input (asymmetric calibration): the weight
is first mapped to the least-squares (ridge) fit of that output on the quantized input, then
rounded by plain GPTQ, which is then exactly the minimiser of the error against the float output
(float_aim_map). Cost: one more float forward per layer, one more K x K Cholesky inverse per
input, and twice the calibration tokens (recipes.GPTAQ_TOKENS).

The products (Gram matrices, inverses) and, with act_order, the grid search and the column loop
run where compute.py says: numpy, or onnxruntime's CUDA provider for a CUDA build on a machine
that has one. The per-layer driver is drivers.py; the options are a recipes.GPTQ.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from internlm2_graph.calibration.compute import NUMPY, Numpy, OnnxRuntime
from internlm2_graph.calibration.forward import THREADS
from internlm2_graph.calibration.recipes import GPTQ
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import QuantSpec
from internlm2_graph.quantize import (
    QuantizedWeight,
    from_codes,
    levels,
    reciprocal,
    round_codes,
)
from internlm2_graph.quantize import (
    block_grid as grid_of_range,
)

LAZY_COLUMNS = 128  # GPTQ's lazy batch: columns whose updates are applied as one matmul
# Shrink factors searched_grid tries for a block's range (1 - 0.04 k): clipping the largest
# weights of a block a little often lowers the error of all the others.
SHRINK = np.float32(1) - np.float32(0.04) * np.arange(1, 11, dtype=np.float32)
Device = Numpy | OnnxRuntime


class Factor(NamedTuple):
    """What GPTQ needs of a weight's input: the Hessian factor, the column order (act_order,
    or None) and the grid search's importance (the Hessian diagonal, or None)."""

    factor: np.ndarray
    order: np.ndarray | None
    importance: np.ndarray | None


def factor_for(gram: np.ndarray, recipe: GPTQ, device: Device = NUMPY) -> Factor:
    """GPTQ's factor, column order and grid importance for a weight whose input has the Gram
    matrix (Hessian) `gram`, which is used up (overwritten: hessian_factor's `consume`)."""
    order = act_order(gram) if recipe.act_order else None
    importance = np.diagonal(gram).copy() if recipe.search else None
    factor = hessian_factor(gram, recipe.damp, order, device, consume=True)
    return Factor(factor, order, importance)


def hessian_factor(
    hessian: np.ndarray,
    damp: float = GPTQ.damp,
    order: np.ndarray | None = None,
    device: Device = NUMPY,
    consume: bool = False,
) -> np.ndarray:
    """The upper-triangular U with ``U^T U = inverse(H + damp * mean(diag H) * I)``.

    GPTQ reads row i of U as "how column i's error spreads to the columns after it". Computed
    with one Cholesky and one triangular inverse: for the reversal P, ``P chol(P H P) P = R`` is
    upper triangular with ``H = R R^T``, so ``U = R^-1``. `order` permutes columns first
    (act_order); `damp` is the recipe's. Inputs that never fire (zero diagonal) get a unit
    diagonal: their columns are then rounded to nearest with nothing to compensate. `device`
    runs the products. With `consume`, `hessian` (float32, C order) is the caller's to lose:
    it is permuted and overwritten in place rather than copied (a 7B w2 Hessian is 0.8 GB, at
    the build's peak).
    """
    flipped = np.arange(len(hessian))[::-1] if order is None else np.asarray(order)[::-1]
    if consume:
        h = _permute_in_place(hessian, flipped)
    else:  # one float32 copy, already permuted and reversed
        h = np.asarray(hessian, dtype=np.float32)[np.ix_(flipped, flipped)]
    diag = np.diagonal(h).copy()
    diag[diag <= 0] = 1.0
    h[np.diag_indices_from(h)] = diag + damp * float(np.mean(diag))
    try:
        inverse = cholesky_inverse(h, device)
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


def cholesky_inverse(h: np.ndarray, device: Device = NUMPY) -> np.ndarray:
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
    out[:m, :m] = cholesky_inverse(h[:m, :m], device)
    a_inv = out[:m, :m]
    b = device.matmul(h[m:, :m], a_inv, transpose_b=True)
    out[m:, m:] = cholesky_inverse(h[m:, m:] - device.matmul(b, b, transpose_b=True), device)
    out[m:, :m] = -device.matmul(out[m:, m:], device.matmul(b, a_inv))
    return out


def block_grid(block: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per column of ``block`` [block_size, N] (transposed weights), by
    quantize.py's rule (quantize.block_grid). float32 [N] each."""
    scale, zero_point = grid_of_range(block.min(axis=0), block.max(axis=0), spec)
    return scale, np.broadcast_to(zero_point, scale.shape).astype(np.float32)


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
    qmax, mid = levels(spec)
    best_scale, best_zp = block_grid(block, spec)
    best = grid_error(block, best_scale, best_zp, importance, qmax)
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
        error = grid_error(block, scale, zp, importance, qmax)
        better = error < best
        best = np.where(better, error, best)
        best_scale = np.where(better, scale, best_scale)
        best_zp = np.where(better, zp, best_zp)
    return best_scale, best_zp


def search_candidates(spec: QuantSpec) -> tuple:
    """searched_grid's candidates as factors (compute.searched_grid_graph), in its order."""
    mid = levels(spec)[1]
    if spec.symmetric:
        pairs = ((np.float32(-r / mid), np.float32(r / (mid - 1))) for r in SHRINK)
        return (np.float32(-1.0 / mid), *(f for pair in pairs for f in pair))
    one = np.float32(1)
    triples = (((r, r), (r, one), (one, r)) for r in SHRINK)
    return ((one, one), *(ab for triple in triples for ab in triple))


def grid_error(block, scale, zp, importance, qmax) -> np.ndarray:
    """The rounding error of each column of `block` on the grid (scale, zp), weighted by
    `importance` per row."""
    restored = (round_codes(block, reciprocal(scale), zp, qmax) - zp) * scale
    restored -= block
    restored *= restored
    return importance @ restored


def gptq(
    weight: np.ndarray,
    factor: np.ndarray,
    spec: QuantSpec,
    order: np.ndarray | None = None,
    importance: np.ndarray | None = None,
    device: Device = NUMPY,
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
    bs, qmax = spec.block_size, levels(spec)[0]
    wt = np.array(weight.T, dtype=np.float32, order="C")  # [K, N]: a column is a row here

    def grid(block: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
        if importance is None:
            return block_grid(block, spec)
        return searched_grid(block, spec, importance[first : first + len(block)])

    lazy = max(LAZY_COLUMNS, bs)  # a multiple of bs: a block never straddles two batches
    if order is None:
        k_blocks = -(-k // bs)
        scales = np.empty((k_blocks, n), np.float32)
        zero_points = np.empty((k_blocks, n), np.float32)
        codes = _columns(wt, factor, spec, scales, zero_points, np.arange(k), lazy, grid)
        return from_codes(codes.T, scales.T, zero_points.T, spec)
    scales, zero_points = _static_grids(wt, spec, importance, device, grid)
    wt = wt[order]
    positions = np.asarray(order)
    if isinstance(device, OnnxRuntime):  # static grids: the whole loop runs on the device
        codes = np.empty((k, n), np.uint8)
        codes[positions] = device.gptq_columns(wt, factor, scales, zero_points,
                                               reciprocal(scales), positions // bs, qmax,
                                               lazy)  # fmt: skip
    else:
        codes = _columns(wt, factor, spec, scales, zero_points, positions, lazy)
    return from_codes(codes.T, scales.T, zero_points.T, spec)


def _static_grids(wt, spec, importance, device, grid) -> tuple[np.ndarray, np.ndarray]:
    """act_order's grids, every block's up front from the original weight `wt` [K, N]: searched
    on the device in one graph, or in threads (elementwise numpy releases the GIL)."""
    k, bs = len(wt), spec.block_size
    if importance is not None and k % bs == 0 and isinstance(device, OnnxRuntime):
        return device.searched_grids(wt, importance, bs, levels(spec)[0], spec.symmetric,
                                     search_candidates(spec))  # fmt: skip
    with ThreadPoolExecutor(THREADS) as pool:
        grids = list(pool.map(lambda b: grid(wt[b * bs : (b + 1) * bs], b * bs),
                              range(-(-k // bs))))  # fmt: skip
    return np.stack([g[0] for g in grids]), np.stack([g[1] for g in grids])


def _columns(wt, factor, spec, scales, zero_points, positions, lazy, regrid=None) -> np.ndarray:
    """GPTQ's column loop on `wt` [K, N] (rows in processing order; row i is column
    positions[i]): round each, spread its error over the rows after it, a lazy batch's updates
    to the rest as one matmul. With `regrid(block, i)`, a block's grid is taken when the loop
    reaches its first column (filling `scales` and `zero_points`); without, they are fixed.
    Returns the codes [K, N] by column."""
    k, n = wt.shape
    bs, qmax = spec.block_size, levels(spec)[0]
    codes = np.empty((k, n), np.uint8)
    recips = np.empty_like(scales) if regrid is not None else reciprocal(scales)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        err = np.empty((i2 - i1, n), np.float32)
        for i in range(i1, i2):
            column = positions[i]
            b = column // bs
            if regrid is not None and column % bs == 0:
                scales[b], zero_points[b] = regrid(wt[i : i + bs], i)
                recips[b] = reciprocal(scales[b])
            w = wt[i]
            q = round_codes(w, recips[b], zero_points[b], qmax)
            codes[column] = q
            e = (w - (q - zero_points[b]) * scales[b]) / factor[i, i]
            err[i - i1] = e
            if i + 1 < i2:
                wt[i + 1 : i2] -= factor[i, i + 1 : i2, None] * e[None, :]
        if i2 < k:
            wt[i2:] -= factor[i1:i2, i2:].T @ err
    return codes


def float_aim_map(
    float_inputs: np.ndarray,
    inputs: np.ndarray,
    gram: np.ndarray,
    device: Device = NUMPY,
    *,
    ridge: float = GPTQ.aim_ridge,
) -> np.ndarray:
    """M [K, K] such that GPTQ of ``W M^T`` on `inputs` X~ (the quantized model's) minimises
    the error against the FLOAT model's output X W^T on its own inputs `float_inputs` X.

    GPTQ on X~ alone makes each linear match what the float weight would give on the already
    perturbed input, so earlier layers' errors pass through. Asymmetric calibration (GPTAQ, Li
    et al. 2025) aims at X W^T instead; since the least-squares residual
    of ``X W^T ~ X~ W*^T`` is orthogonal to X~'s columns, ``|X W^T - X~ Q^T|^2 = |X W^T -
    X~ W*^T|^2 + |X~ (W* - Q)^T|^2`` for any Q, so plain GPTQ of W* minimises it. W* is solved
    with GPTQ's dampening as a pull towards W (ridge): ``(H~ + l I) W*^T = X~^T X W^T + l W^T``,
    l = `ridge` * mean(diag H~); with X = X~, W* = W. `gram` is H~ = X~^T X~.
    """
    solve, amount = _ridge_solver(gram, ridge, device)
    cross = device.gram(inputs, float_inputs)  # X~^T X
    cross[np.diag_indices_from(cross)] += amount
    return solve(cross)  # W*^T = M W^T


def float_aim_weight(
    weight: np.ndarray,
    float_outputs: np.ndarray,
    inputs: np.ndarray,
    gram: np.ndarray,
    device: Device = NUMPY,
    *,
    ridge: float = GPTQ.aim_ridge,
) -> np.ndarray:
    """W* of float_aim_map from the float model's outputs X W^T [tokens, N] rather than its
    inputs: N right-hand sides instead of K, and a smaller recording when N < K (w2)."""
    solve, amount = _ridge_solver(gram, ridge, device)
    rhs = device.gram(inputs, float_outputs)
    rhs += amount * weight.T
    del weight  # the caller's last reference may be this one
    return solve(rhs).T


def _ridge_solver(gram: np.ndarray, factor: float, device: Device):
    """``rhs -> (H~ + l I)^-1 rhs`` and l (`factor` times the mean diagonal), through the
    Cholesky inverse L^-1 of the system (``(H~ + l I)^-1 = L^-T L^-1``): all matmuls, on
    `device`. `gram` is borrowed: its diagonal is raised for the factorisation and put back as
    it was."""
    diagonal = np.diagonal(gram).copy()
    ridge = factor * max(float(np.mean(diagonal)), 1e-30)
    gram[np.diag_indices_from(gram)] += ridge
    try:
        inverse = cholesky_inverse(gram, device)
    finally:
        gram[np.diag_indices_from(gram)] = diagonal
    return lambda rhs: device.matmul(inverse, device.matmul(inverse, rhs), transpose_a=True), ridge


def act_order(hessian: np.ndarray) -> np.ndarray:
    """Columns by decreasing Hessian diagonal (stable): GPTQ's act_order."""
    return np.argsort(-np.diagonal(hessian), kind="stable")
