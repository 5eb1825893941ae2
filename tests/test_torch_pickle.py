"""`.bin` weights read without torch and without running the pickle: round trips of every
dtype, whole checkpoints (float and AWQ) equal to their safetensors twins, and pickles that
would call anything else refused in one line, with the call never made."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from internlm2_graph import build
from internlm2_graph.checkpoint import Checkpoint
from internlm2_graph.cli import main
from internlm2_graph.synthetic import make_config, write_checkpoint
from internlm2_graph.synthetic.prequantized import write_prequantized
from internlm2_graph.synthetic.torch_bin import state_dict_pickle, write_torch_bin
from internlm2_graph.torch_pickle import read_torch_file


def _random(dtype, shape, rng) -> np.ndarray:
    if np.dtype(dtype).kind == "i":
        return rng.integers(-(2**30), 2**30, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int32, np.int64])
def test_round_trip_every_dtype(dtype, tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": _random(dtype, (7, 5), rng),
        "b": _random(dtype, (3,), rng),
        "c": _random(dtype, (2, 3, 4), rng),
        "scalar": _random(dtype, (), rng),
    }
    refs = read_torch_file(write_torch_bin(tmp_path / "x.bin", tensors))
    assert [r.name for r in refs] == list(tensors)
    for ref in refs:
        got = ref.read_stored()
        assert got.dtype == np.dtype(dtype) and np.array_equal(got, tensors[ref.name])


def test_a_view_into_a_shared_storage(tmp_path):
    """Tied or sliced tensors share one storage at an element offset."""
    base = np.arange(12, dtype=np.float32)
    tensors = {"whole": base, "tail": base[4:]}
    data = state_dict_pickle(tensors, shared={"tail": ("0", 4)})
    refs = {
        r.name: r
        for r in read_torch_file(write_torch_bin(tmp_path / "x.bin", tensors, raw_pickle=data))
    }
    assert np.array_equal(refs["tail"].read_stored(), base[4:])


def _as_bin(src: Path, dst: Path, shards: int = 2) -> Path:
    """A safetensors checkpoint re-saved as pytorch_model-*.bin shards + index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    refs = list(Checkpoint(src))
    weight_map = {}
    for i in range(shards):
        part = refs[i::shards]
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        write_torch_bin(dst / name, {r.name: r.read_stored() for r in part})
        weight_map |= dict.fromkeys((r.name for r in part), name)
    index = {"metadata": {}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> Path:
    config = make_config("tiny", max_position_embeddings=64, hidden_size=128, intermediate_size=256)
    return write_checkpoint(tmp_path_factory.mktemp("float"), config, seed=5)


def _onnx_bytes(folder: Path) -> bytes:
    return (folder / "model.onnx.data").read_bytes()


@pytest.mark.model
def test_bin_checkpoints_build_like_their_safetensors_twins(float_checkpoint, tmp_path):
    """Float (old .bin-only InternLM2 repos) and AWQ (lmdeploy's .bin output): the same bytes."""
    awq = write_prequantized(float_checkpoint, tmp_path / "awq", "awq", group=32)
    for name, src, precision in [("float", float_checkpoint, "fp32"), ("awq", awq, "int4")]:
        bins = _as_bin(src, tmp_path / f"{name}-bin")
        build(src, tmp_path / f"{name}-st-out", precision, "cpu")
        summary = build(bins, tmp_path / f"{name}-bin-out", precision, "cpu")
        assert _onnx_bytes(tmp_path / f"{name}-st-out") == _onnx_bytes(tmp_path / f"{name}-bin-out")
        if name == "awq":
            assert "AWQ" in str(summary)


def _payload_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that would run a shell command, written three ways."""
    command = f"touch {marker}"
    return {
        "os.system": b"\x80\x02cos\nsystem\n(X"
        + len(command).to_bytes(4, "little")
        + command.encode()
        + b"tR.",
        # protocol 4 STACK_GLOBAL, the form pickle.dumps writes
        "builtins.eval": pickle.dumps(_Eval(f"__import__('os').system('{command}')"), protocol=4),
        "posix.system": pickle.dumps(_System(command), protocol=2),
    }


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "posix.system"])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(
    name, float_checkpoint, tmp_path, capsys
):
    marker = tmp_path / "ran"
    folder = _as_bin(float_checkpoint, tmp_path / "ckpt", shards=1)
    bin_file = folder / "pytorch_model-00001-of-00001.bin"
    tensors = {r.name: r.read_stored() for r in read_torch_file(bin_file)}
    write_torch_bin(bin_file, tensors, raw_pickle=_payload_pickles(marker)[name])
    out = tmp_path / "out"
    code = main(["-i", str(folder), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert name in err and "refused without running it" in err and str(bin_file) in err
    assert not marker.exists()  # the payload did not run
    assert not out.exists() and not list(tmp_path.glob("out*"))  # nothing written


def test_the_copyreg_extension_opcodes_are_refused(tmp_path):
    data = b"\x80\x02\x82\x01)R."  # EXT1 code 1, then call it
    path = write_torch_bin(tmp_path / "x.bin", {}, raw_pickle=data)
    with pytest.raises(Exception, match="extension opcode EXT1"):
        read_torch_file(path)


def test_a_legacy_pickle_file_is_refused_in_one_line(float_checkpoint, tmp_path, capsys):
    folder = _as_bin(float_checkpoint, tmp_path / "ckpt", shards=1)
    (folder / "pytorch_model-00001-of-00001.bin").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    code = main(["-i", str(folder), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "legacy (torch < 1.6)" in err and err.count("\n") == 0
