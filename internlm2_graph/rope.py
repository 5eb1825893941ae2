"""Rotary tables for GroupQueryAttention's cos/sin caches, one row per absolute position."""

from __future__ import annotations

import numpy as np

from internlm2_graph.config import InternLM2Config


def rope_bases(config: InternLM2Config, start: int, stop: int) -> np.ndarray:
    """The rotary base used at positions [start, stop) (float64).

    Dynamic NTK recomputes the base from the total length L = position + 1 once L passes
    max_position_embeddings. A table indexed by position therefore reproduces token-by-token
    decoding exactly (cached keys keep the rotation they were written with), at any length. A
    prompt longer than max_position_embeddings processed in one pass is the one case where the
    Hugging Face code differs: it rotates the whole prompt with the base of its final length.
    """
    bases = np.full(stop - start, config.rope_theta, dtype=np.float64)
    scaling = config.rope_scaling
    if scaling is not None and scaling.type == "dynamic":
        d, max_pos = config.head_dim, config.max_position_embeddings
        total = np.arange(start + 1, stop + 1, dtype=np.float64)
        grown = total > max_pos
        ratio = scaling.factor * total[grown] / max_pos - (scaling.factor - 1)
        bases[grown] = config.rope_theta * ratio ** (d / (d - 2))
    return bases


def rotary_rows(config: InternLM2Config, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32 [stop - start, head_dim / 2], of positions [start, stop), for
    rotate-half (non-interleaved) RoPE. Each row depends on its position alone, so a table can
    be written a slice of rows at a time."""
    d = config.head_dim
    positions = np.arange(start, stop, dtype=np.float64)
    scaling = config.rope_scaling
    if scaling is not None and scaling.type == "linear":
        positions = positions / scaling.factor
    exponents = np.arange(0, d, 2, dtype=np.float64) / d
    inv_freq = 1.0 / rope_bases(config, start, stop)[:, None] ** exponents[None, :]
    angles = positions[:, None] * inv_freq
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotary_tables(config: InternLM2Config, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole cos and sin tables for positions [0, length)."""
    return rotary_rows(config, 0, length)
