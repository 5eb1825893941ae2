"""Checkpoint tensors -> graph initializers: pure per-tensor transforms and lazy binding.

Every graph parameter is named after the checkpoint tensor it comes from, so binding needs no
mapping table: a module's path is the tensor's prefix. Data is produced only when the saver asks
for it, one tensor (or one block of rows) at a time.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import ml_dtypes
import numpy as np
import onnx_ir as ir

from internlm2_graph import modules, prequantized
from internlm2_graph.calibration.store import Calibrated
from internlm2_graph.checkpoint import Checkpoint, TensorRef, wrong_dtype
from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import QuantSpec
from internlm2_graph.quantize import QuantizedWeight, quantize, zero_point_codes
from internlm2_graph.rope import rotary_rows

NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.dtype(np.float32),
    ir.DataType.FLOAT16: np.dtype(np.float16),
    ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
# Rows per slice when transposing or quantizing a large matrix: bounds the fp32 working set.
SLICE_BYTES = 64 * 1024 * 1024

# Transposed matrices larger than this (the float lm_head) are saved a block at a time too.
STREAM_BYTES = 4 * SLICE_BYTES


# --- pure transforms ------------------------------------------------------------------------


def split_wqkv(
    wqkv: np.ndarray, config: InternLM2Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """InternLM2's grouped rows -> (q, k, v), each in standard head order.

    Rows are grouped by KV head: [kv_heads, group + 2, head_dim]; in each group come `group`
    query heads, then that group's key head, then its value head. Works for weight and bias.
    """
    kv, g, d = config.num_key_value_heads, config.group, config.head_dim
    rest = wqkv.shape[1:]
    grouped = wqkv.reshape(kv, g + 2, d, *rest)
    q = grouped[:, :g].reshape(kv * g * d, *rest)
    k = grouped[:, g].reshape(kv * d, *rest)
    v = grouped[:, g + 1].reshape(kv * d, *rest)
    return q, k, v


def wqkv_to_qkv(wqkv: np.ndarray, config: InternLM2Config) -> np.ndarray:
    """Grouped wqkv rows reordered to [Q | K | V], the packed layout GroupQueryAttention reads."""
    return np.concatenate(split_wqkv(wqkv, config), axis=0)


def qkv_order(config: InternLM2Config) -> np.ndarray:
    """Row r of the [Q | K | V] layout is row order[r] of the grouped wqkv: the regrouping is a
    row permutation, so it can be read a slice at a time instead of done to the whole tensor."""
    rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    return wqkv_to_qkv(np.arange(rows), config)


# --- sources: where a parameter's rows come from ------------------------------------------


class Source(Protocol):
    """A parameter's data in the checkpoint's [out, in] row order, read a slice at a time."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32."""
        ...


@dataclass(frozen=True)
class CheckpointRows:
    """One checkpoint tensor as it is stored, checked for NaN/Inf as it is read."""

    ref: TensorRef
    allow_nonfinite: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    def rows(self, start: int, stop: int) -> np.ndarray:
        block = self.ref.read_rows(start, stop)
        if not np.isfinite(block).all():
            message = (
                f"{self.ref.path}: tensor {self.ref.name} contains NaN or Inf values; the "
                "checkpoint is damaged (pass --allow_nonfinite to convert it anyway)"
            )
            if not self.allow_nonfinite:
                raise InternLM2GraphError(message)
            warnings.warn(message, stacklevel=2)
        return block


@dataclass(frozen=True)
class PermutedRows:
    """Another source's rows in another order (wqkv regrouped to [Q | K | V]); a slice reads
    the runs of consecutive rows it maps to (one per head), never the whole tensor."""

    source: Source
    order: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def rows(self, start: int, stop: int) -> np.ndarray:
        index = self.order[start:stop]
        runs = np.split(index, np.flatnonzero(np.diff(index) != 1) + 1)
        return np.concatenate([self.source.rows(int(r[0]), int(r[-1]) + 1) for r in runs])


@dataclass(frozen=True)
class CalibratedRows:
    """A checkpoint tensor, or the float replacement calibration saved for it (AWQ folds its
    scales into norm weights and wqkv's bias). Looked up when read: calibration runs after
    binding, just before the save."""

    source: Source
    name: str
    calibrated: Callable[[], Calibrated | None]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def rows(self, start: int, stop: int) -> np.ndarray:
        calibrated = self.calibrated()
        if calibrated is None or self.name not in calibrated.floats:
            return self.source.rows(start, stop)
        return np.array(calibrated.load_float(self.name)[start:stop])


