"""What a precision and an execution provider mean for the graph: dtypes, op choices, options.

Flag and option names follow `onnxruntime_genai.models.builder`, so its commands work here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

import onnx_ir as ir

from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.quantize import QuantSpec

PRECISIONS = ("fp32", "fp16", "bf16", "int4", "int8")
EXECUTION_PROVIDERS = ("cpu", "cuda")
FLOAT_DTYPES = {
    "fp32": ir.DataType.FLOAT,
    "fp16": ir.DataType.FLOAT16,
    "bf16": ir.DataType.BFLOAT16,
}

# Builder option names; the `int4_` spellings are the builder's older aliases, still in use.
ALIASES = {
    "int4_block_size": "block_size",
    "int4_accuracy_level": "accuracy_level",
    "int4_is_symmetric": "is_symmetric",
}
OPTIONS = {
    "block_size": "int4/int8 block size: 16, 32, 64, 128 or 256 (default 32)",
    "accuracy_level": "MatMulNBits accuracy level 0..4 (default 4 on cpu, 0 on cuda)",
    "is_symmetric": "true/false: symmetric int4/int8 weights (default true)",
    "lm_head_precision": "int4/int8/float: the output projection's weights (default: as the body)",
    "use_cuda_bf16": "true/false: bf16 activations for int4 on cuda (default false: fp16)",
    "enable_cuda_graph": "true/false: capture decode in a CUDA graph (default true on cuda)",
    "max_length": "default search.max_length written to genai_config (default min(context, 4096))",
    "filename": "name of the ONNX file (default model.onnx)",
}


@dataclass(frozen=True)
class Target:
    """Everything the graph needs to know about precision and device, decided once."""

    precision: str
    execution_provider: str
    io_dtype: ir.DataType
    quant: QuantSpec | None = None
    lm_head_quant: QuantSpec | None = None
    enable_cuda_graph: bool = False
    max_length: int | None = None
    filename: str = "model.onnx"


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
    precision: str, execution_provider: str, extra_options: dict[str, str] | None = None
) -> Target:
    options = {ALIASES.get(k, k): str(v) for k, v in (extra_options or {}).items()}
    for key in options:
        if key not in OPTIONS:
            raise InternLM2GraphError(
                f"--extra_options: unknown option {key!r}; use one of {', '.join(OPTIONS)} "
                "(--help describes them)"
            )
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
    quantized = precision in ("int4", "int8")
    not_for_float = {
        "block_size",
        "accuracy_level",
        "is_symmetric",
        "lm_head_precision",
        "use_cuda_bf16",
    }
    misplaced = sorted(not_for_float & options.keys()) if not quantized else []
    if misplaced:
        raise InternLM2GraphError(
            f"--extra_options {', '.join(misplaced)} only apply to --precision int4/int8"
        )
    if precision in FLOAT_DTYPES:
        io_dtype = FLOAT_DTYPES[precision]
    elif not cuda:
        io_dtype = ir.DataType.FLOAT
    else:
        bf16 = _bool(options, "use_cuda_bf16", False)
        io_dtype = ir.DataType.BFLOAT16 if bf16 else ir.DataType.FLOAT16
    cuda_only = sorted({"use_cuda_bf16", "enable_cuda_graph"} & options.keys())
    if cuda_only and not cuda:
        raise InternLM2GraphError(
            f"--extra_options {', '.join(cuda_only)} only applies to --execution_provider cuda"
        )

    quant = lm_head_quant = None
    if quantized:
        bits = 4 if precision == "int4" else 8
        quant = QuantSpec(
            bits=bits,
            block_size=_int(options, "block_size", 32),
            symmetric=_bool(options, "is_symmetric", True),
            accuracy_level=_int(options, "accuracy_level", 0 if cuda else 4),
        )
        head = options.get("lm_head_precision", precision)
        if head not in ("int4", "int8", "float"):
            raise InternLM2GraphError(
                f"--extra_options lm_head_precision={head!r}: use int4, int8 or float"
            )
        if head != "float":
            lm_head_quant = QuantSpec(
                bits=4 if head == "int4" else 8,
                block_size=quant.block_size,
                symmetric=quant.symmetric,
                accuracy_level=quant.accuracy_level,
            )
    return Target(
        precision=precision,
        execution_provider=execution_provider,
        io_dtype=io_dtype,
        quant=quant,
        lm_head_quant=lm_head_quant,
        enable_cuda_graph=_bool(options, "enable_cuda_graph", cuda) if cuda else False,
        max_length=_max_length(options),
        filename=_filename(options),
    )


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


def _bool(options: dict[str, str], key: str, default: bool) -> bool:
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
