"""Checkpoint tensors -> graph initializers: pure per-tensor transforms and lazy binding.

Every graph parameter is named after the checkpoint tensor it comes from, so binding needs no
mapping table: a module's path is the tensor's prefix. Data is produced only when the saver asks
for it, one tensor (or one block of rows) at a time.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from internlm2_graph import modules
from internlm2_graph.checkpoint import Checkpoint, TensorRef
from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.quantize import QuantizedWeight, QuantSpec, quantize
from internlm2_graph.rope import rotary_tables

NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.dtype(np.float32),
    ir.DataType.FLOAT16: np.dtype(np.float16),
    ir.DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
# Rows per slice when transposing or quantizing a large matrix: bounds the fp32 working set.
SLICE_BYTES = 64 * 1024 * 1024

# Transposed matrices larger than this (the float lm_head) are saved a block at a time too.
STREAM_BYTES = 4 * SLICE_BYTES

Rows = Callable[[int, int], np.ndarray]


# --- pure transforms ------------------------------------------------------------------------


def expected_shapes(config: InternLM2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor an InternLM2 checkpoint of this config must hold, with its shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    heads_out = config.num_attention_heads * config.head_dim
    shapes = {
        "model.tok_embeddings.weight": (v, h),
        "model.norm.weight": (h,),
        "output.weight": (v, h),
    }
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "attention_norm.weight": (h,),
            p + "attention.wqkv.weight": (qkv, h),
            p + "attention.wo.weight": (h, heads_out),
            p + "ffn_norm.weight": (h,),
            p + "feed_forward.w1.weight": (i, h),
            p + "feed_forward.w3.weight": (i, h),
            p + "feed_forward.w2.weight": (h, i),
        }
        if config.bias:
            shapes |= {p + "attention.wqkv.bias": (qkv,), p + "attention.wo.bias": (h,)}
    return shapes


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


def check_checkpoint(checkpoint: Checkpoint, config: InternLM2Config) -> None:
    """Fail before writing anything if a tensor is missing or has the wrong shape."""
    for name, shape in expected_shapes(config).items():
        ref = checkpoint[name]
        if ref.shape != shape:
            raise InternLM2GraphError(
                f"{ref.path}: tensor {name} has shape {list(ref.shape)}, but config.json implies "
                f"{list(shape)}; the config and the weights are from different models"
            )


# --- lazy binding ---------------------------------------------------------------------------


class WeightBinder:
    """Attaches a lazy tensor to every graph parameter, reading the checkpoint on demand."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        config: InternLM2Config,
        allow_nonfinite: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.config = config
        self.allow_nonfinite = allow_nonfinite
        self._quantized: dict[str, list] = {}

    def bind(self, root: modules.InternLM2ForCausalLM) -> None:
        for path, module in root.named_modules():
            if isinstance(module, modules.QuantizedLinear):
                self._bind_quantized(path, module)
            elif isinstance(module, modules.Linear):
                self._bind_linear(path, module)
            elif isinstance(module, (modules.RMSNorm, modules.Embedding)):
                ref = self.checkpoint[f"{path}.weight"]
                module.weight.const_value = RowStreamedTensor(self._reader(ref), module.weight)
            elif isinstance(module, modules.Rotary):
                self._bind_rotary(module)

    def _rows(self, path: str, suffix: str) -> tuple[int, Callable[[], Rows]]:
        """Row count of a linear's [out, in] tensor, and a loader of its float32 rows.

        The loader is called when the saver needs the data, so nothing stays in memory between.
        """
        ref = self.checkpoint[f"{path}.{suffix}"]
        if path.endswith("attention.wqkv"):

            def load_regrouped() -> Rows:
                # Small enough to regroup whole: at most (heads + 2 kv) * head_dim rows.
                whole = wqkv_to_qkv(self._checked(ref, ref.read()), self.config)
                return lambda start, stop: whole[start:stop]

            return ref.shape[0], load_regrouped
        return ref.shape[0], lambda: self._reader(ref)

    def _reader(self, ref: TensorRef) -> Rows:
        return lambda start, stop: self._checked(ref, ref.read_rows(start, stop))

    def _bind_linear(self, path: str, module: modules.Linear) -> None:
        out_rows, load = self._rows(path, "weight")
        weight = module.weight
        if out_rows * module.in_features * NUMPY_DTYPES[weight.dtype].itemsize > STREAM_BYTES:
            weight.const_value = TransposedStreamedTensor(load, out_rows, weight)
        else:
            _attach(weight, lambda: _transposed(load(), out_rows, module.in_features, weight))
        self._bind_bias(path, module)

    def _bind_bias(self, path: str, module: modules.Linear | modules.QuantizedLinear) -> None:
        if module.bias is not None:
            out_rows, load = self._rows(path, "bias")
            _attach(module.bias, lambda: _as(load()(0, out_rows), module.bias))

    def _bind_quantized(self, path: str, module: modules.QuantizedLinear) -> None:
        out_rows, load = self._rows(path, "weight")
        params = [p for p in (module.weight, module.scales, module.zero_points) if p is not None]

        lock = threading.Lock()

        def part(index: int) -> np.ndarray:
            # The saver asks for weight, scales and zero points separately, possibly from several
            # threads: quantize once, keep the result until its last part has been taken.
            with lock:
                entry = self._quantized.get(path)
                if entry is None:
                    entry = [_quantize_rows(load(), out_rows, module.in_features, module.spec), 0]
                    self._quantized[path] = entry
                entry[1] += 1
                if entry[1] == len(params):
                    del self._quantized[path]
            q = entry[0]
            return [q.packed, q.scales.reshape(-1), q.zero_points][index]

        _attach(module.weight, lambda: part(0))
        _attach(module.scales, lambda: _as(part(1), module.scales))
        if module.zero_points is not None:
            _attach(module.zero_points, lambda: part(2).reshape(-1))
        self._bind_bias(path, module)

    def _bind_rotary(self, module: modules.Rotary) -> None:
        length = module.cos_cache.shape[0]
        _attach(
            module.cos_cache, lambda: _as(rotary_tables(self.config, length)[0], module.cos_cache)
        )
        _attach(
            module.sin_cache, lambda: _as(rotary_tables(self.config, length)[1], module.sin_cache)
        )

    def _checked(self, ref: TensorRef, block: np.ndarray) -> np.ndarray:
        if not np.isfinite(block).all():
            message = (
                f"{ref.path}: tensor {ref.name} contains NaN or Inf values; the checkpoint is "
                "damaged (pass --allow_nonfinite to convert it anyway)"
            )
            if not self.allow_nonfinite:
                raise InternLM2GraphError(message)
            warnings.warn(message, stacklevel=2)
        return block


