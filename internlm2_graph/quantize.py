"""Block-wise weight quantization into the com.microsoft ``MatMulNBits`` layout.

One weight at a time, HF layout ``[N=out_features, K=in_features]``. Codes, scales and zero
points are identical to what onnxruntime's own quantizer (MLAS ``MlasQuantizeBlockwise``, reached
through ``MatMulNBitsQuantizer``, which the onnxruntime-genai builder uses) writes for the same
float32 weight. The one difference is the padding of a ragged K: MLAS
leaves those codes 0 or stale, we write the zero point so they dequantize to exactly 0.

``quantize_ort`` calls that C++ kernel and is kept as the oracle. ``quantize`` is a chunked,
threaded numpy port of it, 2-3x faster here: the kernel wants the weight as a contiguous
``[K, N]`` float32 array, and making that transposed copy costs more than the quantization
itself (numbers: ``benchmarks/probes/quantize_speed.py``).

Layout, with ``k_blocks = ceil(K / block_size)`` (K is zero-padded up to whole blocks):

- ``B``: uint8 ``[N, k_blocks, block_size * bits // 8]``; row n is output channel n. With 4 bits,
  element 2j of a block is the LOW nibble of byte j and element 2j+1 the high nibble.
- ``scales``: ``[N, k_blocks]`` (the shape ORT's quantizer emits; the kernel reads it flat, so
  ``scales.reshape(-1)`` works as well), same dtype as the activations: float32 here, the caller
  casts for fp16/bf16 graphs.
- ``zero_points``: uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed like ``B`` (block 2j in the
  low nibble). Only asymmetric mode stores them: without that input the kernel uses the
  midpoint ``2**(bits-1)`` (8 for int4, 128 for int8), which is what symmetric mode assumes.

Rounding rules (MLAS's, reproduced bit for bit; ``roundf`` rounds halves away from zero):

- symmetric: ``ext`` is the block's element of largest magnitude (``min`` on a tie) and
  ``scale = -ext / 2**(bits-1)``, so scales are NEGATIVE when the extreme is positive. ``ext``
  lands exactly on q=0; the opposite side gets only ``2**(bits-1) - 1`` steps, so values there
  beyond 7.5 (int4) steps are clipped by up to one step: the error bound is one step there and
  half a step everywhere else.
- asymmetric: ``lo = min(min, 0)``, ``hi = max(max, 0)``, ``scale = (hi - lo) / (2**bits - 1)``,
  ``zp = roundf(-lo / scale)``; error is at most half a step.
- both: ``q = clamp(roundf(w * (1 / scale) + zp), 0, 2**bits - 1)``; a zero scale gives q = zp.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import QuantSpec

# Source dtypes we widen to float32 chunk by chunk (checkpoints are mostly bf16).
_FLOAT_DTYPES = (
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(np.float64),
    np.dtype(ml_dtypes.bfloat16),
)
# float32 elements per work item: big enough that numpy's per-call overhead vanishes and the GIL
# is released for most of the time, small enough that a thread's temporaries (~5 chunk-sized
# arrays) stay in L2/L3 and peak memory stays far below the packed output.
CHUNK_ELEMENTS = 1 << 19
_MAX_THREADS = 8


@dataclass(frozen=True)
class QuantizedWeight:
    """One weight in MatMulNBits layout; see the module docstring for shapes and meaning."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], None if symmetric
    k: int
    n: int
    spec: QuantSpec

    @property
    def k_blocks(self) -> int:
        return self.packed.shape[1]


def levels(spec: QuantSpec) -> tuple[int, int]:
    """(largest code, midpoint): the code range is 0..qmax, the implicit zero point is mid.
    Every grid, rounding and packing step asks here (one place for a format's code range)."""
    return (1 << spec.bits) - 1, 1 << (spec.bits - 1)


def _empty_outputs(n: int, k: int, spec: QuantSpec) -> QuantizedWeight:
    return QuantizedWeight(
        packed=np.zeros(spec.packed_shape(n, k), np.uint8),
        scales=np.zeros((n, spec.blocks(k)), np.float32),
        zero_points=None if spec.symmetric else np.zeros((n, spec.zero_point_bytes(k)), np.uint8),
        k=k,
        n=n,
        spec=spec,
    )


