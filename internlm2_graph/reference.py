"""A plain numpy forward pass of InternLM2, the oracle for the graph.

Written from the model's math (shared docs: internlm2.md), independently of the graph code: it
reads the checkpoint with the safetensors library, keeps wqkv in its grouped layout, computes in
float64, and follows the Hugging Face implementation's rotary semantics step by step. Meant for
small models: it loads every weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets numpy hold the bf16 tensors safetensors returns)
import numpy as np
from safetensors.numpy import load_file


@dataclass
class Cache:
    keys: list = field(default_factory=list)  # per layer [kv_heads, seq, head_dim]
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


class Reference:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.cfg = json.loads((folder / "config.json").read_text())
        self.w: dict[str, np.ndarray] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            for name, array in load_file(shard).items():
                self.w[name] = array.astype(np.float64)
        c = self.cfg
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads", self.heads)
        self.d = c["hidden_size"] // self.heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.layers = c["num_hidden_layers"]

    # --- pieces ---------------------------------------------------------------------------

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps))

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def rotary(self, positions: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin [len(positions), d] as the HF rotary module computes them for `total` tokens."""
        c, d = self.cfg, self.d
        base = c.get("rope_theta", 10000.0)
        scaling = c.get("rope_scaling") or {}
        t = positions.astype(np.float64)
        if scaling.get("type") == "linear":
            t = t / scaling["factor"]
        elif scaling.get("type") == "dynamic" and total > c["max_position_embeddings"]:
            f, max_pos = scaling["factor"], c["max_position_embeddings"]
            base = base * ((f * total / max_pos) - (f - 1)) ** (d / (d - 2))
        inv_freq = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
        freqs = np.outer(t, inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb), np.sin(emb)

    @staticmethod
    def rotate_half(x: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    def attention(self, x: np.ndarray, layer: int, cache: Cache, cos, sin) -> np.ndarray:
        seq = x.shape[0]
        g = self.heads // self.kv_heads
        qkv = self.linear(x, f"model.layers.{layer}.attention.wqkv")
        qkv = qkv.reshape(seq, self.kv_heads, g + 2, self.d)
        q = qkv[:, :, :g].reshape(seq, self.heads, self.d).transpose(1, 0, 2)
        k = qkv[:, :, g].transpose(1, 0, 2)
        v = qkv[:, :, g + 1].transpose(1, 0, 2)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        if len(cache.keys) > layer:
            k = np.concatenate([cache.keys[layer], k], axis=1)
            v = np.concatenate([cache.values[layer], v], axis=1)
            cache.keys[layer], cache.values[layer] = k, v
        else:
            cache.keys.append(k)
            cache.values.append(v)
        total = k.shape[1]
        k = np.repeat(k, g, axis=0)
        v = np.repeat(v, g, axis=0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(self.d)
        past = total - seq
        causal = np.arange(total)[None, :] > (past + np.arange(seq))[:, None]
        scores = np.where(causal, -np.inf, scores)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        out = (probs @ v).transpose(1, 0, 2).reshape(seq, self.heads * self.d)
        return self.linear(out, f"model.layers.{layer}.attention.wo")

    def feed_forward(self, x: np.ndarray, layer: int) -> np.ndarray:
        p = f"model.layers.{layer}.feed_forward"
        gate = self.linear(x, p + ".w1")
        silu = gate / (1.0 + np.exp(-gate))
        return self.linear(silu * self.linear(x, p + ".w3"), p + ".w2")

    # --- the model ------------------------------------------------------------------------

    def forward(self, input_ids, cache: Cache | None = None) -> tuple[np.ndarray, Cache]:
        """Logits [seq, vocab] for one sequence (no batch axis), extending `cache`."""
        cache = cache if cache is not None else Cache()
        x = self.rmsnorm(self.hidden_states(input_ids, cache), self.w["model.norm.weight"])
        return x @ self.w["output.weight"].T, cache

    def hidden_states(self, input_ids, cache: Cache) -> np.ndarray:
        """The last decoder layer's output [seq, hidden], before the final norm, extending
        `cache`."""
        ids = np.asarray(input_ids, dtype=np.int64)
        past = cache.length
        total = past + len(ids)
        cos, sin = self.rotary(np.arange(past, total), total)
        x = self.w["model.tok_embeddings.weight"][ids]
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            x = x + self.attention(
                self.rmsnorm(x, self.w[p + ".attention_norm.weight"]), layer, cache, cos, sin
            )
            x = x + self.feed_forward(self.rmsnorm(x, self.w[p + ".ffn_norm.weight"]), layer)
        return x

    def greedy(
        self, prompt, steps: int, eos: tuple[int, ...] = ()
    ) -> tuple[list[int], list[np.ndarray]]:
        """Greedy decode: the new tokens and the logits that chose each (prompt's last first).

        Stops after emitting an id in `eos`, as the runtime does.
        """
        logits, cache = self.forward(prompt)
        chosen, history = [], [logits[-1]]
        for _ in range(steps):
            token = int(np.argmax(history[-1]))
            chosen.append(token)
            if token in eos:
                break
            logits, cache = self.forward([token], cache)
            history.append(logits[-1])
        return chosen, history


def quantized_reference(folder: str | Path, target) -> Reference:
    """The reference computing with the weights an int4/int8 build holds: each MatMulNBits
    weight quantized and dequantized exactly as the build does. Comparing a quantized build with
    this isolates the runtime's arithmetic from quantization noise."""
    from internlm2_graph.quantize import dequantize, quantize

    reference = Reference(folder)
    target = target.for_layers(reference.layers)
    for name, weight in reference.w.items():
        if weight.ndim != 2:
            continue  # not a matrix
        if name == "model.tok_embeddings.weight":
            spec = target.embedding_quant
        else:
            spec = target.linear_spec(name.removesuffix(".weight"))  # as the graph asks
        if spec is not None:
            restored = dequantize(quantize(weight.astype(np.float32), spec))
            reference.w[name] = restored.astype(np.float64)
    return reference


def paged_attention(
    qkv: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    cumulative: np.ndarray,
    past_lengths: np.ndarray,
    block_table: np.ndarray,
    cos_cache: np.ndarray,
    sin_cache: np.ndarray,
    *,
    num_heads: int,
    kv_num_heads: int,
    scale: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """com.microsoft PagedAttention as the paged graph uses it, in plain numpy (float64 inside).

    `qkv` [tokens, (heads + 2 * kv_heads) * d] packs every sequence's new tokens: sequence i owns
    rows cumulative[i]:cumulative[i + 1], has past_lengths[i] tokens cached, and its token at
    position p lives in block block_table[i, p // block_size], slot p % block_size of the caches
    [blocks, block_size, kv_heads, d]. Rotate-half rotary at each token's position, keys and
    values written into their slots, then causal attention over the sequence's whole cache.
    Returns (output [tokens, heads * d], key cache, value cache), the caches as new arrays.
    """
    tokens, d = qkv.shape[0], 2 * cos_cache.shape[1]
    q_end, k_end = num_heads * d, (num_heads + kv_num_heads) * d
    q = qkv[:, :q_end].reshape(tokens, num_heads, d).astype(np.float64)
    k = qkv[:, q_end:k_end].reshape(tokens, kv_num_heads, d).astype(np.float64)
    v = qkv[:, k_end:].reshape(tokens, kv_num_heads, d)
    key_cache, value_cache = key_cache.copy(), value_cache.copy()
    block_size, group = key_cache.shape[1], num_heads // kv_num_heads
    out = np.zeros((tokens, num_heads, d))
    for i, past in enumerate(np.asarray(past_lengths, dtype=np.int64)):
        start, end = int(cumulative[i]), int(cumulative[i + 1])
        if end == start:
            continue
        new = past + np.arange(end - start)
        cos = np.tile(cos_cache[new], 2)[:, None, :].astype(np.float64)
        sin = np.tile(sin_cache[new], 2)[:, None, :].astype(np.float64)
        qi = q[start:end] * cos + Reference.rotate_half(q[start:end]) * sin
        ki = k[start:end] * cos + Reference.rotate_half(k[start:end]) * sin
        key_cache[block_table[i, new // block_size], new % block_size] = ki
        value_cache[block_table[i, new // block_size], new % block_size] = v[start:end]
        every = np.arange(new[-1] + 1)
        where = (block_table[i, every // block_size], every % block_size)
        keys = np.repeat(key_cache[where].astype(np.float64), group, axis=1)
        values = np.repeat(value_cache[where].astype(np.float64), group, axis=1)
        scores = np.einsum("thd,shd->hts", qi, keys) * scale
        scores = np.where(every[None, None, :] > new[None, :, None], -np.inf, scores)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[start:end] = np.einsum("hts,shd->thd", probs, values)
    return out.reshape(tokens, num_heads * d).astype(qkv.dtype), key_cache, value_cache
