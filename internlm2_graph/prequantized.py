"""Published 4-bit checkpoints, read code for code: AWQ "gemm", GPTQ v1, compressed-tensors.

All three store, per linear layer, raw 4-bit codes q, a scale s and a zero point z per group of
input channels, with w = (q - z) * s: MatMulNBits' own layout. So their codes, scales and zero
points are carried into MatMulNBits unchanged (block size = the group size), and a float build
dequantizes them exactly. Nothing is requantized.

How each format stores a linear with K inputs, N outputs and groups of g (checked against each
format's own packing code; tests/test_prequantized.py ports their unpacking to numpy):

- AWQ "gemm" (AutoAWQ, lmdeploy): `qweight` int32 [K, N/8], nibble i of word c holding output
  column 8c + AWQ_ORDER[i]; `qzeros` int32 [K/g, N/8] packed the same way, zero points as is;
  `scales` [K/g, N].
- GPTQ v1 (AutoGPTQ, GPTQModel): `qweight` int32 [K/8, N], input row 8r + i in nibble i (low
  first); `qzeros` int32 [K/g, N/8], output column 8c + i in nibble i, holding z - 1; `scales`
  [K/g, N]; `g_idx` int32 [K], the group of each input channel (act-order: not k // g).
- compressed-tensors pack-quantized: `weight_packed` int32 [N, K/8], input column 8c + i in nibble
  i, codes offset by +8 (so stored unsigned); `weight_scale` [N, K/g]; `weight_zero_point` int32
  [N/8, K/g] (asymmetric only) packed along the output axis, offset by +8; `weight_g_idx` [K].

Act-order (g_idx not k // g): the groups are sets of input channels, not runs. The input
channels are put in group order once (a stable sort by g_idx), so blocks are contiguous again,
and the graph gathers the activation's channels into that order before the MatMulNBits
(modules.QuantizedLinear). The codes themselves never change.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from internlm2_graph.checkpoint import Checkpoint, TensorRef, wrong_dtype
from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import ALIASES, QuantSpec, Target
from internlm2_graph.quantize import QuantizedWeight

FORMATS = ("awq", "gptq", "compressed-tensors")
# Nibble i of an AWQ "gemm" word holds output column 8c + AWQ_ORDER[i] (AutoAWQ packing_utils).
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
LAYER_LINEARS = (
    "attention.wqkv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w3",
    "feed_forward.w2",
)
LM_HEAD = "output"
# What each format names its tensors, after the module's name.
TENSORS = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"),
}
# MatMulNBits' block sizes: a group that is not one of them (larger, a whole row with group_size
# -1, or e.g. 96) is split into blocks that repeat its scale and zero point: still exact.
MAX_BLOCK = 256
MIN_BLOCK = 16


@dataclass(frozen=True)
class Scheme:
    """How one linear layer's weight is stored in the checkpoint."""

    bits: int
    group_size: int  # -1: one group over all inputs
    symmetric: bool

    def block_size(self, k: int, where: str) -> int:
        """MatMulNBits' block size for K inputs: the largest power of two up to MAX_BLOCK that
        divides the group (the group size itself when it is one)."""
        group = k if self.group_size == -1 else self.group_size
        block = math.gcd(group, MAX_BLOCK)
        if block < MIN_BLOCK or k % group:
            raise InternLM2GraphError(
                f"{where}: group_size {self.group_size} with {k} inputs has no exact MatMulNBits "
                f"block (a power of two from {MIN_BLOCK} to {MAX_BLOCK} dividing the group, and "
                "whole groups); convert from the float checkpoint instead"
            )
        return block


