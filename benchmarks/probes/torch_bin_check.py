"""One-off cross-check of the `.bin` reader and the test fixtures' writer against real torch.

Two steps, two interpreters (the package never imports torch):

    TORCH_PYTHON -m benchmarks.probes.torch_bin_check save DIR  # torch, numpy, ml_dtypes
    python -m benchmarks.probes.torch_bin_check check DIR       # the package venv, no torch

`save` writes `torch.save` files (a state dict of bf16/fp16/fp32/int32/int64 tensors, a view
into a shared storage, an nn.Parameter, and the same saved with the legacy format), the values
as .npy files, and loads the fixtures writer's own file (synthetic.torch_bin, written by
`check` on a first run, or here) with `torch.load(weights_only=True)`, recording whether torch
reads back the same values. `check` reads torch's files with internlm2_graph.torch_pickle and
compares every tensor bit for bit. Results: benchmarks/results/torch-bin-check.json.

Finding (torch 2.13.0+cpu): our reader gives torch.save's bf16, fp16, fp32, int32, int64, shared
view, nn.Parameter and scalar tensors bit for bit, and refuses the legacy (torch < 1.6) format
with the fix; torch.load(weights_only=True) reads the fixtures writer's file back unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

NAMES = ("bf16", "fp16", "fp32", "int32", "int64", "shared_tail", "parameter", "scalar")


def expected_values() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(7)
    base = rng.standard_normal(24).astype(np.float32)
    return {
        "bf16": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16),
        "fp16": rng.standard_normal((3, 4, 2)).astype(np.float16),
        "fp32": base.reshape(4, 6),
        "int32": rng.integers(-(2**31), 2**31 - 1, (6, 8)).astype(np.int32),
        "int64": rng.integers(-(2**40), 2**40, (9,)).astype(np.int64),
        "shared_tail": base[6:].reshape(3, 6),  # a view into fp32's storage
        "parameter": rng.standard_normal((2, 3)).astype(np.float32),
        "scalar": np.array(3.5, np.float32),
    }


def save(folder: Path) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    values = expected_values()
    tensors = {}
    for name, array in values.items():
        if name == "bf16":
            tensors[name] = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        elif name != "shared_tail":
            tensors[name] = torch.from_numpy(array.copy())
    tensors["shared_tail"] = tensors["fp32"].view(-1)[6:].view(3, 6)
    tensors["parameter"] = torch.nn.Parameter(tensors["parameter"])
    state = dict(tensors)
    torch.save(state, folder / "torch.bin")
    torch.save(state, folder / "legacy.bin", _use_new_zipfile_serialization=False)
    for name, array in values.items():
        np.save(folder / f"{name}.npy", array.view(np.int16) if name == "bf16" else array)
    result = {"torch": torch.__version__}
    ours = folder / "ours.bin"
    if ours.is_file():  # the fixtures' writer, read by torch itself
        loaded = torch.load(ours, weights_only=True)
        same = {}
        for name, array in np.load(folder / "ours.npz").items():
            got = loaded[name]
            got = got.view(torch.int16).numpy() if got.dtype == torch.bfloat16 else got.numpy()
            same[name] = bool(np.array_equal(got, array))
        result["torch_reads_our_writer"] = same
    (folder / "torch-side.json").write_text(json.dumps(result))
    print(result)


def check(folder: Path) -> None:
    from benchmarks.common import write_results
    from internlm2_graph.errors import InternLM2GraphError
    from internlm2_graph.synthetic.torch_bin import write_torch_bin
    from internlm2_graph.torch_pickle import read_torch_file

    result: dict = {}
    if (folder / "torch.bin").is_file():
        refs = {r.name: r for r in read_torch_file(folder / "torch.bin")}
        same = {}
        for name in NAMES:
            want = np.load(folder / f"{name}.npy")
            got = refs[name].read_stored()
            got = got.view(np.int16) if name == "bf16" else got
            same[name] = bool(got.shape == want.shape and np.array_equal(got, want))
        result["our_reader_on_torch_save"] = same
        try:
            read_torch_file(folder / "legacy.bin")
            result["legacy"] = "read (unexpected)"
        except InternLM2GraphError as err:
            result["legacy"] = f"refused: {err}"
        side = folder / "torch-side.json"
        result |= json.loads(side.read_text()) if side.is_file() else {}
    values = {k: v for k, v in expected_values().items() if k != "shared_tail"}
    write_torch_bin(folder / "ours.bin", values)
    np.savez(
        folder / "ours.npz",
        **{k: v.view(np.int16) if k == "bf16" else v for k, v in values.items()},
    )
    print(result)
    if "torch_reads_our_writer" in result:
        print(
            write_results(
                "torch-bin-check", result, "```\n" + json.dumps(result, indent=2) + "\n```"
            )
        )


if __name__ == "__main__":
    {"save": save, "check": check}[sys.argv[1]](Path(sys.argv[2]))