@dataclass(frozen=True)
class RotaryRows:
    """The rotary cos (index 0) or sin (index 1) table, computed a slice of positions at a time."""

    config: InternLM2Config
    shape: tuple[int, int]
    index: int

    def rows(self, start: int, stop: int) -> np.ndarray:
        return rotary_rows(self.config, start, stop)[self.index]


class Once:
    """A value computed on its first `take` and handed out `takers` times, then dropped.

    The saver asks for a quantized weight's packed codes, scales and zero points separately,
    possibly from several threads: the weight is quantized once, and lives only until its
    last part has been taken (a later take computes it again).
    """

    def __init__(self, compute: Callable[[], object], takers: int) -> None:
        self._compute, self._takers = compute, takers
        self._lock = threading.Lock()
        self._value, self._left = None, 0

    def take(self):
        with self._lock:
            if self._left == 0:
                self._value, self._left = self._compute(), self._takers
            value = self._value
            self._left -= 1
            if self._left == 0:
                self._value = None
            return value


# --- lazy binding ---------------------------------------------------------------------------


class WeightBinder:
    """Attaches a lazy tensor to every graph parameter; nothing is read until the saver asks.

    The graph is the list of tensors: each module names the checkpoint tensor it needs by its
    own path, and binding checks that tensor's shape against the parameter it fills, so a
    mismatched checkpoint fails here, before anything is written.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        config: InternLM2Config,
        allow_nonfinite: bool = False,
        kv_scales: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        calibrated: Calibrated | None = None,
        layout: prequantized.Layout | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        # A pre-quantized checkpoint's format: its packed linears are read code for code.
        self.layout = layout
        self.config = config
        self.allow_nonfinite = allow_nonfinite
        self.kv_scales = kv_scales or {}
        # Calibrated weights (calibration/: GPTQ, AWQ); may be set after bind(), before saving.
        self.calibrated = calibrated

    def bind(self, root: modules.InternLM2ForCausalLM) -> None:
        for path, module in root.named_modules():
            if isinstance(module, modules.QuantizedLinear):
                self._bind_quantized(path, module)
            elif isinstance(module, modules.QuantizedEmbedding):
                self._bind_quantized_embedding(path, module)
            elif isinstance(module, modules.Linear):
                self._bind_linear(path, module)
            elif isinstance(module, (modules.RMSNorm, modules.Embedding)):
                source = self.source(f"{path}.weight", tuple(module.weight.shape.numpy()))
                module.weight.const_value = RowStreamedTensor(source, module.weight)
            elif isinstance(module, modules.Rotary):
                self._bind_rotary(module)
            elif isinstance(module, modules.Attention) and module.kv_cache is not None:
                k_scale, v_scale = self.kv_scales[path]
                module.k_scale.const_value = ir.tensor(k_scale, name=module.k_scale.name)
                module.v_scale.const_value = ir.tensor(v_scale, name=module.v_scale.name)

    def source(self, name: str, shape: tuple[int, ...]) -> Source:
        """The checkpoint tensor `name`, which must have `shape`, in graph row order."""
        packed = self._packed(name.removesuffix(".weight"))
        if packed is not None:  # stored 4-bit: its exactly dequantized rows
            source = prequantized.DequantizedRows(
                self.checkpoint, self.layout, name.removesuffix(".weight"), packed, shape
            )
            return self._in_graph_order(name, source)
        ref = self.checkpoint[name]
        if ref.shape != shape:
            raise InternLM2GraphError(
                f"{ref.path}: tensor {name} has shape {list(ref.shape)}, but config.json implies "
                f"{list(shape)}; the config and the weights are from different models"
            )
        if not ref.is_float:
            raise wrong_dtype(ref.path, name, ref.dtype)
        source = CalibratedRows(
            CheckpointRows(ref, self.allow_nonfinite), name, lambda: self.calibrated
        )
        return self._in_graph_order(name, source)

    def _packed(self, module: str) -> prequantized.Scheme | None:
        """How a pre-quantized checkpoint stores linear layer `module`; None when in float."""
        if self.layout is None or not prequantized.is_linear(module):
            return None
        return self.layout.scheme(module)

    def _in_graph_order(self, name: str, source: Source) -> Source:
        if name.endswith("attention.wqkv.weight") or name.endswith("attention.wqkv.bias"):
            return PermutedRows(source, qkv_order(self.config))
        return source

    def _bind_linear(self, path: str, module: modules.Linear) -> None:
        source = self.source(f"{path}.weight", (module.out_features, module.in_features))
        weight = module.weight
        if source.shape[0] * source.shape[1] * NUMPY_DTYPES[weight.dtype].itemsize > STREAM_BYTES:
            weight.const_value = TransposedStreamedTensor(source, weight)
        else:
            _attach(weight, lambda: transposed(source, weight))
        self._bind_bias(path, module)

    def _bind_bias(self, path: str, module: modules.Linear | modules.QuantizedLinear) -> None:
        if module.bias is not None:
            source = self.source(f"{path}.bias", (module.out_features,))
            _attach(module.bias, lambda: _as(source.rows(0, source.shape[0]), module.bias))

    def _bind_quantized(self, path: str, module: modules.QuantizedLinear) -> None:
        source = self.source(f"{path}.weight", (module.out_features, module.in_features))
        parts = [p for p in (module.weight, module.scales, module.zero_points) if p is not None]
        quantized = Once(lambda: self._quantized(path, source, module), len(parts))
        _attach(module.weight, lambda: quantized.take().packed)
        _attach(module.scales, lambda: _as(quantized.take().scales.reshape(-1), module.scales))
        if module.zero_points is not None:
            _attach(module.zero_points, lambda: quantized.take().zero_points.reshape(-1))
        if module.input_order is not None:  # act-order: read once, small ([K] int64)
            _attach(module.input_order, lambda: self._input_order(path, module))
        self._bind_bias(path, module)

    def _input_order(self, path: str, module) -> np.ndarray:
        scheme = self._packed(path)
        return prequantized.read_input_order(
            self.checkpoint, self.layout, path, scheme, module.in_features
        )

    def _bind_quantized_embedding(self, path: str, module: modules.QuantizedEmbedding) -> None:
        # Round to nearest: a table lookup has no input statistics for GPTQ to use.
        source = self.source(f"{path}.weight", (module.vocab, module.hidden))
        parts = [p for p in (module.weight, module.scales, module.zero_points) if p is not None]
        quantized = Once(lambda: quantize_source(source, module.spec), len(parts))
        _attach(module.weight, lambda: quantized.take().packed)
        _attach(module.scales, lambda: _as(quantized.take().scales.reshape(-1), module.scales))
        if module.zero_points is not None:
            _attach(module.zero_points, lambda: embedding_zero_points(quantized.take()))

    def _quantized(self, path: str, source: Source, module) -> QuantizedWeight:
        scheme = self._packed(path)
        if scheme is not None:  # the checkpoint's own codes, unchanged
            n, k = module.out_features, module.in_features
            codes = prequantized.read_codes(self.checkpoint, self.layout, path, scheme, n, k)
            q = prequantized.quantized_weight(codes, module.spec)
        elif self.calibrated is None or path not in self.calibrated:
            return quantize_source(source, module.spec)
        else:
            q = self.calibrated.load(path, module.in_features, module.spec)
        if path.endswith("attention.wqkv"):  # made in the checkpoint's grouped row order
            order = qkv_order(self.config)
            zero_points = None if q.zero_points is None else q.zero_points[order]
            q = QuantizedWeight(
                q.packed[order], q.scales[order], zero_points, k=q.k, n=q.n, spec=q.spec
            )
        return q

    def _bind_rotary(self, module: modules.Rotary) -> None:
        # Computed and written a slice of positions at a time: a 1M-token table is 0.5 GB.
        for index, table in enumerate((module.cos_cache, module.sin_cache)):
            source = RotaryRows(self.config, tuple(table.shape.numpy()), index)
            table.const_value = RowStreamedTensor(source, table)


def embedding_zero_points(q: QuantizedWeight) -> np.ndarray:
    """MatMulNBits' packed zero points -> GatherBlockQuantized's [rows, blocks, 1], one code a
    byte (its rank must equal the data's; with one block per row on the quantized axis, the
    code sits in the low nibble)."""
    return np.ascontiguousarray(zero_point_codes(q)[..., None])


def tied(checkpoint: Checkpoint, a: str, b: str) -> bool:
    """Whether checkpoint tensors `a` and `b` hold the same values (a tied lm_head written out
    twice), compared a slice at a time; untied tables differ in the first slice."""
    ref_a, ref_b = checkpoint[a], checkpoint[b]
    if ref_a.shape != ref_b.shape or ref_a.dtype != ref_b.dtype:
        return False
    step = _slice_rows(ref_a.shape)
    for start in range(0, ref_a.shape[0], step):
        stop = min(start + step, ref_a.shape[0])
        if not np.array_equal(ref_a.read_rows(start, stop), ref_b.read_rows(start, stop)):
            return False
    return True


def _slice_rows(shape: tuple[int, ...]) -> int:
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 4
    return max(1, SLICE_BYTES // max(row_bytes, 1))


def transposed(source: Source, param: ir.Value) -> np.ndarray:
    """[out, in] checkpoint rows -> [in, out] for MatMul, a slice of rows at a time."""
    out_rows, in_features = source.shape
    result = np.empty((in_features, out_rows), NUMPY_DTYPES[param.dtype])
    step = _slice_rows(source.shape)
    for start in range(0, out_rows, step):
        block = source.rows(start, min(start + step, out_rows))
        result[:, start : start + block.shape[0]] = block.T
    return result


def quantize_source(source: Source, spec: QuantSpec) -> QuantizedWeight:
    """Quantize slice by slice into preallocated outputs: output rows are independent."""
    out_rows = source.shape[0]
    step = _slice_rows(source.shape)
    first = quantize(source.rows(0, min(step, out_rows)), spec)
    if step >= out_rows:
        return first

    def grown(part: np.ndarray | None) -> np.ndarray | None:
        return None if part is None else np.empty((out_rows, *part.shape[1:]), part.dtype)

    whole = QuantizedWeight(
        packed=grown(first.packed),
        scales=grown(first.scales),
        zero_points=grown(first.zero_points),
        k=first.k,
        n=out_rows,
        spec=spec,
    )
    for start in range(0, out_rows, step):
        part = quantize(source.rows(start, min(start + step, out_rows)), spec) if start else first
        stop = start + part.packed.shape[0]
        whole.packed[start:stop] = part.packed
        whole.scales[start:stop] = part.scales
        if whole.zero_points is not None:
            whole.zero_points[start:stop] = part.zero_points
    return whole


def _as(array: np.ndarray, param: ir.Value) -> np.ndarray:
    return np.asarray(array).astype(NUMPY_DTYPES[param.dtype], copy=False)


def _attach(param: ir.Value, produce: Callable[[], np.ndarray]) -> None:
    param.const_value = ir.LazyTensor(
        lambda: ir.tensor(produce()), dtype=param.dtype, shape=param.shape, name=param.name
    )


class RowStreamedTensor(ir.LazyTensor):
    """A lazy tensor that the saver writes a slice of rows at a time (`tofile`), so that its
    size never shows in peak memory: the embedding table is the largest tensor of an int4
    build (2.3 GB at fp32 for 20B), and with it whole in memory, peak memory grows with the
    model's width. `numpy()` and `tobytes()` still give the whole tensor."""

    def __init__(self, source: Source, param: ir.Value) -> None:
        self._source = source
        self._np_dtype = NUMPY_DTYPES[param.dtype]
        super().__init__(
            lambda: ir.tensor(_as(source.rows(0, source.shape[0]), param)),
            dtype=param.dtype,
            shape=param.shape,
            name=param.name,
        )

    def tofile(self, file) -> None:
        count = self._source.shape[0]
        step = _slice_rows(self._source.shape)
        for start in range(0, count, step):
            block = self._source.rows(start, min(start + step, count))
            file.write(_as_bytes(block.astype(self._np_dtype, copy=False)))