def _slice_rows(shape: tuple[int, ...]) -> int:
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 4
    return max(1, SLICE_BYTES // max(row_bytes, 1))


def _transposed(rows: Rows, out_rows: int, in_features: int, param: ir.Value) -> np.ndarray:
    """[out, in] checkpoint rows -> [in, out] for MatMul, a slice of rows at a time."""
    result = np.empty((in_features, out_rows), NUMPY_DTYPES[param.dtype])
    step = _slice_rows((out_rows, in_features))
    for start in range(0, out_rows, step):
        block = rows(start, min(start + step, out_rows))
        result[:, start : start + block.shape[0]] = block.T
    return result


def _quantize_rows(rows: Rows, out_rows: int, in_features: int, spec: QuantSpec) -> QuantizedWeight:
    """Quantize slice by slice into preallocated outputs: output rows are independent."""
    step = _slice_rows((out_rows, in_features))
    first = quantize(rows(0, min(step, out_rows)), spec)
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
        part = first if start == 0 else quantize(rows(start, min(start + step, out_rows)), spec)
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

    def __init__(self, rows: Rows, param: ir.Value) -> None:
        self._row_source = rows
        self._np_dtype = NUMPY_DTYPES[param.dtype]
        super().__init__(
            lambda: ir.tensor(_as(rows(0, param.shape[0]), param)),
            dtype=param.dtype,
            shape=param.shape,
            name=param.name,
        )

    def tofile(self, file) -> None:
        count = self.shape[0]
        step = _slice_rows(tuple(self.shape.numpy()))
        for start in range(0, count, step):
            block = self._row_source(start, min(start + step, count))
            file.write(_as_bytes(block.astype(self._np_dtype, copy=False)))


class TransposedStreamedTensor(ir.LazyTensor):
    """[out, in] checkpoint rows stored as [in, out] (MatMul's layout), written a block of
    checkpoint rows at a time: each block is a band of columns, one short write per stored row.
    The float lm_head (0.8 GB at 7B fp16) never sits in memory whole."""

    def __init__(self, load: Callable[[], Rows], out_rows: int, param: ir.Value) -> None:
        self._load = load
        self._out_rows = out_rows
        self._in_features = param.shape[0]
        self._np_dtype = NUMPY_DTYPES[param.dtype]
        super().__init__(
            lambda: ir.tensor(_transposed(load(), out_rows, self._in_features, param)),
            dtype=param.dtype,
            shape=param.shape,
            name=param.name,
        )

    def tofile(self, file) -> None:
        rows, itemsize = self._load(), self._np_dtype.itemsize
        base, row_bytes = file.tell(), self._out_rows * itemsize
        step = _slice_rows((self._out_rows, self._in_features))
        for start in range(0, self._out_rows, step):
            band = rows(start, min(start + step, self._out_rows)).T.astype(
                self._np_dtype, order="C"
            )
            for r in range(self._in_features):
                file.seek(base + r * row_bytes + start * itemsize)
                file.write(_as_bytes(band[r]))
        file.seek(base + self._in_features * row_bytes)


def _as_bytes(array: np.ndarray) -> memoryview:
    """The array's bytes without a copy (when contiguous): numpy hands out no buffer of
    bfloat16, an ml_dtypes type, but does of the same memory seen as uint8."""
    return np.ascontiguousarray(array).view(np.uint8).data
