"""Where calibrated weights wait for the saver: a scratch folder, one file per tensor.

Calibration runs before the saver walks the graph, and a 7B model's quantized linears do not
all fit in memory beside it; so each is spilled as it is made and read back when the saver
asks for that weight. Only numpy and quantize.py's types: weights.py imports this module
without the calibration machinery.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from internlm2_graph.precision import QuantSpec
from internlm2_graph.quantize import QuantizedWeight


class Calibrated:
    """Quantized weights by linear path ("model.layers.3.attention.wqkv", "output"), in the
    checkpoint's row order, kept on disk in `folder` until the saver asks for them; and float
    tensors that calibration changed (AWQ's folded norm weights), by checkpoint tensor name."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.paths: set[str] = set()
        self.floats: set[str] = set()

    def __contains__(self, path: str) -> bool:
        return path in self.paths

    def save_float(self, name: str, array: np.ndarray) -> None:
        """Replace checkpoint tensor `name` (same shape, checkpoint row order) in the build."""
        np.save(self.folder / f"{name}.npy", np.asarray(array, np.float32))
        self.floats.add(name)

    def load_float(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    def save(self, path: str, q: QuantizedWeight) -> None:
        arrays = {"packed": q.packed, "scales": q.scales}
        if q.zero_points is not None:
            arrays["zero_points"] = q.zero_points
        np.savez(self.folder / f"{path}.npz", **arrays)
        self.paths.add(path)

    def save_rows(self, path: str, parts: list[QuantizedWeight]) -> None:
        first = parts[0]
        joined = QuantizedWeight(
            packed=np.concatenate([p.packed for p in parts]),
            scales=np.concatenate([p.scales for p in parts]),
            zero_points=None
            if first.zero_points is None
            else np.concatenate([p.zero_points for p in parts]),
            k=first.k,
            n=sum(p.n for p in parts),
            spec=first.spec,
        )
        self.save(path, joined)

    def load(self, path: str, k: int, spec: QuantSpec) -> QuantizedWeight:
        with np.load(self.folder / f"{path}.npz") as data:
            packed, scales = data["packed"], data["scales"]
            zero_points = data.get("zero_points")
        return QuantizedWeight(packed, scales, zero_points, k=k, n=len(packed), spec=spec)
