"""The checkpoint's float32 decoder on calibration text, one decoder layer in memory at a time.

Calibration hidden states ``[tokens, hidden]`` (every sequence packed end to end, each from
position 0) plus one layer's weights are all that is held. `decoder_layer` runs one layer and
hands each group of linears that share an input to a `take` callback, which is where the
methods come in: GPTQ quantizes them there, AWQ records their inputs, a float pass hands the
weights back as they are. `streamed` drives the layers; `float_forward` is the plain float
model. The products run on a compute.py device (numpy, or onnxruntime on a GPU). The oracle is
reference.py's float64 forward (tests/test_calibration_forward.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from internlm2_graph.calibration.compute import NUMPY, TOKEN_CHUNK, Numpy, OnnxRuntime
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.progress import Progress
from internlm2_graph.rope import rotary_tables

THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
Device = Numpy | OnnxRuntime
# take(inputs, *names) -> the weights the layer computes `names` with (all read `inputs`).
Take = Callable[..., list[np.ndarray]]


@dataclass(frozen=True)
class Batch:
    """Calibration sequences packed end to end (each from position 0): their lengths, the
    rotary tables for the longest, and the model they run through."""

    config: InternLM2Config
    lengths: tuple[int, ...]
    cos: np.ndarray  # [max(lengths), head_dim / 2]
    sin: np.ndarray

    @classmethod
    def of(cls, sequences: list[np.ndarray], config: InternLM2Config) -> Batch:
        lengths = tuple(len(s) for s in sequences)
        cos, sin = rotary_tables(config, max(lengths))
        return cls(config, lengths, cos, sin)

    def spans(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of each sequence in the packed tokens."""
        start = 0
        for length in self.lengths:
            yield start, start + length
            start += length


@dataclass
class LayerWeights:
    """One decoder layer's float32 weights, HF layout, by checkpoint name; wqkv in its grouped
    rows. A method may replace or drop (None) a linear once it has used it."""

    attention_norm: np.ndarray
    ffn_norm: np.ndarray
    linears: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]

    @classmethod
    def read(cls, checkpoint: Checkpoint, config: InternLM2Config, n: int) -> LayerWeights:
        p = f"model.layers.{n}."
        names = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3")
        names += ("feed_forward.w2",)
        biases = {}
        if config.bias:
            for name in ("attention.wqkv", "attention.wo"):
                biases[name] = checkpoint[p + name + ".bias"].read()
        return cls(
            attention_norm=checkpoint[p + "attention_norm.weight"].read(),
            ffn_norm=checkpoint[p + "ffn_norm.weight"].read(),
            linears={name: checkpoint[p + name + ".weight"].read() for name in names},
            biases=biases,
        )

    def as_read(self, inputs: np.ndarray, *names: str) -> list[np.ndarray]:
        """A `take` that hands the weights back as they are: the float layer."""
        return [self.linears[name] for name in names]


