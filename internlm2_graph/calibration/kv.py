"""Scales of a quantized KV cache, calibrated on the float model's keys and values.

onnxruntime-genai's builder does this in a separate `kv_cache_calibration.py`; here it is one
float pass of forward.py over the first KV_TOKENS calibration tokens, and kv_scales.py turns
each layer's thresholds into the scales the graph stores.
"""

from __future__ import annotations

import numpy as np

from internlm2_graph.calibration.data import first_tokens
from internlm2_graph.calibration.forward import float_forward
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.config import InternLM2Config
from internlm2_graph.kv_scales import attention_path, scales_from_thresholds, thresholds
from internlm2_graph.precision import KVCacheSpec
from internlm2_graph.progress import Progress

# Tokens for KV cache scales: a float forward pass costs ~2 * parameters * tokens (1.8B: 31 s on
# 2 cores, peak RSS 0.71 GB for the whole int4 build), and a channel's largest value settles
# within a few thousand tokens.
KV_TOKENS = 2048


def calibrate_kv_cache(
    checkpoint: Checkpoint,
    config: InternLM2Config,
    sequences: list[np.ndarray],
    spec: KVCacheSpec,
    progress: Progress | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scales of a quantized KV cache from the float model's keys and values on the first
    KV_TOKENS of the calibration sequences (kv_scales.thresholds: a key channel pair's norm
    bounds it at every position), streamed one decoder layer at a time."""
    scales = {}

    def keep(n: int, keys: np.ndarray, values: np.ndarray) -> None:
        scales[attention_path(n)] = scales_from_thresholds(*thresholds(keys, values), spec)

    sequences = first_tokens(sequences, KV_TOKENS)
    float_forward(checkpoint, config, sequences, keep, progress, "calibrating the KV cache")
    return scales
