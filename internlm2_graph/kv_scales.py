"""Scales of a quantized KV cache: read from a scale file, checked against the graph.

GroupQueryAttention stores each key (after rotary) and value as round(x / scale), clipped to
the code range, per tensor or per channel (kv_head x head_dim), with one scale = threshold /
qmax per layer. The file format is the onnxruntime-genai builder's (its kv_cache_calibration
tool writes it), so scales calibrated for a builder model carry over:

    {"scales": {"k_scales": [layer 0, layer 1, ...], "v_scales": [...]},
     "layer_ids": [0, 1, ...],   # optional; dense 0..layers-1 without it
     "qmax": 128.0}              # optional: the qmax the thresholds were divided by

A file may nest that object under the model file's stem ("model"). A `qmax` other than the
scheme's retargets the scales (an int8 file used for int4 is multiplied by 128 / 8).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.precision import KVCacheSpec, Target

Scales = dict[str, tuple[np.ndarray, np.ndarray]]  # attention module path -> (k, v) scales


def attention_path(layer: int) -> str:
    return f"model.layers.{layer}.attention"


def scales_from_file(config: InternLM2Config, target: Target) -> Scales | None:
    """The scales a scale file gives the graph's quantized KV cache; None for a float cache or
    when there is no file (the build then calibrates them: calibration.kv.calibrate_kv_cache)."""
    spec = target.kv_cache
    if spec is None or spec.scale_file is None:
        return None
    return read_scale_file(spec.scale_file, spec, config, Path(target.filename).stem)


def read_scale_file(
    path: str | Path, spec: KVCacheSpec, config: InternLM2Config, section: str
) -> Scales:
    path = Path(path)
    where = f"kv_cache_scale_file {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InternLM2GraphError(f"{where}: not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InternLM2GraphError(f"{where}: not a JSON scale file ({err})") from None
    if isinstance(data, dict) and section in data:
        data = data[section]
    try:
        k_scales, v_scales = data["scales"]["k_scales"], data["scales"]["v_scales"]
    except (KeyError, TypeError):
        raise InternLM2GraphError(
            f'{where}: expected {{"scales": {{"k_scales": [...], "v_scales": [...]}}}}, '
            "one entry per layer"
        ) from None
    layers = config.num_hidden_layers
    layer_ids = data.get("layer_ids", list(range(layers)))
    if (
        sorted(layer_ids) != list(range(layers))
        or len(k_scales) != layers
        or len(v_scales) != layers
    ):
        raise InternLM2GraphError(
            f"{where}: has scales for layers {layer_ids[:4]}... ({len(k_scales)} k, "
            f"{len(v_scales)} v), but the model has {layers} layers; calibrate it on this model"
        )
    factor = _retarget(data.get("qmax"), spec, where)
    size = spec.scale_size(config.num_key_value_heads, config.head_dim)
    scales = {}
    for entry, layer in enumerate(layer_ids):
        pair = []
        for name, values in (("k", k_scales[entry]), ("v", v_scales[entry])):
            scale = np.asarray(values, dtype=np.float64).reshape(-1) * factor
            if scale.size != size:
                raise InternLM2GraphError(
                    f"{where}: layer {layer}'s {name} scale has {scale.size} values, but "
                    f"{spec.scheme} needs {size}; calibrate for this scheme"
                )
            if not (np.isfinite(scale).all() and (scale > 0).all()):
                raise InternLM2GraphError(
                    f"{where}: layer {layer}'s {name} scales must be finite and positive"
                )
            pair.append(scale.astype(np.float32))
        scales[attention_path(layer)] = (pair[0], pair[1])
    return scales


def _retarget(file_qmax, spec: KVCacheSpec, where: str) -> float:
    """A scale is threshold / qmax: a file calibrated for another qmax is rescaled to ours."""
    if file_qmax is None:
        return 1.0
    if isinstance(file_qmax, bool) or not isinstance(file_qmax, (int, float)) or file_qmax <= 0:
        raise InternLM2GraphError(f"{where}: qmax must be a positive number, got {file_qmax!r}")
    return float(file_qmax) / spec.qmax


def thresholds(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel clipping thresholds [kv_heads * head_dim] from one layer's keys (BEFORE
    rotary) and values, each [tokens, kv_heads, head_dim].

    The cache holds keys after rotary, which turns each channel pair (i, i + head_dim/2) by
    an angle that grows with the position: a channel can reach the pair's whole norm at some
    position. So a key channel's threshold is the largest pair norm, which bounds it at every
    position, however far past the calibration text; a value channel's is its largest |v|.
    """
    half = keys.shape[-1] // 2
    pair = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2).max(axis=0)
    k_threshold = np.concatenate([pair, pair], axis=-1).reshape(-1)
    return k_threshold, np.abs(values).max(axis=0).reshape(-1)


def scales_from_thresholds(
    k_threshold: np.ndarray, v_threshold: np.ndarray, spec: KVCacheSpec
) -> tuple[np.ndarray, np.ndarray]:
    """threshold / qmax per channel, or the largest per tensor; never 0 (a channel that is
    always 0 still needs a positive scale)."""

    def scale(threshold: np.ndarray) -> np.ndarray:
        if spec.granularity == "per_tensor":
            threshold = threshold.max(keepdims=True)
        tiny = np.finfo(np.float32).tiny
        return np.maximum(threshold / spec.qmax, tiny).astype(np.float32)

    return scale(k_threshold), scale(v_threshold)


def scale_file(scales: Scales, spec: KVCacheSpec) -> dict:
    """`scales` as the builder's kv_cache_scale_file JSON (qmax included, so the file serves
    another bit width too)."""
    layers = sorted(scales, key=lambda path: int(path.split(".")[2]))
    return {
        "scales": {
            "k_scales": [scales[path][0].tolist() for path in layers],
            "v_scales": [scales[path][1].tolist() for path in layers],
        },
        "layer_ids": [int(path.split(".")[2]) for path in layers],
        "qmax": spec.qmax,
        "scheme": spec.scheme,
    }