def _check_weight(weight: np.ndarray) -> tuple[int, int]:
    if weight.ndim != 2:
        raise InternLM2GraphError(f"quantize expects a 2-D [out, in] weight, got {weight.shape}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise InternLM2GraphError(f"quantize expects a float weight, got {weight.dtype}")
    return weight.shape


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes < 16, last axis even -> bytes with element 2j low, 2j+1 high."""
    # Little-endian pairs read as uint16 are lo | hi << 8; OR-ing in a copy shifted right by 4
    # puts hi << 4 in the low byte (lo < 16 shifts to 0), and the cast keeps that low byte.
    pairs = codes.view(np.uint16)
    return (pairs | (pairs >> 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def to_blocks(rows: np.ndarray, k_blocks: int, block_size: int) -> np.ndarray:
    """float32 [rows, k_blocks, block]; zero-pads a ragged K (zeros never change which element
    is the symmetric extreme, and asymmetric ranges include 0 anyway). A view where no padding
    or cast is needed: write to a copy."""
    n, k = rows.shape
    if k == k_blocks * block_size and rows.dtype == np.float32 and rows.flags.c_contiguous:
        return rows.reshape(n, k_blocks, block_size)  # a view: no copy at all
    out = np.zeros((n, k_blocks * block_size), np.float32)
    out[:, :k] = rows
    return out.reshape(n, k_blocks, block_size)


def block_grid(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, object]:
    """Scale and zero point of blocks whose smallest and largest values are `lo` and `hi`: the
    one place the grid rule lives (module docstring). Symmetric: the zero point is the midpoint,
    returned as a float32 scalar (broadcasting a per-block array costs a pass). Asymmetric: a
    float32 array of whole numbers in 0..qmax."""
    qmax, mid = levels(spec)
    if spec.symmetric:
        ext = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        return ext * np.float32(-1.0 / mid), np.float32(mid)  # exact: a power of two
    lo = np.minimum(lo, 0)
    hi = np.maximum(hi, 0)
    scale = (hi - lo) / np.float32(qmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        zp = np.where(scale != 0, np.float32(0) - lo / scale, lo)
    # floor(v + 0.5) == roundf(v) for v >= 0, and zp >= 0 here since lo <= 0.
    return scale, np.clip(np.floor(zp + np.float32(0.5)), 0, qmax)


def reciprocal(scale: np.ndarray) -> np.ndarray:
    """1 / scale, 0 where that is not finite: a zero scale (all-zero block) and a subnormal one
    (1/scale overflows) both map the block to q = zp; the latter loses values below ~1e-37, far
    under any fp16/bf16 resolution."""
    with np.errstate(divide="ignore", over="ignore"):
        recip = np.float32(1) / scale
    recip[~np.isfinite(recip)] = 0
    return recip


def round_codes(w: np.ndarray, recip: np.ndarray, zp, qmax: int) -> np.ndarray:
    """uint8 codes in MLAS's float32 operation order: (w * recip + zp) then roundf, written as
    +0.5 and truncation after clamping to [0, qmax] (roundf for every non-negative float32)."""
    y = w * recip
    y += zp
    y += np.float32(0.5)
    np.clip(y, 0, qmax, out=y)
    return y.astype(np.uint8)


def _quantize_into(rows: np.ndarray, spec: QuantSpec, q: QuantizedWeight, start: int) -> None:
    """Quantize weight rows [start, start + len(rows)) into q's preallocated arrays."""
    qmax, mid = levels(spec)
    x = to_blocks(rows, q.k_blocks, spec.block_size)
    hi = x.max(axis=-1)
    lo = x.min(axis=-1)
    if not (np.isfinite(hi).all() and np.isfinite(lo).all()):
        raise InternLM2GraphError(
            f"weight rows {start}..{start + len(rows) - 1} contain NaN or Inf; cannot quantize"
        )
    scale, zp = block_grid(lo, hi, spec)
    if not spec.symmetric:
        zp = zp[..., None]
    codes = round_codes(x, reciprocal(scale)[..., None], zp, qmax)

    stop = start + len(rows)
    q.scales[start:stop] = scale
    q.packed[start:stop] = codes if spec.bits == 8 else _pack_nibbles(codes)
    if q.zero_points is not None:
        zp_codes = zp[..., 0].astype(np.uint8)
        if spec.bits == 4:
            if zp_codes.shape[1] % 2:  # odd k_blocks: MLAS fills the spare nibble with mid
                zp_codes = np.pad(zp_codes, ((0, 0), (0, 1)), constant_values=mid)
            zp_codes = _pack_nibbles(zp_codes)
        q.zero_points[start:stop] = zp_codes


def num_threads() -> int:
    """Threads quantize works in: the cores this process may use, at most _MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_THREADS))


def quantize(weight_out_in: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """Quantize an HF-layout [N=out, K=in] weight (float32/bf16/fp16) for MatMulNBits.

    Works in row chunks, so extra memory is the output plus a few chunk-sized float32
    temporaries per thread; the input is never copied or transposed as a whole. numpy releases
    the GIL inside its loops, so threads give a real speed-up.
    """
    n, k = _check_weight(weight_out_in)
    q = _empty_outputs(n, k, spec)
    k_padded = q.k_blocks * spec.block_size
    rows_per_chunk = max(1, CHUNK_ELEMENTS // k_padded)
    starts = range(0, n, rows_per_chunk)

    def work(start: int) -> None:
        _quantize_into(weight_out_in[start : start + rows_per_chunk], spec, q, start)

    threads = min(num_threads(), len(starts))
    if threads <= 1:
        for start in starts:
            work(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(work, starts):  # iterating re-raises a worker's exception
                pass
    return q


def quantize_ort(weight_out_in: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
    """The same quantization through onnxruntime's C++ kernel: the oracle for ``quantize``.

    The pybind wrapper (``quantize_matmul_{4,8}bits(packed, src, scales, zp, block, N, K, sym)``)
    uses each buffer's data pointer and ignores strides, and casts arrays of another dtype into
    temporaries. So a transposed VIEW silently quantizes the wrong elements, and an output of the
    wrong dtype is silently never written: ``src`` must be a C-contiguous float32 [K, N] copy and
    every output exactly the dtype and shape below. The kernel builds its own thread pool (one
    thread per physical core) on every call.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel: Callable = quantize_matmul_4bits if spec.bits == 4 else quantize_matmul_8bits
    n, k = _check_weight(weight_out_in)
    q = _empty_outputs(n, k, spec)
    # With symmetric=True the kernel never touches zero points but still wants a uint8 buffer.
    zp = q.zero_points if q.zero_points is not None else np.zeros((n, 1), np.uint8)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (q.k_blocks * spec.block_size))
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        # Chunked transpose: a whole-matrix one is 2-3x slower (cache misses) and as big as W.
        src = np.ascontiguousarray(weight_out_in[start:stop].T, dtype=np.float32)
        zp_rows = zp[start:stop] if q.zero_points is not None else zp
        kernel(
            q.packed[start:stop], src, q.scales[start:stop], zp_rows,
            spec.block_size, stop - start, k, spec.symmetric,
        )  # fmt: skip
    return q


