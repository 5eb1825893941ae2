"""The InternLM2 decoder as onnxscript modules.

Module and parameter names are the checkpoint's own (`model.layers.3.attention.wqkv.weight`),
so the saved graph reads like the checkpoint and weights bind by name (see weights.py).
Parameters carry shapes and dtypes only; their data is attached lazily when the model is saved.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript import OpBuilder, nn

from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import LM_HEAD, QuantSpec, Target

MS = "com.microsoft"
Value = ir.Value
KeyValue = tuple[Value, Value]  # one layer's (key, value) cache


class RMSNorm(nn.Module):
    """RMSNorm in fp32 (stash_type=1); with a skip input it also returns the residual sum."""

    def __init__(self, hidden: int, eps: float, dtype: ir.DataType) -> None:
        super().__init__()
        self.weight = nn.Parameter([hidden], dtype)
        self.eps = eps

    def forward(
        self, op: OpBuilder, x: Value, residual: Value | None = None
    ) -> tuple[Value, Value]:
        """(norm(x + residual), x + residual); without a residual, (norm(x), x)."""
        if residual is None:
            normed = op.SimplifiedLayerNormalization(
                x, self.weight, axis=-1, epsilon=self.eps, stash_type=1
            )
            return normed, x
        normed, _, _, total = op.SkipSimplifiedLayerNormalization(
            x, residual, self.weight, epsilon=self.eps, _domain=MS, _version=1, _outputs=4
        )
        return normed, total


class Linear(nn.Module):
    """y = x @ W.T (+ b), with W kept as float [in, out] for MatMul."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: ir.DataType) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter([in_features, out_features], dtype)
        self.bias = nn.Parameter([out_features], dtype) if bias else None

    def forward(self, op: OpBuilder, x: Value) -> Value:
        y = op.MatMul(x, self.weight)
        return y if self.bias is None else op.Add(y, self.bias)


class QuantizedLinear(nn.Module):
    """The same contract as Linear, through com.microsoft MatMulNBits (block-wise int4/int8)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: ir.DataType, spec: QuantSpec
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        k, n = in_features, out_features
        # Act-order checkpoints: which input channel feeds each of the weight's K columns.
        self.input_order = nn.Parameter([k], ir.DataType.INT64) if spec.permuted else None
        self.weight = nn.Parameter(list(spec.packed_shape(n, k)), ir.DataType.UINT8)
        self.scales = nn.Parameter([n * spec.blocks(k)], dtype)
        self.zero_points = (
            None
            if spec.symmetric
            else nn.Parameter([n * spec.zero_point_bytes(k)], ir.DataType.UINT8)
        )
        self.bias = nn.Parameter([out_features], dtype) if bias else None

    def forward(self, op: OpBuilder, x: Value) -> Value:
        if self.input_order is not None:
            x = op.Gather(x, self.input_order, axis=-1)
        inputs = [x, self.weight, self.scales]
        if self.zero_points is not None:
            inputs.append(self.zero_points)
        attributes = self.spec.attributes(self.in_features, self.out_features)
        y = op.MatMulNBits(*inputs, **attributes, _domain=MS, _version=1)
        return y if self.bias is None else op.Add(y, self.bias)


def linear(
    in_features: int, out_features: int, bias: bool, target: Target, name: str
) -> Linear | QuantizedLinear:
    """The one place where precision picks the kind of linear layer: `target` says, by the
    layer's checkpoint name, whether it is quantized and how."""
    spec = target.linear_spec(name)
    if spec is not None:
        return QuantizedLinear(in_features, out_features, bias, target.io_dtype, spec)
    return Linear(in_features, out_features, bias, target.io_dtype)


