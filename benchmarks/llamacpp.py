"""llama.cpp as the anchor for quality per byte, on an untilted SmolLM2 bed.

The bed. SmolLM2-135M-Instruct ships as a Q4_1 GGUF (benchmarks/smollm2.py): every block of 32
inputs holds at most 16 values on a `min + d*k` grid, so Q4_1 (and any format with per-block
minimums) re-quantizes it almost exactly and flatters itself. `untilted_gguf` moves every 2-D
weight off that grid: each block of 32 inputs gets seeded uniform noise of one Q4_1 step,
U(-d/2, +d/2) with d = (max - min) / 15 of the block, so a value lands anywhere in its
rounding cell. The result is written as an F32 GGUF with the original metadata (tokenizer,
chat template, tied head), the file both sides start from:

- llama.cpp quantizes it directly (`llama-quantize`, `llama-imatrix`). Writing the GGUF here
  replaces `convert_hf_to_gguf.py`, which imports torch (not a dependency of this project);
  the tensors, names, Q/K row order and metadata are what that converter writes for a tied
  Llama, and an F32 GGUF is read back bit for bit.
- we convert it like any SmolLM2 GGUF (`smollm2.convert`, fp32 shards: the noise survives).
- a quantized GGUF is scored after gguf-py dequantizes it (`smollm2.convert` again), by the
  same evaluation as our folders (benchmarks/quality_per_byte.py).

llama.cpp itself is built from the copy vendored in the `llama-cpp-python` sdist (PyPI), CPU
only, just `llama-quantize` and `llama-imatrix`:

    python -m benchmarks.llamacpp [--workdir DIR] [--tools]   # the bed (and the tools)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, uninstalled
from fixtures import smollm2  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix")
SEED = 26
BLOCK = 32  # Q4_1's block of inputs
BED_NAME = "smollm2-untilted-f32.gguf"


# --- the bed --------------------------------------------------------------------------------


def q4_1_step(w: np.ndarray) -> np.ndarray:
    """Q4_1's step d = (max - min) / 15 of each block of 32 inputs: [rows, cols / 32]."""
    blocks = w.reshape(w.shape[0], -1, BLOCK)
    return (blocks.max(-1) - blocks.min(-1)) / np.float32(15)


def untilt(w: np.ndarray, name: str, seed: int = SEED) -> np.ndarray:
    """`w` [out, in] plus U(-d/2, d/2) noise, d the Q4_1 step of each block of 32 inputs.
    Seeded by (seed, tensor name), so one tensor's noise does not depend on the others."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    step = q4_1_step(w)[..., None]
    noise = rng.random((*step.shape[:2], BLOCK), dtype=np.float32) - np.float32(0.5)
    return (w.reshape(step.shape[0], -1, BLOCK) + noise * step).reshape(w.shape)


def q4_1_roundtrip_error(w: np.ndarray) -> float:
    """Relative RMS error of quantizing `w` to Q4_1 and back (gguf-py's reference code)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    back = dequantize(quantize(w, T.Q4_1), T.Q4_1)
    return float(np.sqrt(((back - w) ** 2).mean() / (w**2).mean()))


def write_untilted(source: Path, out: Path, seed: int = SEED) -> dict:
    """The F32 GGUF of `source` with every 2-D weight untilted; returns Q4_1 round-trip errors
    (relative RMS, median over the 2-D weights) before and after: the proof of the untilting."""
    import gguf

    reader = gguf.GGUFReader(source)
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(partial, arch=str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        if field.name == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    before, after = [], []
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if w.ndim == 2:
            before.append(q4_1_roundtrip_error(w))
            w = untilt(w, t.name, seed)
            after.append(q4_1_roundtrip_error(w))
        writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
    return {
        "seed": seed,
        "q4_1_roundtrip_rel_rms_before": float(np.median(before)),
        "q4_1_roundtrip_rel_rms_after": float(np.median(after)),
        "weights_untilted": len(before),
    }


def untilted_gguf(workdir: Path) -> Path:
    """The bed as an F32 GGUF under `workdir` (written once)."""
    out = workdir / BED_NAME
    if not out.is_file():
        stats = write_untilted(smollm2.gguf_file(workdir), out)
        (workdir / (BED_NAME + ".json")).write_text(__import__("json").dumps(stats, indent=2))
    return out


def checkpoint_of(gguf_file: Path, workdir: Path) -> Path:
    """The fp32 InternLM2 checkpoint of a (quantized or not) Llama GGUF, converted once."""
    out = workdir / "checkpoints" / gguf_file.stem
    if not (out / "model.safetensors.index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        smollm2.convert(gguf_file, out, dtype="fp32")
    return out


# --- llama.cpp ------------------------------------------------------------------------------


def tools(workdir: Path) -> Path:
    """The folder holding llama-quantize and llama-imatrix, built once from the sdist."""
    source = workdir / "llama.cpp"
    bin_dir = source / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    if not (source / "CMakeLists.txt").is_file():
        download = workdir / "sdist"
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        subprocess.run([*cmd, SDIST, "-d", str(download)], check=True)
        archive = next(download.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar, tempfile.TemporaryDirectory(dir=workdir) as tmp:
            tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("*/vendor/llama.cpp"))
            shutil.move(str(vendored), source)
    off = ("LLAMA_CURL", "LLAMA_BUILD_TESTS", "LLAMA_BUILD_EXAMPLES", "LLAMA_BUILD_SERVER",
           "GGML_OPENMP", "LLAMA_OPENSSL")  # fmt: skip
    configure = ["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", *(f"-D{o}=OFF" for o in off)]
    subprocess.run(configure, cwd=source, check=True)
    jobs = str(min(2, os.cpu_count() or 1))
    subprocess.run(["cmake", "--build", "build", "-j", jobs, "--target", *TOOLS], cwd=source,
                   check=True)  # fmt: skip
    return bin_dir


def imatrix(bin_dir: Path, model: Path, text: Path, out: Path, ctx: int, chunks: int) -> Path:
    """llama-imatrix over `chunks` windows of `ctx` tokens of `text` (its defaults otherwise)."""
    if not out.is_file():
        cmd = [str(bin_dir / "llama-imatrix"), "-m", str(model), "-f", str(text), "-o", str(out),
               "-c", str(ctx), "--chunks", str(chunks), "-t", "2"]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


def quantize(bin_dir: Path, model: Path, out: Path, kind: str, matrix: Path | None) -> Path:
    """llama-quantize's default mix for `kind` (Q4_K_M, ...), with an imatrix if given."""
    if not out.is_file():
        cmd = [str(bin_dir / "llama-quantize")]
        if matrix is not None:
            cmd += ["--imatrix", str(matrix)]
        cmd += [str(model), str(out), kind, "2"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


def tensor_types(gguf_file: Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF holds (what its default mix chose)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(gguf_file).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def tensor_bytes(gguf_file: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(gguf_file).tensors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=smollm2.DEFAULT_WORKDIR / "bed")
    parser.add_argument("--tools", action="store_true", help="also build llama.cpp's tools")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    bed = untilted_gguf(args.workdir)
    print(bed, (args.workdir / (BED_NAME + ".json")).read_text())
    if args.tools:
        print(tools(args.workdir))


if __name__ == "__main__":
    main()
