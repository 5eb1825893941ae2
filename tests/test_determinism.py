"""The same checkpoint and options give byte-identical folders, build after build.

Users diff and checksum their model folders, and caches key on them; a stray timestamp, a
set's iteration order or a thread race in the parallel writer would break that silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from internlm2_graph import build

pytestmark = pytest.mark.model  # every test here builds or runs a model


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_fp32_in_another_process_is_byte_identical(tiny_checkpoint, tiny_fp32, tmp_path):
    """A fresh interpreter with another hash seed: dict/set order can not leak into the files."""
    output = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    command = [sys.executable, "-m", "internlm2_graph", "-i", str(tiny_checkpoint)]
    subprocess.run([*command, "-o", str(output), "-q"], check=True, env=env)
    assert contents(output) == contents(tiny_fp32)


@pytest.mark.parametrize(
    "precision, options",
    [("int4", []), ("int8", []), ("int4", ["algo_config=gptq"]), ("int4", ["algo_config=awq"])],
)
def test_quantized_builds_are_byte_identical(tiny_checkpoint, tmp_path, precision, options):
    first, second = tmp_path / "first", tmp_path / "second"
    build(tiny_checkpoint, first, precision, "cpu", options)
    build(tiny_checkpoint, second, precision, "cpu", options)
    assert contents(first) == contents(second)
    assert set(contents(first)) >= {"model.onnx", "model.onnx.data", "genai_config.json"}