class Rotary(nn.Module):
    """cos/sin caches [context, head_dim/2] that GroupQueryAttention indexes by position."""

    def __init__(self, length: int, head_dim: int, dtype: ir.DataType) -> None:
        super().__init__()
        self.cos_cache = nn.Parameter([length, head_dim // 2], dtype)
        self.sin_cache = nn.Parameter([length, head_dim // 2], dtype)

    def forward(self, op: OpBuilder) -> tuple[Value, Value]:
        return self.cos_cache, self.sin_cache


class Attention(nn.Module):
    """Causal GQA with rotate-half RoPE and a KV cache, one fused op.

    wqkv's rows are regrouped to [Q | K | V] when the weights are bound, so a single MatMul feeds
    GroupQueryAttention's packed-QKV input.
    """

    def __init__(self, config: InternLM2Config, target: Target, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        heads_out = config.num_attention_heads * config.head_dim
        wqkv, wo = prefix + "attention.wqkv", prefix + "attention.wo"
        self.wqkv = linear(config.hidden_size, qkv, config.bias, target, wqkv)
        self.wo = linear(heads_out, config.hidden_size, config.bias, target, wo)
        self.kv_cache = target.kv_cache
        if self.kv_cache is not None:
            # Not checkpoint tensors: scale files or calibration provide them (kv_scales.py).
            size = self.kv_cache.scale_size(config.num_key_value_heads, config.head_dim)
            self.k_scale = nn.Parameter([size], ir.DataType.FLOAT)
            self.v_scale = nn.Parameter([size], ir.DataType.FLOAT)

    def forward(
        self,
        op: OpBuilder,
        x: Value,
        past_key: Value,
        past_value: Value,
        seqlens_k: Value,
        total_length: Value,
        cos: Value,
        sin: Value,
    ) -> tuple[Value, Value, Value]:
        """(output, present key, present value)."""
        inputs = [self.wqkv(op, x), None, None, past_key, past_value, seqlens_k, total_length]
        inputs += [cos, sin]
        quantized = {}
        if self.kv_cache is not None:
            # Inputs 9-11 (position_ids, attention_bias, head_sink) unused; 12, 13 the scales.
            inputs += [None, None, None, self.k_scale, self.v_scale]
            quantized = {
                "k_quant_type": self.kv_cache.quant_type,
                "v_quant_type": self.kv_cache.quant_type,
                "kv_cache_bit_width": self.kv_cache.bits,
            }
        attended, present_key, present_value = op.GroupQueryAttention(
            *inputs,
            **self.fused_attributes(),
            **quantized,
            _domain=MS,
            _version=1,
            _outputs=3,
        )
        return self.wo(op, attended), present_key, present_value

    def fused_attributes(self) -> dict:
        """What GroupQueryAttention and PagedAttention are both told: the heads, the scale and
        InternLM2's rotate-half rotary."""
        c = self.config
        return {
            "num_heads": c.num_attention_heads,
            "kv_num_heads": c.num_key_value_heads,
            "scale": c.head_dim**-0.5,
            "do_rotary": 1,
            "rotary_interleaved": 0,
        }


class PagedAttention(Attention):
    """The same attention over og.Engine's packed batch and paged KV cache, one fused op.

    All scheduled sequences' tokens come as one [num_tokens, hidden] matrix; sequence i owns rows
    cumulative[i]:cumulative[i + 1], its cache holds past_lengths[i] tokens, and block_table row
    i names the cache blocks that hold them. com.microsoft PagedAttention rotates q and k at
    position past_lengths[i] + offset, writes the new keys and values into those blocks in place
    and attends causally within each sequence. `metadata` (CPU bounds on the query and KV
    lengths) spares the op a device-to-host read of the lengths in every layer.
    """

    def forward(
        self,
        op: OpBuilder,
        x: Value,
        key_cache: Value,
        value_cache: Value,
        cumulative: Value,
        past_lengths: Value,
        block_table: Value,
        metadata: Value,
        cos: Value,
        sin: Value,
    ) -> tuple[Value, Value, Value]:
        """(output, key cache, value cache): the caches are the inputs, updated in place."""
        # Inputs 10-15 (slot_mapping, head_sink, q/k norm weights, k/v scales) unused.
        unused = [None] * 6
        attended, key_out, value_out = op.PagedAttention(
            self.wqkv(op, x),
            None,
            None,
            key_cache,
            value_cache,
            cumulative,
            past_lengths,
            block_table,
            cos,
            sin,
            *unused,
            metadata,
            **self.fused_attributes(),
            _domain=MS,
            _version=1,
            _outputs=3,
        )
        return self.wo(op, attended), key_out, value_out


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x).

    w1 and w3 stay two products. Stacked into one (then Split) they measured slower on both
    devices: 0.95-0.98x decode on 2 CPU cores and on the H100, where the Split kernel costs more
    than one larger int4 GEMV saves (benchmarks/results/runtime-cpu2-1.8b-int4-stacking-cpu.md,
    kernels-h100-7b-int4-apart.md).
    """

    def __init__(self, config: InternLM2Config, target: Target, prefix: str = "") -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.w1 = linear(h, i, False, target, prefix + "feed_forward.w1")
        self.w3 = linear(h, i, False, target, prefix + "feed_forward.w3")
        self.w2 = linear(i, h, False, target, prefix + "feed_forward.w2")

    def forward(self, op: OpBuilder, x: Value) -> Value:
        gate = self.w1(op, x)
        return self.w2(op, op.Mul(op.Mul(gate, op.Sigmoid(gate)), self.w3(op, x)))


class DecoderLayer(nn.Module):
    """h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)).

    The residual adds are fused into the norms (SkipSimplifiedLayerNormalization adds its two
    inputs, normalizes the sum and also returns the sum), so each add happens one step later,
    inside the next norm: a layer takes the previous sublayer's output `hidden` and the
    `residual` stream before it, so attention_norm computes x = hidden + residual and norm(x);
    ffn_norm computes h = attention output + x and norm(h); the layer returns the feed-forward
    output with h as the residual, and the next layer's attention_norm (or the final norm)
    adds them. The first layer has no residual yet: its norm is a plain RMSNorm of the
    embedding.
    """

    def __init__(self, config: InternLM2Config, target: Target, index: int = 0) -> None:
        super().__init__()
        dtype = target.io_dtype
        prefix = f"model.layers.{index}."  # linear layers are chosen by checkpoint name
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.attention = (PagedAttention if target.paged else Attention)(config, target, prefix)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.feed_forward = FeedForward(config, target, prefix)

    def forward(
        self,
        op: OpBuilder,
        hidden: Value,
        residual: Value | None,
        past_key: Value,
        past_value: Value,
        mask_info: tuple[Value, ...],
        rotary: tuple[Value, Value],
    ) -> tuple[Value, Value, Value, Value]:
        """(feed-forward output, residual h, present key, present value)."""
        x, residual = self.attention_norm(op, hidden, residual)
        hidden, present_key, present_value = self.attention(
            op, x, past_key, past_value, *mask_info, *rotary
        )
        x, residual = self.ffn_norm(op, hidden, residual)
        return self.feed_forward(op, x), residual, present_key, present_value


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: ir.DataType) -> None:
        super().__init__()
        self.weight = nn.Parameter([vocab, hidden], dtype)

    def forward(self, op: OpBuilder, input_ids: Value) -> Value:
        return op.Gather(self.weight, input_ids, axis=0)


class QuantizedEmbedding(nn.Module):
    """The same contract as Embedding, from block-wise int4/int8 codes (com.microsoft
    GatherBlockQuantized). The codes and scales are laid out as MatMulNBits' B and scales, so a
    tied lm_head reads the same initializers (TiedHead): B [vocab, blocks, block bytes] is
    gathered along axis 0 and dequantized along axis 2, one block per row there; the scales
    [vocab * blocks] are reshaped to [vocab, blocks, 1] (onnxruntime folds that constant).
    Zero points (asymmetric only) are one code per byte, [vocab, blocks, 1]."""

    def __init__(self, vocab: int, hidden: int, dtype: ir.DataType, spec: QuantSpec) -> None:
        super().__init__()
        if hidden % spec.block_size:
            raise InternLM2GraphError(
                f"embedding_precision: block size {spec.block_size} does not divide "
                f"hidden_size {hidden}; choose a block size that does (e.g. -b32)"
            )
        self.vocab, self.hidden, self.spec = vocab, hidden, spec
        blocks = spec.blocks(hidden)
        self.weight = nn.Parameter(list(spec.packed_shape(vocab, hidden)), ir.DataType.UINT8)
        self.scales = nn.Parameter([vocab * blocks], dtype)
        self.zero_points = (
            None if spec.symmetric else nn.Parameter([vocab, blocks, 1], ir.DataType.UINT8)
        )

    def forward(self, op: OpBuilder, input_ids: Value) -> Value:
        blocks = self.spec.blocks(self.hidden)
        inputs = [self.weight, input_ids, op.Reshape(self.scales, [self.vocab, blocks, 1])]
        if self.zero_points is not None:
            inputs.append(self.zero_points)
        rows = op.GatherBlockQuantized(
            *inputs,
            gather_axis=0,
            quantize_axis=2,
            block_size=self.spec.block_size,
            bits=self.spec.bits,
            _domain=MS,
            _version=1,
        )  # [batch, sequence, blocks, block_size]
        return op.Reshape(rows, [0, 0, self.hidden])


def embedding(config: InternLM2Config, target: Target) -> Embedding | QuantizedEmbedding:
    """The embedding table's kind, as `target` says (embedding_precision)."""
    vocab, hidden = config.vocab_size, config.hidden_size
    if target.embedding_quant is None:
        return Embedding(vocab, hidden, target.io_dtype)
    return QuantizedEmbedding(vocab, hidden, target.io_dtype, target.embedding_quant)


class TiedHead(nn.Module):
    """The lm_head as MatMulNBits on the embedding's own codes and scales (a checkpoint that
    ties the two): no initializer of its own. The embedding runs first, so its parameters are
    already in the graph when this one names them."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.weight, self.scales, self.spec = embedding.weight, embedding.scales, embedding.spec
        self.in_features, self.out_features = embedding.hidden, embedding.vocab

    def forward(self, op: OpBuilder, x: Value) -> Value:
        attributes = self.spec.attributes(self.in_features, self.out_features)
        return op.MatMulNBits(x, self.weight, self.scales, **attributes, _domain=MS, _version=1)


class InternLM2Model(nn.Module):
    def __init__(self, config: InternLM2Config, target: Target) -> None:
        super().__init__()
        dtype = target.io_dtype
        self.tok_embeddings = embedding(config, target)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, target, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = Rotary(config.positions(target.max_length), config.head_dim, dtype)
        self.paged = target.paged is not None

    def forward(
        self,
        op: OpBuilder,
        input_ids: Value,
        attention: Value | tuple[Value, ...],
        past: list[KeyValue],
    ) -> tuple[Value, list[KeyValue]]:
        """`attention` is the 2D attention_mask, or for a paged graph og.Engine's lengths and
        block table as PagedAttention takes them (graph.PAGED_INPUTS)."""
        mask_info = attention if self.paged else attention_lengths(op, attention)
        rotary = self.rotary(op)
        hidden, residual, presents = self.tok_embeddings(op, input_ids), None, []
        for layer, (past_key, past_value) in zip(self.layers, past):
            hidden, residual, present_key, present_value = layer(
                op, hidden, residual, past_key, past_value, mask_info, rotary
            )
            presents.append((present_key, present_value))
        normed, _ = self.norm(op, hidden, residual)
        return normed, presents


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, config: InternLM2Config, target: Target) -> None:
        super().__init__()
        self.model = InternLM2Model(config, target)
        if target.tied_head:
            self.output = TiedHead(self.model.tok_embeddings)
        else:
            self.output = linear(config.hidden_size, config.vocab_size, False, target, LM_HEAD)

    def forward(
        self,
        op: OpBuilder,
        input_ids: Value,
        attention: Value | tuple[Value, ...],
        past: list[KeyValue],
        logits_rows: Value | None = None,
    ) -> tuple[Value, list[KeyValue]]:
        """Logits for every token, or only for the packed rows `logits_rows` names (og.Engine's
        logits_indices: a prompt needs its last row only, so the lm head skips the rest)."""
        hidden, presents = self.model(op, input_ids, attention, past)
        if logits_rows is not None:
            hidden = op.Gather(hidden, logits_rows, axis=0)
        return self.output(op, hidden), presents


def attention_lengths(op: OpBuilder, attention_mask: Value) -> tuple[Value, Value]:
    """GroupQueryAttention's view of the 2D mask: per-row length - 1, and the total length.

    A row is counted in float32, not in the mask's int64: onnxruntime's CUDA ReduceSum gives
    an int64 row one thread block, and with CUDA graphs onnxruntime-genai's mask row is
    max_length long at every step (60 us a step at 32k, ~1 ms at 1M; float32: 2 us,
    benchmarks/results/mask-count-h200.md). Sums of 0/1 in float32 are exact up to 2**24
    positions (config.MAX_POSITIONS).
    """
    counted = op.ReduceSum(op.Cast(attention_mask, to=ir.DataType.FLOAT), [1], keepdims=0)
    seqlens_k = op.Cast(op.Sub(counted, 1.0), to=ir.DataType.INT32)
    total = op.Cast(op.Gather(op.Shape(attention_mask), 1, axis=0), to=ir.DataType.INT32)
    return seqlens_k, total
