"""Where calibration's float32 products run: numpy, or onnxruntime on a GPU.

A calibrated 7B build multiplies ~15 TFLOP per decoder layer (the layer forward on the
calibration tokens, Gram matrices, their inverses, GPTQ's lazy updates). numpy's BLAS does that
on the CPU; `OnnxRuntime` sends the same products to an execution provider as one-node graphs
(``Gemm``), and runs there what would otherwise keep one host core busy while the GPU waits:
attention's scores and softmax, the grid search of every block of a weight (one graph), and
GPTQ's column loop (one graph per lazy batch). So a build that targets CUDA on a machine with a
GPU needs no torch for it. The rotary, the norms, SwiGLU's gate (in threads) and the Cholesky
factors of small blocks stay in numpy either way.

Both give the same math in another float order, so a calibrated build on the GPU is not
byte-identical to one on the CPU; NUMPY is what every build used before, unchanged.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import TensorProto, helper

# Tokens per product in the numpy layer forward: bounds the FFN's temporaries on the CPU.
TOKEN_CHUNK = 2048


class Numpy:
    """numpy's own products (GPTQ's column loop is gptq.gptq's own)."""

    name = "numpy"
    token_chunk = TOKEN_CHUNK
    # Sequences whose attention runs at once: one, since numpy's BLAS already takes every core.
    attention_threads = 1

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x @ w.T (an HF-layout weight [out, in])."""
        return x @ w.T

    def matmul(self, a: np.ndarray, b: np.ndarray, transpose_b=False, transpose_a=False):
        return (a.T if transpose_a else a) @ (b.T if transpose_b else b)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Causal attention of one sequence: q [kv, g, L, d], k and v [kv, L, d] (after
        rotary) -> [kv, g, L, d]."""
        length, d = k.shape[1:]
        scores = q @ k[:, None].transpose(0, 1, 3, 2)  # [kv, g, L, L]
        scores *= np.float32(d**-0.5)
        scores += _causal_mask(length)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        return scores @ v[:, None]

    def gram(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """X^T X (or X^T Y) summed over tokens, float32 (a few thousand tokens: rounding far
        below damp)."""
        total = np.zeros((x.shape[1], (x if y is None else y).shape[1]), np.float32)
        for start in range(0, len(x), TOKEN_CHUNK):
            c = x[start : start + TOKEN_CHUNK]
            total += c.T @ (c if y is None else y[start : start + TOKEN_CHUNK])
        return total


class OnnxRuntime:
    """The products on an onnxruntime execution provider ("CUDAExecutionProvider" on the GPU
    machine; "CPUExecutionProvider" runs the same code in tests). Operands travel per call,
    except in gptq_columns, where a weight's rows, grids and Hessian factor stay on the device."""

    name = "onnxruntime"
    token_chunk = 1 << 30  # one product per linear: the GPU has the memory
    attention_threads = 8  # the rotary on the host, beside the device's runs

    def __init__(self, provider: str = "CUDAExecutionProvider") -> None:
        import onnxruntime

        self.ort = onnxruntime
        self.provider = provider
        self.device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
        # Full float32 products: TF32 would round the Hessians' inputs to 10 bits.
        self.options = [{"use_tf32": "0"}] if self.device == "cuda" else None
        self._sessions = {}

    def _session(self, name: str, model: onnx.ModelProto):
        if name not in self._sessions:
            options = self.ort.SessionOptions()
            options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3
            self._sessions[name] = self.ort.InferenceSession(
                model.SerializeToString(), options, [self.provider], self.options
            )
        return self._sessions[name]

    def _gemm(self, trans_a: int, trans_b: int, same: bool = False):
        name = f"gemm{trans_a}{trans_b}{'s' if same else ''}"
        inputs = ["a", "a" if same else "b"]
        node = helper.make_node("Gemm", inputs, ["y"], transA=trans_a, transB=trans_b)
        return self._session(name, _model([node], ["a"] if same else ["a", "b"], ["y"]))

    def linear(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return self._gemm(0, 1).run(None, {"a": _f32(x), "b": _f32(w)})[0]

    def matmul(self, a: np.ndarray, b: np.ndarray, transpose_b=False, transpose_a=False):
        gemm = self._gemm(int(transpose_a), int(transpose_b))
        return gemm.run(None, {"a": _f32(a), "b": _f32(b)})[0]

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        length, d = k.shape[1:]
        session = self._session("attention", _attention_graph())
        feeds = {"q": _f32(q), "k": _f32(k), "v": _f32(v), "mask": _causal_mask(length),
                 "scale": np.array([d**-0.5], np.float32)}  # fmt: skip
        return session.run(None, feeds)[0]

    def gram(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        if y is None:
            return self._gemm(1, 0, same=True).run(None, {"a": _f32(x)})[0]
        return self._gemm(1, 0).run(None, {"a": _f32(x), "b": _f32(y)})[0]

    def searched_grids(self, wt, importance, block_size, qmax, symmetric, candidates):
        """gptq.searched_grid of every block of `wt` [K, N] (transposed weight, K a
        multiple of block_size) at once: scales and zero points [K / block_size, N]. The
        candidate grids are numpy's to the bit (`candidates`: searched_grid_graph); their
        errors are summed in another order, so near ties may pick another candidate."""
        blocks = len(wt) // block_size
        session = self._session(*searched_grid_graph(block_size, qmax, symmetric, candidates))
        feeds = {"w": _f32(wt), "importance": _f32(importance),
                 "shape": np.array([blocks, block_size, wt.shape[1]], np.int64)}  # fmt: skip
        return tuple(session.run(None, feeds))

    def upload(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(_f32(array), self.device, 0)

    def gptq_columns(self, wt, factor, scales, zero_points, recips, blocks, qmax, lazy):
        """GPTQ's column loop with static grids, on the device: codes [K, N] (uint8) of the
        permuted transposed weight `wt` [K, N], whose row i reads grid row `blocks[i]` of
        scales, zero_points, recips [K / block, N]. Each lazy batch is one run of one graph
        (gptq_batch); the rows still to round stay on the device between runs."""
        k, n = wt.shape
        rest, f = self.upload(wt), self.upload(factor)
        grids = [self.upload(a) for a in (scales, zero_points, recips)]
        codes = np.empty((k, n), np.uint8)
        for i1 in range(0, k, lazy):
            i2 = min(i1 + lazy, k)
            last = i2 == k
            session = self._session(*gptq_batch(i2 - i1, qmax, last))
            binding = session.io_binding()
            binding.bind_ortvalue_input("rest", rest)
            for name, value in zip(("scales", "zero_points", "recips"), grids):
                binding.bind_ortvalue_input(name, value)
            binding.bind_cpu_input("blocks", np.asarray(blocks[i1:i2], np.int64))
            binding.bind_cpu_input("upper", np.triu(factor[i1:i2, i1:i2], 1))
            binding.bind_cpu_input("diagonal", np.diagonal(factor)[i1:i2].copy())
            binding.bind_output("codes", "cpu")
            if not last:
                binding.bind_ortvalue_input("factor", f)
                binding.bind_cpu_input("starts", np.array([i1, i2], np.int64))
                binding.bind_cpu_input("ends", np.array([i2, k], np.int64))
                binding.bind_output("rest_after", self.device)
            session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            codes[i1:i2] = outputs[0].numpy()
            if not last:
                rest = outputs[1]
        return codes


class _Graph:
    """The nodes and initializers of a graph being written: named where a name is given,
    otherwise numbered."""

    def __init__(self) -> None:
        self.nodes, self.inits = [], []

    def const(self, value, dtype=np.float32, name: str | None = None) -> str:
        name = name or f"c{len(self.inits)}"
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def model(self, inputs, outputs) -> onnx.ModelProto:
        return _model(self.nodes, inputs, outputs, self.inits)


@functools.cache
def gptq_batch(length: int, qmax: int, last: bool) -> tuple[str, onnx.ModelProto]:
    """One lazy batch of GPTQ as a graph: round its `length` columns (rows of `rest`, the
    weight still to round, transposed and permuted) one after another, each column's error fed
    into the batch's later columns through `upper` (the factor's block, strictly upper), and
    unless `last`, the batch's errors into every later column at once (right-looking: a Gemm).

    Every step is gptq.gptq's numpy loop, op for op: clamp(w * recip + zp + 0.5) cut to
    an integer, error (w - (q - zp) * scale) / diagonal, row update w -= upper * e.
    """
    graph = _Graph()
    const, op, nodes = graph.const, graph.op, graph.nodes
    const(0.0, name="zero"), const(0.5, name="half"), const(float(qmax), name="qmax")
    const([0], np.int64, "first"), const([length], np.int64, "length")
    const([0], np.int64, "axis0"), const([np.iinfo(np.int64).max], np.int64, "end")
    const([1] * length, np.int64, "ones")  # Split's sizes: opset 17, as every provider has it
    w = op("Slice", ["rest", "first", "length", "axis0"], "batch")
    per_column = {}
    for name in ("scales", "zero_points", "recips"):
        op("Gather", [name, "blocks"], f"{name}_b", axis=0)
        outs = [f"{name}_{j}" for j in range(length)]
        nodes.append(helper.make_node("Split", [f"{name}_b", "ones"], outs, axis=0))
        per_column[name] = outs
    columns_of_upper = [f"u_{j}" for j in range(length)]
    op("Transpose", ["upper"], "upper_t", perm=[1, 0])
    nodes.append(helper.make_node("Split", ["upper_t", "ones"], columns_of_upper, axis=1))
    diagonals = [f"d_{j}" for j in range(length)]
    nodes.append(helper.make_node("Split", ["diagonal", "ones"], diagonals, axis=0))
    codes, errors = [], []
    for j in range(length):
        s, z, r = (per_column[name][j] for name in ("scales", "zero_points", "recips"))
        row = op("Gather", [w, const([j], np.int64, f"j{j}")], f"w_{j}", axis=0)  # [1, N]
        y = op("Add", [op("Add", [op("Mul", [row, r], f"wr_{j}"), z], f"wz_{j}"), "half"],
               f"y_{j}")  # fmt: skip
        q = op("Floor", [op("Clip", [y, "zero", "qmax"], f"c_{j}")], f"q_{j}")
        restored = op("Mul", [op("Sub", [q, z], f"qz_{j}"), s], f"rs_{j}")
        e = op("Div", [op("Sub", [row, restored], f"dw_{j}"), diagonals[j]], f"e_{j}")
        codes.append(q)
        errors.append(e)
        if j + 1 < length:  # rows <= j meet zeros of `upper`: they are done
            w = op("Sub", [w, op("Mul", [columns_of_upper[j], e], f"ue_{j}")], f"batch_{j}")
    op("Cast", [op("Concat", codes, "q", axis=0)], "codes", to=TensorProto.UINT8)
    inputs = ["rest", "scales", "zero_points", "recips", ("blocks", TensorProto.INT64), "upper",
              "diagonal"]  # fmt: skip
    outputs = [("codes", TensorProto.UINT8)]
    if not last:
        op("Concat", errors, "errors", axis=0)
        op("Slice", ["rest", "length", "end", "axis0"], "after")
        op("Slice", ["factor", "starts", "ends"], "spread")  # factor[i1:i2, i2:]
        op("Gemm", ["spread", "errors", "after"], "rest_after", transA=1, alpha=-1.0, beta=1.0)
        inputs += ["factor", ("starts", TensorProto.INT64), ("ends", TensorProto.INT64)]
        outputs.append("rest_after")
    name = f"gptq_batch_{length}_{qmax}_{'last' if last else 'more'}"
    return name, graph.model(inputs, outputs)


@functools.cache
def searched_grid_graph(
    block_size: int, qmax: int, symmetric: bool, candidates: tuple
) -> tuple[str, onnx.ModelProto]:
    """gptq.searched_grid as a graph over all blocks [B, block_size, N] of a weight.

    `candidates` are numpy's float32 factors in searched_grid's order, the first being
    block_grid's: symmetric, the factor of the block's extreme (scale = ext * f, zero point
    the middle code); asymmetric, (a, b) with scale = (hi * b - lo * a) / qmax on the range
    widened to include 0 and zero point clip(floor(-(lo * a) / scale + 0.5)). The first
    candidate with the least importance-weighted rounding error wins (ArgMin's first index:
    numpy's strict "better" update from block_grid on)."""
    graph = _Graph()
    const, op = graph.const, graph.op
    zero, half, top = const(0.0), const(0.5), const(float(qmax))
    blocks = op("Reshape", ["w", "shape"])  # [B, bs, N]
    importance = op("Reshape", ["importance", const([-1, block_size, 1], np.int64)])
    hi = op("ReduceMax", [blocks], axes=[1], keepdims=0)  # [B, N]
    lo = op("ReduceMin", [blocks], axes=[1], keepdims=0)
    if symmetric:
        ext = op("Where", [op("Greater", [op("Abs", [hi]), op("Abs", [lo])]), hi, lo])
        middle = op("Expand", [const(float((qmax + 1) // 2)), op("Shape", [hi])])
        grids = [(op("Mul", [ext, const(f)]), middle) for f in candidates]
    else:
        lo, hi = op("Min", [lo, zero]), op("Max", [hi, zero])
        grids = []
        for a, b in candidates:
            low = op("Mul", [lo, const(a)])
            scale = op("Div", [op("Sub", [op("Mul", [hi, const(b)]), low]), top])
            zp = op("Where", [op("Equal", [scale, zero]), zero, op("Div", [op("Neg", [low]),
                                                                        scale])])  # fmt: skip
            zp = op("Clip", [op("Floor", [op("Add", [zp, half])]), zero, top])
            grids.append((scale, zp))
    axis0, axis1 = const([0], np.int64), const([1], np.int64)
    errors, scales, zero_points = [], [], []
    for scale, zp in grids:
        recip = op("Reciprocal", [scale])
        bad = op("Or", [op("IsInf", [recip]), op("IsNaN", [recip])])
        recip = op("Where", [bad, zero, recip])
        s, z, r = (op("Unsqueeze", [t, axis1]) for t in (scale, zp, recip))  # [B, 1, N]
        y = op("Add", [op("Add", [op("Mul", [blocks, r]), z]), half])
        q = op("Floor", [op("Clip", [y, zero, top])])
        restored = op("Sub", [op("Mul", [op("Sub", [q, z]), s]), blocks])
        squared = op("Mul", [restored, restored])
        error = op("ReduceSum", [op("Mul", [squared, importance]), axis1], keepdims=0)
        errors.append(op("Unsqueeze", [error, axis0]))
        scales.append(op("Unsqueeze", [scale, axis0]))
        zero_points.append(op("Unsqueeze", [zp, axis0]))
    best = op("ArgMin", [op("Concat", errors, axis=0)], axis=0, keepdims=1)  # [1, B, N]
    for name, stacked in (("scales", scales), ("zero_points", zero_points)):
        chosen = op("GatherElements", [op("Concat", stacked, axis=0), best], axis=0)
        op("Squeeze", [chosen, axis0], name)
    inputs = ["w", "importance", ("shape", TensorProto.INT64)]
    name = f"searched_grid_{block_size}_{qmax}_{symmetric}_{hash(candidates)}"
    return name, graph.model(inputs, ["scales", "zero_points"])


@functools.cache
def _attention_graph() -> onnx.ModelProto:
    """Numpy.attention as a graph: softmax(q k^T * scale + mask) v, heads grouped by KV head."""
    axis1 = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Unsqueeze", ["k", "axis1"], ["k1"]),
        helper.make_node("Transpose", ["k1"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["weights"], axis=-1),
        helper.make_node("Unsqueeze", ["v", "axis1"], ["v1"]),
        helper.make_node("MatMul", ["weights", "v1"], ["attended"]),
    ]
    return _model(nodes, ["q", "k", "v", "mask", "scale"], ["attended"], [axis1])


@functools.cache
def _causal_mask(length: int) -> np.ndarray:
    mask = np.triu(np.full((length, length), -np.inf, np.float32), 1)
    mask.flags.writeable = False
    return mask


NUMPY = Numpy()


def for_execution_provider(execution_provider: str) -> Numpy | OnnxRuntime:
    """OnnxRuntime on the GPU for a CUDA build where onnxruntime runs CUDA, else NUMPY (a CUDA
    wheel on a machine without a usable GPU falls back, as a build for another machine may)."""
    if execution_provider != "cuda":
        return NUMPY
    try:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return NUMPY
        device = OnnxRuntime("CUDAExecutionProvider")
        probe = np.ones((2, 2), np.float32)
        session = device._gemm(0, 0)
        if session.get_providers()[0] != "CUDAExecutionProvider":
            return NUMPY
        device.upload(probe)
        assert np.array_equal(device.matmul(probe, probe), probe @ probe)
    except Exception:  # no onnxruntime, no CUDA provider, no GPU: numpy does it all
        return NUMPY
    return device


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    def value(spec):
        name, dtype = spec if isinstance(spec, tuple) else (spec, TensorProto.FLOAT)
        return helper.make_tensor_value_info(name, dtype, None)

    graph = helper.make_graph(nodes, "products", [value(i) for i in inputs],
                              [value(o) for o in outputs], list(initializers))  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