def embed(checkpoint: Checkpoint, ids: np.ndarray) -> np.ndarray:
    """Embedding rows of `ids`, reading the table a slice at a time (it is the largest)."""
    ref = checkpoint["model.tok_embeddings.weight"]
    out = np.empty((len(ids), ref.shape[1]), np.float32)
    step = max(1, (64 << 20) // (4 * ref.shape[1]))
    for start in range(0, ref.shape[0], step):
        hit = (ids >= start) & (ids < start + step)
        if hit.any():
            out[hit] = ref.read_rows(start, start + step)[ids[hit] - start]
    return out


def final_norm(checkpoint: Checkpoint, config: InternLM2Config, x: np.ndarray) -> np.ndarray:
    """The lm_head's input: the last layer's output through the model's final RMSNorm."""
    return rmsnorm(x, checkpoint["model.norm.weight"].read(), config.rms_norm_eps)


def decoder_layer(
    weights: LayerWeights,
    x: np.ndarray,
    batch: Batch,
    take: Take,
    *,
    on_kv: Callable[[np.ndarray, np.ndarray], None] | None = None,
    on_output: Callable[[str, np.ndarray], None] | None = None,
    device: Device = NUMPY,
) -> np.ndarray:
    """One decoder layer on the calibration hidden states x [tokens, hidden]; returns its output.

    `take(inputs, *names)` gives the weights of the linears `names`, which all read `inputs`.
    `on_kv(keys, values)` sees the layer's keys, before rotary, and values: [tokens, kv_heads,
    head_dim]. `on_output(name, y)` sees the outputs of wqkv, wo and w2, before bias. `device`
    runs the linears, `device.token_chunk` tokens at a time.
    """
    config = batch.config
    eps = config.rms_norm_eps

    def linear(a: np.ndarray, w: np.ndarray, name: str) -> np.ndarray:
        y = chunked(a, lambda c: device.linear(c, w), device.token_chunk)
        if on_output is not None:
            on_output(name, y)
        bias = weights.biases.get(name)
        return y if bias is None else y + bias

    h = rmsnorm(x, weights.attention_norm, eps)
    (wqkv,) = take(h, "attention.wqkv")
    qkv = linear(h, wqkv, "attention.wqkv")
    if on_kv is not None:
        g = config.group
        grouped = qkv.reshape(len(qkv), config.num_key_value_heads, g + 2, config.head_dim)
        on_kv(grouped[:, :, g], grouped[:, :, g + 1])
    attended = attention(qkv, batch, device)
    del h, wqkv, qkv
    (wo,) = take(attended, "attention.wo")
    x = x + linear(attended, wo, "attention.wo")
    del attended, wo
    h = rmsnorm(x, weights.ffn_norm, eps)
    w1, w3 = take(h, "feed_forward.w1", "feed_forward.w3")
    act = np.empty((len(h), w1.shape[0]), np.float32)
    for start in range(0, len(h), device.token_chunk):
        c = h[start : start + device.token_chunk]
        swiglu(device.linear(c, w1), device.linear(c, w3), act[start : start + len(c)])
    del h, w1, w3
    (w2,) = take(act, "feed_forward.w2")
    x += linear(act, w2, "feed_forward.w2")
    return x


# layer(n, weights, x, batch) -> layer n's output on x.
Layer = Callable[[int, LayerWeights, np.ndarray, Batch], np.ndarray]


def streamed(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    layer: Layer,
    progress: Progress | None = None,
    task: str = "float forward",
    head: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray | None:
    """The calibration sequences through every decoder layer, one layer's weights in memory at
    a time: `layer(n, weights, x, batch)` returns layer n's output. With `head`, it is handed
    the final norm's output (one more progress step) and nothing is returned; without, the
    last layer's output is."""
    progress = progress or Progress(quiet=True)
    batch = Batch.of(sequences, config)
    x = embed(checkpoint, np.concatenate(sequences))
    layers = config.num_hidden_layers
    steps = layers + (head is not None)
    with progress.task(task, unit="layers", each=True) as update:
        for n in range(layers):
            x = layer(n, LayerWeights.read(checkpoint, config, n), x, batch)
            update(_Named(f"layer {n}"), n, steps)
        if head is None:
            return x
        h = final_norm(checkpoint, config, x)
        del x
        head(h)
        update(_Named("lm_head"), steps - 1, steps)
    return None


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

    def layer(n: int, weights: LayerWeights, x: np.ndarray, batch: Batch) -> np.ndarray:
        def seen(keys: np.ndarray, values: np.ndarray) -> None:
            on_kv(n, keys, values)

        return decoder_layer(weights, x, batch, weights.as_read, on_kv=on_kv and seen)

    return streamed(checkpoint, config, sequences, layer, progress, task)


@dataclass(frozen=True)
class _Named:
    name: str


def chunked(
    a: np.ndarray, f: Callable[[np.ndarray], np.ndarray], chunk: int = TOKEN_CHUNK
) -> np.ndarray:
    """f over row chunks of `a`, concatenated: bounds the temporaries of a product."""
    return np.concatenate([f(a[s : s + chunk]) for s in range(0, len(a), chunk)])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    def rows(i: int, j: int) -> np.ndarray:
        a = x[i:j]
        return (a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + eps)) * weight

    return in_threads(rows, np.empty(x.shape, np.result_type(x, weight)))


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> None:
    def rows(i: int, j: int) -> np.ndarray:
        return gate[i:j] / (1 + np.exp(-gate[i:j])) * up[i:j]

    in_threads(rows, out)


def in_threads(f: Callable, out: np.ndarray, rows: int = 1024) -> np.ndarray:
    """out[i:j] = f(i, j) for slices of `rows` rows, in THREADS threads: a row-wise elementwise
    step over all calibration tokens is seconds of one core otherwise, while the products run
    on many (numpy's elementwise ops release the GIL; the bytes are one call's)."""

    def one(start: int) -> None:
        out[start : start + rows] = f(start, min(start + rows, len(out)))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, range(0, len(out), rows)))
    return out


def attention(qkv: np.ndarray, batch: Batch, device: Device = NUMPY) -> np.ndarray:
    """Causal GQA with rotate-half RoPE on grouped wqkv outputs, one sequence at a time (the
    rotary here, the rest on `device`)."""
    config = batch.config
    kv, g, d = config.num_key_value_heads, config.group, config.head_dim
    out = np.empty((len(qkv), config.num_attention_heads * d), np.float32)
    cos, sin = batch.cos, batch.sin

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
        list(pool.map(one, batch.spans()))
    return out


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