class TransposedStreamedTensor(ir.LazyTensor):
    """[out, in] checkpoint rows stored as [in, out] (MatMul's layout), written a block of
    checkpoint rows at a time: each block is a band of columns, one short write per stored row.
    The float lm_head (0.8 GB at 7B fp16) never sits in memory whole."""

    def __init__(self, source: Source, param: ir.Value) -> None:
        self._source = source
        self._np_dtype = NUMPY_DTYPES[param.dtype]
        super().__init__(
            lambda: ir.tensor(transposed(source, param)),
            dtype=param.dtype,
            shape=param.shape,
            name=param.name,
        )

    def tofile(self, file) -> None:
        out_rows, in_features = self._source.shape
        itemsize = self._np_dtype.itemsize
        base, row_bytes = file.tell(), out_rows * itemsize
        step = _slice_rows(self._source.shape)
        for start in range(0, out_rows, step):
            band = self._source.rows(start, min(start + step, out_rows))
            band = band.T.astype(self._np_dtype, order="C")
            for r in range(in_features):
                file.seek(base + r * row_bytes + start * itemsize)
                file.write(_as_bytes(band[r]))
        file.seek(base + in_features * row_bytes)


def _as_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy (when contiguous): numpy hands out no buffer of
    bfloat16, an ml_dtypes type, but does of the same memory seen as uint8."""
    return np.ascontiguousarray(array).view(np.uint8).data
