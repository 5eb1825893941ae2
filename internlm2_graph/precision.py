"""What a precision and an execution provider mean for the graph: dtypes, op choices, options.

Flag and option names follow `onnxruntime_genai.models.builder`, so its commands work here too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePath

import onnx_ir as ir

from internlm2_graph import presets
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.tensor_precision import LINEARS, TensorRule, parse_format, parse_rules

PRECISIONS = ("fp32", "fp16", "bf16", "int4", "int8")
EXECUTION_PROVIDERS = ("cpu", "cuda")
FLOAT_DTYPES = {
    "fp32": ir.DataType.FLOAT,
    "fp16": ir.DataType.FLOAT16,
    "bf16": ir.DataType.BFLOAT16,
}

DEFAULT_BLOCK_SIZE = 32

# Builder option names; the `int4_` spellings are the builder's older aliases, still in use.
ALIASES = {
    "int4_block_size": "block_size",
    "int4_accuracy_level": "accuracy_level",
    "int4_is_symmetric": "is_symmetric",
}
OPTIONS = {
    "block_size": f"int4/int8 block size: 16, 32, 64, 128 or 256 (default {DEFAULT_BLOCK_SIZE})",
    "accuracy_level": "MatMulNBits accuracy level 0..4 (default 4 on cpu, 0 on cuda)",
    "is_symmetric": "true/false: symmetric int4/int8 weights (default true)",
    "lm_head_precision": "int4/int8/float: the output projection's weights (default: as the body)",
    "embedding_precision": "float/int4/int8: the embedding table, GatherBlockQuantized (default "
    "float); shares its codes with the lm_head where the checkpoint ties them and both match",
    "tensor_precision": "NAME[@LAYERS]:FORMAT,...: per-linear formats, e.g. "
    "feed_forward.w2@first4+last4:int8 (FORMAT: int4/int8[-bBLOCK][-sym|-asym])",
    "quant_preset": f"a named layout, like llama.cpp's types: {', '.join(presets.PRESETS)} "
    "(explicit options override it; docs/quality-per-byte.md)",
    "use_cuda_bf16": "true/false: bf16 activations for int4 on cuda (default false: fp16)",
    "enable_cuda_graph": "true/false: capture decode in a CUDA graph (default true on cuda)",
    "enable_cuda_fpa_intb_gemm": "true/false: int4/int8 weights through onnxruntime's fpA_intB "
    "GEMM on cuda: faster for many og.Engine streams, slower for one; symmetric weights in "
    "blocks of 32 only (default false)",
    "max_length": "default search.max_length written to genai_config (default min(context, 4096))",
    "kv_cache_quant_scheme": "int8|int4|fp8 x _per_tensor|_per_channel: a quantized KV cache "
    "(default none); scales from kv_cache_scale_file, else calibrated on calibration_data",
    "kv_cache_scale_file": "JSON of KV cache scales, as the builder's kv_cache_calibration writes",
    "filename": "name of the ONNX file (default model.onnx)",
    "algo_config": "rtn/gptq/gptaq/awq: round to nearest, or GPTQ (gptaq: aimed at the float "
    "model's outputs, ~3x the time) or AWQ calibrated on text (default rtn)",
    "calibration_data": "calibration text: a UTF-8 file or a JSON list of token-id lists "
    "(default: docstrings of Python's standard library)",
    "use_paged_attention": "true/false: a PagedAttention graph for og.Engine's continuous "
    "batching (cuda only; default false)",
    "paged_block_size": "tokens per KV cache block, a multiple of 256 (default 256)",
    "max_batch_size": "most sequences og.Engine runs in one step (default 100)",
    "gpu_utilization_factor": "share of free GPU memory og.Engine gives the KV cache blocks "
    "(default 0.6; num_blocks instead fixes the count)",
    "num_blocks": "KV cache blocks og.Engine allocates (default: from gpu_utilization_factor)",
    "max_scheduled_tokens": "most tokens og.Engine schedules in one step (default: og's)",
    "paged_chunk_size": "most prompt tokens of one request per step (search.chunk_size)",
    "kv_cache_rotation": "none (hadamard needs a PagedAttention that onnxruntime 1.31/1.32 lacks)",
    "prune_lm_head": "true/false: og.Engine names the rows that need logits (logits_indices), "
    "so prompts skip the lm head (default false)",
    "prefix_caching": "true/false: og.Engine keeps finished requests' full KV blocks and serves "
    "later prompts that start with them from the cache (default: og's)",
}
# Options that shape quantized weights; a float build has none to shape.
QUANT_OPTIONS = (
    "block_size",
    "accuracy_level",
    "is_symmetric",
    "lm_head_precision",
    "embedding_precision",
    "tensor_precision",
    "quant_preset",
    "use_cuda_bf16",
    "enable_cuda_fpa_intb_gemm",
    "algo_config",
    "calibration_data",
)
# Options of the paged (og.Engine) graph; without use_paged_attention=true they mean nothing.
PAGED_OPTIONS = (
    "paged_block_size",
    "max_batch_size",
    "gpu_utilization_factor",
    "num_blocks",
    "max_scheduled_tokens",
    "paged_chunk_size",
    "prune_lm_head",
    "prefix_caching",
)
# The linear layer whose precision `lm_head_precision` sets, by its checkpoint name.
LM_HEAD = "output"


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one linear layer's weights are stored for com.microsoft MatMulNBits, validated once."""

    bits: int = 4
    block_size: int = DEFAULT_BLOCK_SIZE
    symmetric: bool = True
    accuracy_level: int = 0
    # Act-order checkpoints (prequantized.py): the input channels are gathered into block order
    # before the MatMulNBits, because the checkpoint's groups are not runs of channels.
    permuted: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InternLM2GraphError(f"bits must be 4 or 8 (int4 or int8), got {self.bits!r}")
        bs = self.block_size
        if not (isinstance(bs, int) and 16 <= bs <= 256 and bs & (bs - 1) == 0):
            raise InternLM2GraphError(
                f"int4_block_size must be a power of two from 16 to 256, got {bs!r}"
            )
        if self.accuracy_level not in range(5):
            raise InternLM2GraphError(
                f"int4_accuracy_level must be 0..4 (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), "
                f"got {self.accuracy_level!r}"
            )

    def blocks(self, k: int) -> int:
        """Blocks per output row: K is zero-padded up to whole blocks."""
        return -(-k // self.block_size)

    def packed_shape(self, n: int, k: int) -> tuple[int, int, int]:
        """MatMulNBits' B: uint8 [N, blocks, block_size * bits / 8]."""
        return n, self.blocks(k), self.block_size * self.bits // 8

    def zero_point_bytes(self, k: int) -> int:
        """Bytes of packed zero points per output row (asymmetric only): bits per block."""
        return -(-self.blocks(k) * self.bits // 8)

    def attributes(self, k: int, n: int) -> dict[str, int]:
        """The MatMulNBits node's attributes: the one place this rule lives.

        accuracy_level is always written, 0 included (0 means "unset" to onnxruntime), so a
        graph says what it asks for even where onnxruntime's own quantizer would omit it.
        """
        return {
            "K": k,
            "N": n,
            "bits": self.bits,
            "block_size": self.block_size,
            "accuracy_level": self.accuracy_level,
        }


# How quantized weights are rounded: to nearest; by GPTQ, aimed at each linear's float weight
# (gptq) or at the float model's outputs (gptaq); or to nearest after AWQ's activation-aware
# scaling. All but rtn are calibrated on text (calibration/).
ALGORITHMS = ("rtn", "gptq", "gptaq", "awq")


# What a KV cache value is divided by its scale into: the largest code (signed int8 and int4
# use 2^(bits-1), as onnxruntime's kernels and the builder's scale files do; fp8 e4m3 its
# largest finite value).
KV_QMAX = {"int8": 128.0, "int4": 8.0, "fp8": 448.0}
KV_GRANULARITY = {"per_tensor": "PER_TENSOR", "per_channel": "PER_CHANNEL"}
# The KV cache kinds onnxruntime's GroupQueryAttention runs, per execution provider (CPU:
# onnxruntime 1.32, "Could not find an implementation" for fp8).
KV_KERNELS = {"cpu": ("int8", "int4"), "cuda": ("int8", "int4", "fp8")}


@dataclass(frozen=True)
class KVCacheSpec:
    """A quantized KV cache: GroupQueryAttention stores keys (after rotary) and values as
    `kind` codes times a scale per tensor or per channel (kv_head x head_dim)."""

    kind: str  # int8 | int4 | fp8
    granularity: str  # per_tensor | per_channel
    scale_file: str | None = None

    @property
    def scheme(self) -> str:
        return f"{self.kind}_{self.granularity}"

    @property
    def bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    @property
    def dtype(self) -> ir.DataType:
        """The cache tensors' element type (int4 codes are packed two to a byte)."""
        return {
            "int8": ir.DataType.INT8,
            "int4": ir.DataType.UINT8,
            "fp8": ir.DataType.FLOAT8E4M3FN,
        }[self.kind]

    @property
    def qmax(self) -> float:
        return KV_QMAX[self.kind]

    @property
    def quant_type(self) -> str:
        return KV_GRANULARITY[self.granularity]

    @property
    def bytes_per_value(self) -> float:
        return self.bits / 8

    def stored_head_size(self, head_dim: int) -> int:
        return head_dim // 2 if self.bits == 4 else head_dim

    def scale_size(self, kv_heads: int, head_dim: int) -> int:
        return kv_heads * head_dim if self.granularity == "per_channel" else 1


# onnxruntime 1.31's CUDA PagedAttention runs prompts through FlashAttention, whose paged KV
# cache needs blocks of a multiple of 256 tokens ("PagedAttention requires FlashAttention ...
# block_size a multiple of"); the builder's default is 256 too.
PAGED_BLOCK_MULTIPLE = 256
# The onnxruntime releases whose PagedAttention schema was read (1.31.1 CUDA, 1.32.0 CPU): no
# per-token KV scales and no Hadamard rotation, which the builder writes for a later release.
PAGED_ORT = "1.31/1.32"


@dataclass(frozen=True, kw_only=True)
class PagedSpec:
    """og.Engine's continuous batching: a PagedAttention graph over a pool of KV cache blocks.

    The option names and defaults are the builder's; the engine reads them from genai_config's
    `engine.dynamic_batching` (package.py), the graph takes `block_size` as its cache shape.
    """

    block_size: int = PAGED_BLOCK_MULTIPLE
    max_batch_size: int = 100
    gpu_utilization_factor: float | None = 0.6  # None when num_blocks fixes the pool
    num_blocks: int | None = None
    max_scheduled_tokens: int | None = None
    chunk_size: int | None = None
    prune_lm_head: bool = False
    prefix_caching: bool | None = None  # None: og's default, not written

    def __post_init__(self) -> None:
        factor = self.gpu_utilization_factor
        if factor is not None and not 0 < factor <= 1:
            raise InternLM2GraphError(
                f"--extra_options gpu_utilization_factor={factor}: expected a number in (0, 1]"
            )
        for key, value in (
            ("paged_block_size", self.block_size),
            ("max_batch_size", self.max_batch_size),
            ("num_blocks", self.num_blocks),
            ("max_scheduled_tokens", self.max_scheduled_tokens),
            ("paged_chunk_size", self.chunk_size),
        ):
            if value is not None and value <= 0:
                raise InternLM2GraphError(
                    f"--extra_options {key}={value}: expected a positive whole number"
                )

    def dynamic_batching(self) -> dict:
        """genai_config's engine.dynamic_batching: what og.Engine schedules with."""
        section = {"block_size": self.block_size, "max_batch_size": self.max_batch_size}
        if self.num_blocks is not None:
            section["num_blocks"] = self.num_blocks
        else:
            section["gpu_utilization_factor"] = self.gpu_utilization_factor
        if self.max_scheduled_tokens is not None:
            section["max_scheduled_tokens"] = self.max_scheduled_tokens
        if self.prefix_caching is not None:
            section["prefix_caching"] = self.prefix_caching
        return section


@dataclass(frozen=True)
class Target:
    """Everything a build needs to know about precision and device, decided once.

    The graph, the size estimates, the reference and the runtime config ask this object; none
    of them works a precision's consequences out again.
    """

    precision: str
    execution_provider: str
    io_dtype: ir.DataType
    quant: QuantSpec | None = None
    lm_head_quant: QuantSpec | None = None
    enable_cuda_graph: bool = False
    max_length: int | None = None
    filename: str = "model.onnx"
    kv_cache: KVCacheSpec | None = None
    algorithm: str = "rtn"  # how quantized weights are made: one of ALGORITHMS (calibration/)
    calibration_data: str | None = None
    paged: PagedSpec | None = None  # a PagedAttention graph for og.Engine (None: GQA)
    # A pre-quantized checkpoint's own choice per linear layer, by checkpoint name (None: kept
    # in float), and its format's name; set by prequantized.target, never by options.
    layer_specs: Mapping[str, QuantSpec | None] | None = field(default=None, compare=False)
    prequantized: str | None = None
    # MatMulNBits through the fpA_intB GEMM (session option ep.cuda.fpa_intb_gemm): at 64
    # og.Engine streams of a 7B int4 1.6x the output tok/s of the default path, which
    # dequantizes every weight to fp16 each step; 0.73x at one stream (H100,
    # benchmarks/results/engine-load-h100-7b-int4-fpa.md).
    fpa_intb_gemm: bool = False
    embedding_quant: QuantSpec | None = None  # GatherBlockQuantized; None: float Gather
    tensor_rules: tuple[TensorRule, ...] = ()  # tensor_precision, in the order given
    # The lm_head reads the embedding's codes (set by for_checkpoint: the checkpoint ties them).
    tied_head: bool = False

    def linear_spec(self, name: str) -> QuantSpec | None:
        """How the linear layer `name` stores its weights: a QuantSpec, or None for float.

        `name` is the layer's checkpoint name ("output", "model.layers.3.attention.wqkv") or
        its last part ("attention.wqkv"). A checkpoint published quantized decides for itself
        (layer_specs); else the last matching tensor_precision rule, else the lm head's or the
        body's.
        """
        if self.layer_specs is not None and name in self.layer_specs:
            return self.layer_specs[name]
        for rule in reversed(self.tensor_rules):
            if rule.matches(name):
                return rule.spec
        return self.lm_head_quant if name == LM_HEAD else self.quant

    def for_layers(self, layers: int) -> Target:
        """This target with its tensor_precision rules bound to a model of `layers` layers."""
        return replace(self, tensor_rules=tuple(r.bound(layers) for r in self.tensor_rules))

    @property
    def can_tie(self) -> bool:
        """Whether a tied checkpoint's head can read the embedding's codes: the same format,
        symmetric (GatherBlockQuantized and MatMulNBits lay out zero points differently)."""
        spec = self.embedding_quant
        return spec is not None and spec == self.lm_head_quant and spec.symmetric

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation value, and per value of the norms and embedding."""
        return self.io_dtype.itemsize

    @property
    def kv_dtype(self) -> ir.DataType:
        return self.io_dtype if self.kv_cache is None else self.kv_cache.dtype

    @property
    def kv_bytes_per_value(self) -> float:
        return self.activation_bytes if self.kv_cache is None else self.kv_cache.bytes_per_value


def parse_extra_options(items: list[str] | None) -> dict[str, str]:
    """KEY=VALUE strings to a dict; resolve_target checks the keys."""
    options: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InternLM2GraphError(
                f"--extra_options: {item!r} is not KEY=VALUE (e.g. int4_block_size=32)"
            )
        if key in options and options[key] != value:
            raise InternLM2GraphError(
                f"--extra_options: {key} is given twice ({options[key]!r} and {value!r}); keep one"
            )
        options[key] = value
    return options


def resolve_target(
    precision: str,
    execution_provider: str,
    extra_options: dict[str, str] | None = None,
    other_options: Iterable[str] = (),
) -> Target:
    """The Target of a precision, execution provider and builder options, every option checked.
    `other_options`: names another part of the build takes (speculative decoding's), listed
    with these when a name is unknown."""
    options = {ALIASES.get(k, k): str(v) for k, v in (extra_options or {}).items()}
    if "quant_preset" in options and precision in PRECISIONS:
        options = presets.apply_preset(options, precision)
    _check_names(options, other_options)
    _check_pair(precision, execution_provider)
    cuda = execution_provider == "cuda"
    quantized = precision in ("int4", "int8")
    # calibration_data also calibrates a quantized KV cache that comes without a scale file.
    calibrated_kv = "kv_cache_quant_scheme" in options and "kv_cache_scale_file" not in options
    misplaced = sorted(set(QUANT_OPTIONS) & options.keys()) if not quantized else []
    if calibrated_kv and "calibration_data" in misplaced:
        misplaced.remove("calibration_data")
    if misplaced:
        raise InternLM2GraphError(
            f"--extra_options {', '.join(misplaced)} only apply to --precision int4/int8"
        )
    io_dtype = _io_dtype(precision, cuda, options)
    cuda_only = sorted(
        {"use_cuda_bf16", "enable_cuda_graph", "enable_cuda_fpa_intb_gemm"} & options.keys()
    )
    if cuda_only and not cuda:
        raise InternLM2GraphError(
            f"--extra_options {', '.join(cuda_only)} only applies to --execution_provider cuda"
        )
    quant = lm_head_quant = embedding_quant = None
    rules: tuple[TensorRule, ...] = ()
    if quantized:
        quant, lm_head_quant, embedding_quant, rules = _quant_specs(precision, cuda, options)
    fpa_intb_gemm = quantized and _bool(options, "enable_cuda_fpa_intb_gemm", False)
    if fpa_intb_gemm:
        _check_fpa_intb(quant)
    algorithm = _algorithm(options, calibrated_kv)
    return Target(
        precision=precision,
        execution_provider=execution_provider,
        io_dtype=io_dtype,
        quant=quant,
        lm_head_quant=lm_head_quant,
        enable_cuda_graph=_bool(options, "enable_cuda_graph", cuda) if cuda else False,
        max_length=_max_length(options),
        filename=_filename(options),
        kv_cache=_kv_cache(options, execution_provider),
        algorithm=algorithm,
        calibration_data=options.get("calibration_data"),
        paged=_paged(options, execution_provider),
        fpa_intb_gemm=fpa_intb_gemm,
        embedding_quant=embedding_quant,
        tensor_rules=rules,
    )


def fpa_intb_refusal(spec: QuantSpec) -> str | None:
    """Why onnxruntime-gpu 1.31's fpA_intB kernels would not take a MatMulNBits of `spec`, or
    None. Its wheel carries the compact kernel set: scale-only weights (no zero points, no
    g_idx) in blocks of 32 (read from the wheel's kernels and messages); any other node keeps the
    default path, so the session option would do nothing for it."""
    if not spec.symmetric:
        return "asymmetric weights (zero points)"
    if spec.block_size != 32:
        return f"blocks of {spec.block_size}"
    if spec.permuted:
        return "act-order weights (g_idx)"
    return None


def check_fpa_intb(target: Target, layers: int, source: str) -> None:
    """enable_cuda_fpa_intb_gemm is refused where no MatMulNBits of the build can take it,
    whatever decided the layers' formats (tensor_precision, a pre-quantized checkpoint)."""
    if not target.fpa_intb_gemm:
        return
    names = [*(f"model.layers.{i}.{n}" for i in range(layers) for n in LINEARS), LM_HEAD]
    specs = [spec for spec in map(target.linear_spec, names) if spec is not None]
    why = [fpa_intb_refusal(spec) for spec in specs]
    if specs and all(why):
        kind = f" (a {target.prequantized} checkpoint)" if target.prequantized else ""
        raise InternLM2GraphError(
            f"--extra_options enable_cuda_fpa_intb_gemm=true: every quantized linear built from "
            f"{source}{kind} has {why[0]}, and onnxruntime-gpu's fpA_intB kernels take "
            "symmetric weights in blocks of 32 only; drop the option (its layers run on the "
            "default MatMulNBits path)"
        )


def _check_fpa_intb(quant: QuantSpec) -> None:
    why = fpa_intb_refusal(quant)
    if why:
        raise InternLM2GraphError(
            f"--extra_options enable_cuda_fpa_intb_gemm=true: onnxruntime-gpu's fpA_intB kernels "
            f"take symmetric weights in blocks of 32, not {why}, and would leave every "
            "MatMulNBits on the default path; drop is_symmetric=false / int4_block_size, or "
            "enable_cuda_fpa_intb_gemm"
        )


def _check_names(options: dict[str, str], other_options: Iterable[str]) -> None:
    for key in options:
        if key not in OPTIONS:
            raise InternLM2GraphError(
                f"--extra_options: unknown option {key!r}; use one of "
                f"{', '.join([*OPTIONS, *other_options])} "
                "(--help describes them)"
            )


def _check_pair(precision: str, execution_provider: str) -> None:
    """A precision and execution provider onnxruntime can run together."""
    if precision not in PRECISIONS:
        raise InternLM2GraphError(
            f"--precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}"
        )
    if execution_provider not in EXECUTION_PROVIDERS:
        raise InternLM2GraphError(
            f"--execution_provider {execution_provider!r} is not supported; "
            f"use one of {', '.join(EXECUTION_PROVIDERS)}"
        )
    cuda = execution_provider == "cuda"
    if precision == "bf16" and not cuda:
        raise InternLM2GraphError(
            "--precision bf16 needs --execution_provider cuda: onnxruntime's CPU "
            "GroupQueryAttention has no bf16 kernel; on cpu use fp32 (exact) or int4 (fast)"
        )
    if precision == "fp32" and cuda:
        raise InternLM2GraphError(
            "--precision fp32 with --execution_provider cuda is not supported: CUDA "
            "GroupQueryAttention runs fp16/bf16 only; use fp16, bf16 or int4 on cuda"
        )


def _io_dtype(precision: str, cuda: bool, options: dict[str, str]) -> ir.DataType:
    """The activations' type: the float precision's, float32 for int4/int8 on cpu, fp16 (or
    bf16 by use_cuda_bf16) for int4/int8 on cuda."""
    if precision in FLOAT_DTYPES:
        return FLOAT_DTYPES[precision]
    if not cuda:
        return ir.DataType.FLOAT
    bf16 = _bool(options, "use_cuda_bf16", False)
    return ir.DataType.BFLOAT16 if bf16 else ir.DataType.FLOAT16


def _quant_specs(
    precision: str, cuda: bool, options: dict[str, str]
) -> tuple[QuantSpec, QuantSpec | None, QuantSpec | None, tuple[TensorRule, ...]]:
    """The decoder linears' QuantSpec, the lm head's and the embedding's (None: float), and the
    tensor_precision rules."""
    bits = 4 if precision == "int4" else 8
    quant = QuantSpec(
        bits=bits,
        block_size=_int(options, "block_size", DEFAULT_BLOCK_SIZE),
        symmetric=_bool(options, "is_symmetric", True),
        accuracy_level=_int(options, "accuracy_level", 0 if cuda else 4),
    )
    head = options.get("lm_head_precision", precision)
    lm_head_quant = parse_format(head, quant, f"lm_head_precision={head}")
    embedding = options.get("embedding_precision", "float")
    embedding_quant = parse_format(embedding, quant, f"embedding_precision={embedding}")
    rules = parse_rules(options["tensor_precision"], quant) if "tensor_precision" in options else ()
    return quant, lm_head_quant, embedding_quant, rules


def _algorithm(options: dict[str, str], calibrated_kv: bool) -> str:
    """algo_config, checked, and calibration_data only where something is calibrated."""
    algorithm = options.get("algo_config", "rtn")
    if algorithm not in ALGORITHMS:
        raise InternLM2GraphError(
            f"--extra_options algo_config={algorithm!r}: use one of {', '.join(ALGORITHMS)}"
        )
    if "tensor_precision" in options and algorithm == "awq":
        raise InternLM2GraphError(
            "--extra_options tensor_precision works with algo_config=rtn/gptq/gptaq; AWQ scales "
            "a layer's linears together for one format (use gptaq)"
        )
    if "calibration_data" in options and algorithm == "rtn" and not calibrated_kv:
        raise InternLM2GraphError(
            "--extra_options calibration_data only applies with algo_config=gptq/gptaq/awq or a "
            "kv_cache_quant_scheme without kv_cache_scale_file (round to nearest needs no data)"
        )
    return algorithm


def supported_targets() -> list[Target]:
    """Every precision / execution provider pair a build accepts, with default options."""
    targets = []
    for precision in PRECISIONS:
        for provider in EXECUTION_PROVIDERS:
            try:
                targets.append(resolve_target(precision, provider))
            except InternLM2GraphError:
                continue  # refused: resolve_target says why when a user asks for it
    return targets


def _kv_cache(options: dict[str, str], execution_provider: str) -> KVCacheSpec | None:
    scheme = options.get("kv_cache_quant_scheme", "none")
    scale_file = options.get("kv_cache_scale_file")
    if scheme == "none":
        if scale_file is not None:
            raise InternLM2GraphError(
                "--extra_options kv_cache_scale_file needs kv_cache_quant_scheme (e.g. "
                "kv_cache_quant_scheme=int8_per_channel)"
            )
        return None
    kind, _, granularity = scheme.partition("_")
    known = [f"{k}_{g}" for k in KV_QMAX for g in KV_GRANULARITY]
    if scheme.endswith("_per_token"):
        raise InternLM2GraphError(
            f"--extra_options kv_cache_quant_scheme={scheme}: per-token scales are not in "
            f"onnxruntime {PAGED_ORT}'s PagedAttention (the builder writes them for a later "
            "onnxruntime); use one of " + ", ".join(known)
        )
    if kind not in KV_QMAX or granularity not in KV_GRANULARITY:
        raise InternLM2GraphError(
            f"--extra_options kv_cache_quant_scheme={scheme!r}: use none or one of "
            + ", ".join(known)
        )
    working = KV_KERNELS[execution_provider]
    if kind not in working:
        raise InternLM2GraphError(
            f"--extra_options kv_cache_quant_scheme={scheme}: onnxruntime's "
            f"{execution_provider} GroupQueryAttention has no {kind} KV cache kernel; use "
            + ", ".join(f"{k}_{g}" for k in working for g in KV_GRANULARITY)
        )
    return KVCacheSpec(kind, granularity, scale_file)


def _paged(options: dict[str, str], execution_provider: str) -> PagedSpec | None:
    rotation = options.get("kv_cache_rotation", "none").strip().lower()
    if rotation != "none":
        raise InternLM2GraphError(
            f"--extra_options kv_cache_rotation={options['kv_cache_rotation']}: onnxruntime "
            f"{PAGED_ORT}'s PagedAttention has no KV rotation (the builder writes it for a later "
            "onnxruntime); use kv_cache_rotation=none"
        )
    given = sorted(set(PAGED_OPTIONS) & options.keys())
    if not _bool(options, "use_paged_attention", False):
        if given:
            raise InternLM2GraphError(
                f"--extra_options {', '.join(given)} only apply with use_paged_attention=true"
            )
        return None
    if execution_provider != "cuda":
        raise InternLM2GraphError(
            "--extra_options use_paged_attention=true needs --execution_provider cuda: "
            "onnxruntime's PagedAttention runs on CUDA only; on cpu, og.Engine runs a folder "
            "built without it, batching requests statically"
        )
    if "kv_cache_quant_scheme" in options:
        raise InternLM2GraphError(
            "--extra_options kv_cache_quant_scheme with use_paged_attention=true is not built "
            "yet: drop one of them (a quantized KV cache works with the GroupQueryAttention graph)"
        )
    if "num_blocks" in options and "gpu_utilization_factor" in options:
        raise InternLM2GraphError(
            "--extra_options num_blocks and gpu_utilization_factor both size the KV cache "
            "pool; keep one"
        )
    block_size = _int(options, "paged_block_size", PAGED_BLOCK_MULTIPLE)
    if block_size % PAGED_BLOCK_MULTIPLE:
        raise InternLM2GraphError(
            f"--extra_options paged_block_size={block_size}: use a multiple of "
            f"{PAGED_BLOCK_MULTIPLE} (onnxruntime's CUDA PagedAttention runs prompts through "
            "FlashAttention, which needs it)"
        )
    num_blocks = _optional_int(options, "num_blocks")
    return PagedSpec(
        block_size=block_size,
        max_batch_size=_int(options, "max_batch_size", 100),
        gpu_utilization_factor=None
        if num_blocks is not None
        else _float(options, "gpu_utilization_factor", 0.6),
        num_blocks=num_blocks,
        max_scheduled_tokens=_optional_int(options, "max_scheduled_tokens"),
        chunk_size=_optional_int(options, "paged_chunk_size"),
        prune_lm_head=_bool(options, "prune_lm_head", False),
        prefix_caching=_bool(options, "prefix_caching", None),
    )


def _optional_int(options: dict[str, str], key: str) -> int | None:
    return _int(options, key, 0) if key in options else None


def _float(options: dict[str, str], key: str, default: float) -> float:
    if key not in options:
        return default
    try:
        return float(options[key])
    except ValueError:
        raise InternLM2GraphError(
            f"--extra_options {key}={options[key]!r}: expected a number"
        ) from None


def _max_length(options: dict[str, str]) -> int | None:
    if "max_length" not in options:
        return None
    value = _int(options, "max_length", 0)
    if value <= 0:
        raise InternLM2GraphError(
            f"--extra_options max_length={options['max_length']!r}: expected a positive number"
        )
    return value


def _filename(options: dict[str, str]) -> str:
    """A plain file name: a path such as ../model.onnx would write outside --output."""
    name = options.get("filename", "model.onnx")
    if PurePath(name).name != name or name in (".", "..") or not name.endswith(".onnx"):
        raise InternLM2GraphError(
            f"--extra_options filename={name!r}: expected a file name ending in .onnx, "
            "without folders (the model is written into --output)"
        )
    return name


def _bool(options: dict[str, str], key: str, default: bool | None) -> bool | None:
    if key not in options:
        return default
    value = options[key].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InternLM2GraphError(f"--extra_options {key}={options[key]!r}: expected true or false")


def _int(options: dict[str, str], key: str, default: int) -> int:
    if key not in options:
        return default
    try:
        return int(options[key])
    except ValueError:
        raise InternLM2GraphError(
            f"--extra_options {key}={options[key]!r}: expected a whole number"
        ) from None