@dataclass(frozen=True)
class Layout:
    """A pre-quantized checkpoint's format and which linear layers it stores quantized."""

    format: str  # one of FORMATS
    source: str  # the file whose quantization config this is
    default: Scheme
    # AWQ modules_to_not_convert / compressed-tensors ignore: names, substrings or "re:" regexes.
    skip: tuple[str, ...] = ()
    # GPTQModel's per-module `dynamic` overrides: (regex, the changes as sorted items).
    dynamic: tuple[tuple[str, tuple], ...] = ()
    lm_head: bool = False  # GPTQModel's lm_head=true: the output layer is quantized too
    # compressed-tensors config groups: (targets, Scheme), first match wins.
    groups: tuple[tuple[tuple[str, ...], Scheme], ...] = field(default=())
    act_order: bool = False  # what the config says (desc_act, actorder "group"); g_idx decides

    @property
    def name(self) -> str:
        """How the build summary and `inspect` name the format."""
        scheme = self.default
        kind = "sym" if scheme.symmetric else "asym"
        label = {"awq": 'AWQ "gemm"', "gptq": "GPTQ v1", "compressed-tensors": ""}[self.format]
        label = label or "compressed-tensors pack-quantized"
        order = ", act-order" if self.act_order else ""
        return f"{label} ({scheme.bits}-bit, group {scheme.group_size}, {kind}{order})"

    def scheme(self, module: str) -> Scheme | None:
        """How the linear layer `module` (its checkpoint name) is stored: None when in float."""
        if self.format == "compressed-tensors":
            if any(_ct_match(pattern, module) for pattern in self.skip):
                return None
            for targets, scheme in self.groups:
                if any(_ct_match(t, module) for t in targets):
                    return scheme
            return None
        if module == LM_HEAD and not self.lm_head:
            return None
        if any(pattern in module for pattern in self.skip):  # AutoAWQ matches substrings
            return None
        scheme = self.default
        for pattern, change in self.dynamic:
            if pattern.startswith("-:") and re.match(pattern[2:], module):
                return None
            if not pattern.startswith("-:") and re.match(pattern.removeprefix("+:"), module):
                scheme = _gptq_scheme({**_scheme_dict(scheme), **dict(change)}, self.source)
        return scheme

    def linears(self, config: InternLM2Config) -> dict[str, Scheme | None]:
        """Every linear layer of the model, by checkpoint name, and how it is stored."""
        names = [
            f"model.layers.{i}.{linear}"
            for i in range(config.num_hidden_layers)
            for linear in LAYER_LINEARS
        ]
        return {name: self.scheme(name) for name in [*names, LM_HEAD]}


def is_linear(module: str) -> bool:
    """Whether a checkpoint module name is one of the linear layers a checkpoint may pack."""
    return module == LM_HEAD or (
        module.startswith("model.layers.") and module.endswith(LAYER_LINEARS)
    )