def zero_point_codes(q: QuantizedWeight) -> np.ndarray:
    """An asymmetric weight's zero points unpacked: uint8 [N, k_blocks], one code a block."""
    codes = q.zero_points if q.spec.bits == 8 else _unpack_nibbles(q.zero_points)
    return codes[:, : q.k_blocks]


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """[N, K] float32 reference: (code - zero_point) * scale, as MatMulNBits defines it."""
    _, mid = levels(q.spec)
    codes = q.packed if q.spec.bits == 8 else _unpack_nibbles(q.packed)
    if q.zero_points is None:
        zp = np.full(q.scales.shape, mid, np.float32)
    else:
        zp = zero_point_codes(q).astype(np.float32)
    scales = q.scales.astype(np.float32).reshape(q.n, q.k_blocks)
    w = (codes.astype(np.float32) - zp[..., None]) * scales[..., None]
    return w.reshape(q.n, -1)[:, : q.k]


def matmul_nbits_initializers(q: QuantizedWeight, scales_dtype=np.float32) -> list[np.ndarray]:
    """Arrays for MatMulNBits inputs 1.. in order: B, scales, then zero_points if asymmetric.

    Input 0 (A) is the activation; ``scales_dtype`` must equal A's dtype (np.float16,
    ml_dtypes.bfloat16 or np.float32); fp16 keeps about 3 significant digits of each scale,
    fewer below 6e-5 (subnormal), and rounds scales under 3e-8 to 0. Symmetric weights
    omit zero_points entirely (the kernel's default midpoint is the one they were quantized
    with).
    """
    arrays = [q.packed, q.scales.astype(scales_dtype)]
    if q.zero_points is not None:
        arrays.append(q.zero_points)
    return arrays


def from_codes(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, spec: QuantSpec
) -> QuantizedWeight:
    """Pack codes chosen elsewhere (GPTQ, calibration/gptq.py) into the layout ``quantize`` writes.

    ``codes`` uint8 [N, K]; ``scales`` and ``zero_points`` (integers, stored as any dtype)
    [N, k_blocks]. A ragged K's padding gets the block's zero point, so it dequantizes to 0.
    """
    n, k = codes.shape
    q = _empty_outputs(n, k, spec)
    _, mid = levels(spec)
    zp = np.asarray(zero_points).astype(np.uint8)
    padded = np.repeat(zp, spec.block_size, axis=1)
    padded[:, :k] = codes
    blocks = padded.reshape(n, q.k_blocks, spec.block_size)
    q.packed[:] = blocks if spec.bits == 8 else _pack_nibbles(blocks)
    q.scales[:] = scales
    if q.zero_points is not None:
        if spec.bits == 4:
            if zp.shape[1] % 2:  # odd k_blocks: the spare nibble holds mid, as quantize writes
                zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=mid)
            zp = _pack_nibbles(np.ascontiguousarray(zp))
        q.zero_points[:] = zp
    return q