def _ct_match(pattern: str, module: str) -> bool:
    """compressed-tensors' target matching: "re:" regexes, the class name, or the name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == "Linear" or pattern == module or module.endswith("." + pattern)


def _scheme_dict(scheme: Scheme) -> dict:
    return {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.symmetric}


# --- reading the quantization config ----------------------------------------------------------


def read_layout(folder: str | Path) -> Layout | None:
    """The checkpoint's pre-quantized format, or None for a float checkpoint.

    Read from config.json's `quantization_config`, else from `quantize_config.json` (AutoGPTQ)
    or `quant_config.json` (older AutoAWQ). Anything but the three formats above is refused in
    one line that names the field.
    """
    folder = Path(folder)
    raw, source = _quantization_config(folder)
    if raw is None:
        return None
    method = str(raw.get("quant_method", "")).lower()
    if not method and "w_bit" in raw:  # AutoAWQ's quant_config.json names no method
        method = "awq"
    if method == "awq":
        return _awq(raw, source)
    if method == "gptq":
        return _gptq(raw, source)
    if method == "compressed-tensors":
        return _compressed_tensors(raw, source)
    raise InternLM2GraphError(
        f"{source}: quant_method {method or None!r} is not supported; pre-quantized checkpoints "
        f"must be one of {', '.join(FORMATS)} (or convert the float checkpoint)"
    )


def _quantization_config(folder: Path) -> tuple[dict | None, str]:
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            config = {}  # InternLM2Config.from_dir reports a broken config.json
        raw = config.get("quantization_config") if isinstance(config, dict) else None
        if raw is not None:
            if not isinstance(raw, dict):
                raise InternLM2GraphError(f"{config_path}: quantization_config must be an object")
            return raw, f"{config_path} quantization_config"
    for name in ("quantize_config.json", "quant_config.json"):
        path = folder / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InternLM2GraphError(f"{path}: not valid JSON ({err})") from None
            if not isinstance(raw, dict):
                raise InternLM2GraphError(f"{path}: expected a JSON object")
            return raw, str(path)
    return None, ""


def _four_bits(bits, source: str) -> int:
    if bits != 4:
        raise InternLM2GraphError(
            f"{source}: bits {bits!r} is not supported; only 4-bit checkpoints import code for "
            "code into MatMulNBits (convert the float checkpoint with -p int4 or int8 instead)"
        )
    return 4


def _group(value, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (value <= 0 and value != -1):
        raise InternLM2GraphError(f"{source}: group_size {value!r} must be a positive int or -1")
    return value


def _awq(raw: dict, source: str) -> Layout:
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise InternLM2GraphError(
            f'{source}: AWQ version {version!r} is not supported; only "gemm" packing '
            "imports (gemv/marlin/exllama packings differ); re-save it as gemm with AutoAWQ"
        )
    if raw.get("zero_point", True) is not True:
        raise InternLM2GraphError(
            f"{source}: AWQ with zero_point false is not supported; only the usual asymmetric "
            "(zero_point true) AWQ imports"
        )
    bits = _four_bits(raw.get("bits", raw.get("w_bit")), source)
    group = _group(raw.get("group_size", raw.get("q_group_size")), source)
    skip = tuple(raw.get("modules_to_not_convert") or ())
    return Layout("awq", source, Scheme(bits, group, symmetric=False), skip=skip)


def _gptq_scheme(raw: dict, source: str) -> Scheme:
    return Scheme(
        _four_bits(raw.get("bits"), source),
        _group(raw.get("group_size"), source),
        symmetric=bool(raw.get("sym", True)),
    )


def _gptq(raw: dict, source: str) -> Layout:
    checkpoint_format = str(raw.get("checkpoint_format", "gptq")).lower()
    if checkpoint_format != "gptq" or raw.get("is_marlin_format"):
        raise InternLM2GraphError(
            f"{source}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; only "
            '"gptq" (v1) packing imports (gptq_v2/marlin/exllama v2 differ); re-save it in '
            "gptq format with GPTQModel"
        )
    dynamic = []
    for pattern, change in (raw.get("dynamic") or {}).items():
        if change is not None and not isinstance(change, dict):
            raise InternLM2GraphError(f"{source}: dynamic[{pattern!r}] must be an object")
        dynamic.append((pattern, tuple(sorted((change or {}).items()))))
    return Layout(
        "gptq",
        source,
        _gptq_scheme(raw, source),
        dynamic=tuple(dynamic),
        lm_head=bool(raw.get("lm_head", False)),
        act_order=bool(raw.get("desc_act", False)),
    )


def _compressed_tensors(raw: dict, source: str) -> Layout:
    fmt = raw.get("format")
    status = raw.get("quantization_status", "compressed")
    if fmt != "pack-quantized" or status != "compressed":
        raise InternLM2GraphError(
            f"{source}: compressed-tensors format {fmt!r} ({status}) is not supported; only "
            '"pack-quantized" (compressed) 4-bit weights import'
        )
    groups, act_order = [], False
    for name, group in (raw.get("config_groups") or {}).items():
        where = f"{source} config_groups.{name}"
        weights = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            raise InternLM2GraphError(
                f"{where}: quantized activations are not supported; only weight-only (W4A16) "
                "schemes import"
            )
        if group.get("format", fmt) != "pack-quantized":
            raise InternLM2GraphError(f"{where}: format {group.get('format')!r} is not supported")
        if weights.get("type", "int") != "int" or weights.get("dynamic"):
            raise InternLM2GraphError(
                f"{where}: weights type {weights.get('type')!r} is not supported; use int"
            )
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise InternLM2GraphError(
                f"{where}: strategy {strategy!r} is not supported; use group or channel"
            )
        group_size = -1 if strategy == "channel" else _group(weights.get("group_size"), where)
        scheme = Scheme(
            _four_bits(weights.get("num_bits"), where),
            group_size,
            bool(weights.get("symmetric", True)),
        )
        groups.append((tuple(group.get("targets") or ()), scheme))
        act_order = act_order or weights.get("actorder") == "group"
    if not groups:
        raise InternLM2GraphError(
            f"{source}: no config_groups; nothing says how weights are stored"
        )
    return Layout(
        "compressed-tensors",
        source,
        groups[0][1],
        skip=tuple(raw.get("ignore") or ()),
        groups=tuple(groups),
        act_order=act_order,
    )


# --- unpacking: one linear's codes, scales and zero points ------------------------------------


@dataclass(frozen=True)
class Codes:
    """One linear layer as stored: w[n, k] = (codes[n, k] - zeros[n, g]) * scales[n, g] with
    g = g_idx[k]. `words` uint32 [N, K/8] hold the codes in MatMulNBits' order (input channel
    8c + i in nibble i of word c, so their bytes are its B); `scales` float32 [N, G]; `zeros`
    uint8 [N, G]; `g_idx` int [K] or None when g = k // group_size."""

    words: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray | None

    @property
    def codes(self) -> np.ndarray:
        """uint8 [N, K]."""
        return _nibbles(self.words, axis=1)

    def rows(self, start: int, stop: int) -> Codes:
        return Codes(
            self.words[start:stop], self.scales[start:stop], self.zeros[start:stop], self.g_idx
        )

    def dequantized(self) -> np.ndarray:
        """float32 [N, K]: (q - z) * s, the float model the checkpoint stands for."""
        group = self.groups()
        zeros = self.zeros[:, group].astype(np.float32)
        return (self.codes.astype(np.float32) - zeros) * self.scales[:, group]

    def groups(self) -> np.ndarray:
        k, blocks = self.words.shape[1] * 8, self.scales.shape[1]
        return self.g_idx if self.g_idx is not None else np.arange(k) // (k // blocks)


def _nibbles(words: np.ndarray, axis: int) -> np.ndarray:
    """int32 words -> their 8 nibbles (low first) as uint8, laid out along `axis`."""
    u = np.ascontiguousarray(words).view(np.uint32)
    planes = np.stack([((u >> (4 * i)) & 0xF).astype(np.uint8) for i in range(8)], axis=axis + 1)
    shape = list(u.shape)
    shape[axis] *= 8
    return planes.reshape(shape)


def _awq_columns(words: np.ndarray) -> np.ndarray:
    """AWQ-packed int32 [rows, N/8] -> uint8 [rows, N] in true column order."""
    nibbles = _nibbles(words, axis=1).reshape(words.shape[0], -1, 8)
    columns = np.empty_like(nibbles)
    columns[:, :, AWQ_ORDER] = nibbles
    return columns.reshape(words.shape[0], -1)


def _awq_words(qweight: np.ndarray) -> np.ndarray:
    """AWQ "gemm" qweight int32 [K, N/8] -> uint32 [N, K/8] in MatMulNBits' order: an 8x8
    transpose of nibbles inside each block of 8 input rows x 8 output columns, done on whole
    words (64 mask-shift-or passes over N*K/64 words) rather than on unpacked codes."""
    k, n8 = qweight.shape
    w = qweight.view(np.uint32).reshape(k // 8, 8, n8)  # [r, j, c]: input row 8r + j
    out = np.empty((n8, 8, k // 8), np.uint32)  # [c, o, r]: output column 8c + o
    for i, column in enumerate(AWQ_ORDER):  # nibble i holds output column 8c + AWQ_ORDER[i]
        acc = np.zeros((k // 8, n8), np.uint32)
        mask = np.uint32(0xF << (4 * i))
        for j in range(8):  # input row 8r + j goes to nibble j
            part = w[:, j, :] & mask
            shift = 4 * (j - i)
            acc |= part << np.uint32(shift) if shift >= 0 else part >> np.uint32(-shift)
        out[:, column, :] = acc.T
    return out.reshape(n8 * 8, k // 8)


def _float(ref: TensorRef) -> np.ndarray:
    if not ref.is_float:
        raise InternLM2GraphError(
            f"{ref.path}: tensor {ref.name} has dtype {ref.dtype}, but scales must be float; "
            "the checkpoint does not match its quantization config"
        )
    return ref.read_rows()


def _ints(ref: TensorRef) -> np.ndarray:
    if ref.dtype != "I32":
        raise InternLM2GraphError(
            f"{ref.path}: tensor {ref.name} has dtype {ref.dtype}, but packed 4-bit tensors are "
            "int32; the checkpoint does not match its quantization config"
        )
    return ref.read_stored()


def _expect(ref: TensorRef, shape: tuple[int, ...]) -> TensorRef:
    if ref.shape != shape:
        raise InternLM2GraphError(
            f"{ref.path}: tensor {ref.name} has shape {list(ref.shape)}, but config.json and the "
            f"quantization config imply {list(shape)}; the files are from different models"
        )
    return ref


def read_codes(
    checkpoint: Checkpoint, layout: Layout, module: str, scheme: Scheme, n: int, k: int
) -> Codes:
    """One linear layer's codes, scales and zero points, checked against the shapes they must
    have; every zero point and g_idx is checked to fit MatMulNBits."""
    group = k if scheme.group_size == -1 else scheme.group_size
    blocks = -(-k // group)
    if k % 8 or n % 8:
        raise InternLM2GraphError(
            f"{checkpoint.folder}: {module} is {n}x{k}; 4-bit packing needs both a multiple of 8"
        )
    names = {t: f"{module}.{t}" for t in TENSORS[layout.format]}
    g_idx = None
    if layout.format == "awq":
        words = _awq_words(_ints(_expect(checkpoint[names["qweight"]], (k, n // 8))))
        zeros = _awq_columns(_ints(_expect(checkpoint[names["qzeros"]], (blocks, n // 8)))).T
        scales = _float(_expect(checkpoint[names["scales"]], (blocks, n))).T
    elif layout.format == "gptq":
        # input row 8r + i in nibble i: word (r, n) already is MatMulNBits' word (n, r)
        words = _ints(_expect(checkpoint[names["qweight"]], (k // 8, n))).view(np.uint32).T
        stored = _nibbles(_ints(_expect(checkpoint[names["qzeros"]], (blocks, n // 8))), axis=1)
        zeros = stored.T.astype(np.uint16) + 1  # v1 stores z - 1
        scales = _float(_expect(checkpoint[names["scales"]], (blocks, n))).T
        if names["g_idx"] in checkpoint:
            g_idx = checkpoint[names["g_idx"]].read_stored().astype(np.int64)
            _expect(checkpoint[names["g_idx"]], (k,))
    else:
        words = _ints(_expect(checkpoint[names["weight_packed"]], (n, k // 8))).view(np.uint32)
        scales = _float(_expect(checkpoint[names["weight_scale"]], (n, blocks)))
        if scheme.symmetric:
            zeros = np.full((n, blocks), 8, np.uint8)
        else:
            packed = _expect(checkpoint[names["weight_zero_point"]], (n // 8, blocks))
            zeros = _nibbles(_ints(packed), axis=0)
        if names["weight_g_idx"] in checkpoint:
            g_idx = checkpoint[names["weight_g_idx"]].read_stored().astype(np.int64)
            _expect(checkpoint[names["weight_g_idx"]], (k,))
    where = f"{checkpoint.folder}: {module}"
    if zeros.max(initial=0) > 15:
        raise InternLM2GraphError(
            f"{where} has a zero point of 16 (GPTQ v1 stores z - 1, and z = 0 wrapped around); "
            "MatMulNBits holds 4-bit zero points, so this layer cannot import code for code; "
            "convert the float checkpoint instead"
        )
    if scheme.symmetric and (zeros != 8).any():
        raise InternLM2GraphError(
            f"{where}: the config says sym, but its zero points are not all 8; fix the "
            "quantization config (sym false)"
        )
    if g_idx is not None:
        g_idx = _check_g_idx(g_idx, k, group, where)
    return Codes(
        np.ascontiguousarray(words),
        np.ascontiguousarray(scales, dtype=np.float32),
        np.ascontiguousarray(zeros, dtype=np.uint8),
        g_idx,
    )


def _check_g_idx(g_idx: np.ndarray, k: int, group: int, where: str) -> np.ndarray | None:
    """None when g_idx is k // group (no act-order); else g_idx, which must name every group
    exactly `group` times so that sorting by it gives whole blocks."""
    blocks = k // group
    if np.array_equal(g_idx, np.arange(k) // group):
        return None
    counts = np.bincount(g_idx.clip(0, blocks), minlength=blocks + 1)
    if g_idx.min() < 0 or g_idx.max() >= blocks or (counts[:blocks] != group).any():
        raise InternLM2GraphError(
            f"{where}: g_idx does not give every group exactly {group} input channels, so no "
            "reordering makes whole blocks; convert the float checkpoint instead"
        )
    return g_idx


# --- into MatMulNBits --------------------------------------------------------------------------


def input_order(codes: Codes) -> np.ndarray | None:
    """Act-order: the input channels sorted by group (stable), or None when already in order.
    The graph gathers the activation's channels in this order (modules.QuantizedLinear)."""
    if codes.g_idx is None:
        return None
    return np.argsort(codes.g_idx, kind="stable")


def quantized_weight(codes: Codes, spec: QuantSpec) -> QuantizedWeight:
    """The codes in MatMulNBits layout, unchanged: blocks of `spec.block_size` (a group larger
    than a block repeats its scale and zero point), input channels in input_order."""
    n, k = codes.words.shape[0], codes.words.shape[1] * 8
    repeat = k // codes.scales.shape[1] // spec.block_size
    scales = np.repeat(codes.scales, repeat, axis=1)
    zeros = np.repeat(codes.zeros, repeat, axis=1)
    order = input_order(codes)
    if order is None:  # the words' bytes are MatMulNBits' B as they are
        packed = codes.words.view(np.uint8).reshape(spec.packed_shape(n, k))
    else:  # act-order: the codes' columns move, so unpack, reorder and pack again
        q = codes.codes[:, order]
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(spec.packed_shape(n, k))
    zero_points = None
    if not spec.symmetric:  # block 2j in the low nibble; an odd count's spare nibble holds 8
        even = np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2)), constant_values=8)
        zero_points = even[:, 0::2] | (even[:, 1::2] << 4)
    return QuantizedWeight(packed, scales, zero_points, k=k, n=n, spec=spec)


# The wqkv regrouping reads a float layer a head at a time: unpack it once, not per head.
_cached_codes = functools.lru_cache(maxsize=2)(read_codes)


@dataclass(frozen=True)
class DequantizedRows:
    """A float build's view of a pre-quantized linear: its exactly dequantized [N, K] rows
    (weights.Source). Each read unpacks the layer: float builds of 4-bit checkpoints are the
    exactness oracle, not the fast path."""

    checkpoint: Checkpoint
    layout: Layout
    module: str
    scheme: Scheme
    shape: tuple[int, int]

    def rows(self, start: int, stop: int) -> np.ndarray:
        n, k = self.shape
        codes = _cached_codes(self.checkpoint, self.layout, self.module, self.scheme, n, k)
        return codes.rows(start, stop).dequantized()


# --- the build's choices ----------------------------------------------------------------------

# Options that would change a pre-quantized layer's codes, scales or zero points.
CODE_OPTIONS = ("block_size", "is_symmetric", "algo_config", "calibration_data")


def target(
    layout: Layout,
    checkpoint: Checkpoint,
    config: InternLM2Config,
    base: Target,
    options: dict[str, str],
) -> Target:
    """`base` (resolve_target's answer) for a pre-quantized checkpoint: int4 carries each
    packed layer's codes over (block size = its group size); float precisions dequantize
    exactly and need nothing here. Options that would change the codes are refused."""
    options = {ALIASES.get(k, k): v for k, v in options.items()}
    if base.precision == "int8":
        raise InternLM2GraphError(
            f"--precision int8: {checkpoint.folder} is a 4-bit {layout.name} checkpoint; "
            "int8 would requantize it: use -p int4 (its codes as published) or a float precision "
            "(dequantized exactly)"
        )
    if base.kv_cache is not None and base.kv_cache.scale_file is None:
        raise InternLM2GraphError(
            f"--extra_options kv_cache_quant_scheme: calibrating KV cache scales needs float "
            f"weights, and {checkpoint.folder} is a pre-quantized {layout.name} checkpoint; "
            "pass kv_cache_scale_file"
        )
    if base.quant is None:
        return replace(base, prequantized=layout.name)
    changing = [k for k in CODE_OPTIONS if k in options]
    if changing:
        raise InternLM2GraphError(
            f"--extra_options {', '.join(changing)}: {checkpoint.folder} is a pre-quantized "
            f"{layout.name} checkpoint whose codes are imported as they are; drop "
            f"{', '.join(changing)} (or convert the float checkpoint to choose them)"
        )
    specs: dict[str, QuantSpec | None] = {}
    for module, scheme in layout.linears(config).items():
        if scheme is None:
            if module == LM_HEAD and "lm_head_precision" in options:
                continue  # the user's choice for the float head (base.lm_head_quant)
            specs[module] = None  # as published: float
            continue
        n, k = _shape(config, module)
        where = f"{checkpoint.folder}: {module}"
        specs[module] = QuantSpec(
            bits=scheme.bits,
            block_size=scheme.block_size(k, where),
            symmetric=scheme.symmetric,
            accuracy_level=base.quant.accuracy_level,
            permuted=_act_order(checkpoint, layout, module, scheme, k),
        )
    return replace(base, layer_specs=specs, prequantized=layout.name)


def _shape(config: InternLM2Config, module: str) -> tuple[int, int]:
    """(N, K) of a linear layer."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    shapes = {
        "attention.wqkv": (qkv, h),
        "attention.wo": (h, config.num_attention_heads * d),
        "feed_forward.w1": (i, h),
        "feed_forward.w3": (i, h),
        "feed_forward.w2": (h, i),
        LM_HEAD: (config.vocab_size, h),
    }
    return shapes[module.removeprefix("model.layers.").partition(".")[2] or module]


def _g_idx(
    checkpoint: Checkpoint, layout: Layout, module: str, scheme: Scheme, k: int
) -> np.ndarray | None:
    """The layer's g_idx when it is more than k // group (act-order), else None."""
    name = f"{module}.{TENSORS[layout.format][-1]}"
    if layout.format == "awq" or name not in checkpoint:
        return None
    ref = _expect(checkpoint[name], (k,))
    group = k if scheme.group_size == -1 else scheme.group_size
    g_idx = ref.read_stored().astype(np.int64)
    return _check_g_idx(g_idx, k, group, f"{checkpoint.folder}: {module}")


def _act_order(checkpoint: Checkpoint, layout: Layout, module: str, scheme: Scheme, k: int) -> bool:
    """Whether the layer's g_idx is more than k // group (read now: the graph depends on it)."""
    return _g_idx(checkpoint, layout, module, scheme, k) is not None


def read_input_order(
    checkpoint: Checkpoint, layout: Layout, module: str, scheme: Scheme, k: int
) -> np.ndarray:
    """An act-order layer's input_order (int64 [K]), from its g_idx alone."""
    g_idx = _g_idx(checkpoint, layout, module, scheme, k)
    return np.argsort(g_idx, kind="stable").astype(np.int64)


def check_dtypes(checkpoint: Checkpoint, layout: Layout | None) -> None:
    """Integer tensors are only packed codes of a pre-quantized layout: any other is refused
    before a byte is written, with what to do about it."""
    packed = ("qweight", "qzeros", "g_idx", "weight_packed", "weight_zero_point", "weight_shape")
    for ref in checkpoint:
        if ref.is_float:
            continue
        if layout is None and ref.name.endswith(packed):
            raise InternLM2GraphError(
                f"{ref.path}: tensor {ref.name} is packed 4-bit weights, but {checkpoint.folder} "
                "has no quantization_config in config.json (nor quantize_config.json); add the "
                "quantization_config its quantizer wrote (AWQ gemm, GPTQ or compressed-tensors)"
            )
        if layout is None or not ref.name.endswith(packed):
            raise wrong_dtype(ref.path, ref.name, ref.dtype)
