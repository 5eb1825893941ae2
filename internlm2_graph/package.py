"""Write the ONNX Runtime GenAI folder: model, external data, genai_config, tokenizer.

Everything is written into a temporary sibling of the destination and moved into place only
when complete, so a failed or interrupted build never leaves a half-written folder behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import inspect
import json
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx_ir as ir

from internlm2_graph.config import InternLM2Config
from internlm2_graph.errors import InternLM2GraphError
from internlm2_graph.graph import (
    LOGITS_INDICES,
    PAGED_INPUTS,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
)
from internlm2_graph.precision import Target
from internlm2_graph.progress import human_bytes

DEFAULT_MAX_LENGTH = 4096
# Below this much free space a failed write is taken for a full disk: numpy's tofile, which
# onnx_ir writes tensors with, reports a short write as an OSError without an errno.
LOW_SPACE = 64 * 1024 * 1024
AT_FDCWD = -100
RENAME_EXCHANGE = 2  # renameat2 flag and "current directory" fd (linux/fcntl.h)
SAVE_WORKERS = min(8, os.cpu_count() or 1)
SAVE_IN_FLIGHT_BYTES = 512 * 1024 * 1024


def genai_config(config: InternLM2Config, target: Target, eos_token_ids: list[int]) -> dict:
    """genai_config.json: the decoder's sizes and I/O names, the checkpoint's search defaults."""
    provider_options = []
    if target.execution_provider == "cuda":
        cuda = {"enable_cuda_graph": "1" if target.enable_cuda_graph else "0"}
        provider_options = [{"cuda": cuda}]
    context = config.positions(target.max_length)
    # A full 32k-262k context as the default max_length would make the runtime allocate that
    # whole KV cache up front (onnxruntime-genai#550); users raise it with max_length=...
    max_length = target.max_length or min(context, DEFAULT_MAX_LENGTH)
    runtime = {
        "model": {
            "bos_token_id": config.bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": provider_options,
                    **({"ep.cuda.fpa_intb_gemm": "1"} if target.fpa_intb_gemm else {}),
                },
                "filename": target.filename,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": PAST_KEY,
                    "past_value_names": PAST_VALUE,
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT_KEY,
                    "present_value_names": PRESENT_VALUE,
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos_token_ids if len(eos_token_ids) > 1 else eos_token_ids[0],
            "pad_token_id": config.pad_token_id,
            "type": "internlm2",
            "vocab_size": config.vocab_size,
        },
        "search": dict(
            sorted(
                {
                    "diversity_penalty": 0.0,
                    "early_stopping": True,
                    "max_length": max_length,
                    "min_length": 0,
                    "num_return_sequences": 1,
                    "past_present_share_buffer": True,
                    **config.sampling,
                }.items()
            )
        ),
    }
    return runtime if target.paged is None else _paged_config(runtime, config, target)


def _paged_config(runtime: dict, config: InternLM2Config, target: Target) -> dict:
    """A paged graph's genai_config: og.Engine's inputs instead of attention_mask, its one
    state group of paged KV layers (og 0.18 requires it), and engine.dynamic_batching."""
    decoder = runtime["model"]["decoder"]
    inputs = {k: v for k, v in decoder["inputs"].items() if k != "attention_mask"}
    inputs.update({name: name for name in PAGED_INPUTS})
    if target.paged.prune_lm_head:
        inputs[LOGITS_INDICES] = LOGITS_INDICES
    decoder["inputs"] = dict(sorted(inputs.items()))
    decoder["state_groups"] = [
        {"kind": "paged_kv", "layer_ids": list(range(config.num_hidden_layers))}
    ]
    runtime["engine"] = {"dynamic_batching": target.paged.dynamic_batching()}
    if target.paged.chunk_size is not None:
        runtime["search"]["chunk_size"] = target.paged.chunk_size
        runtime["search"] = dict(sorted(runtime["search"].items()))
    return runtime


def save_model(
    model: ir.Model,
    folder: Path,
    filename: str,
    on_tensor: Callable[[ir.TensorProtocol, int, int], None] | None = None,
) -> None:
    """model.onnx + one external data file, its tensors produced lazily by a few threads.

    Producing a tensor (read, cast, transpose, quantize) is numpy work that releases the GIL, so
    threads overlap it with each other and with disk writes. `max_in_flight_bytes` bounds what
    they hold at once: peak memory is that plus the largest tensor produced whole (a transposed
    or quantized matrix); tensors kept in the checkpoint's row order, the embedding table above
    all, are written a slice of rows at a time (weights.RowStreamedTensor).
    """

    stop = threading.Event()

    def callback(tensor, info) -> None:
        if stop.is_set():
            raise _Stopped
        if on_tensor is not None:
            on_tensor(tensor, info.index, info.total)

    def save() -> None:
        try:
            ir.save(
                model,
                folder / filename,
                external_data=filename + ".data",
                callback=callback,
                **_parallel_save_options(),
            )
        except BaseException as error:  # handed to the caller's thread below
            failure.append(error)

    # The save runs in a thread of its own, so that Ctrl-C (delivered to the main thread) never
    # lands inside onnx-ir's writer: a KeyboardInterrupt raised while its main loop held the
    # in-flight semaphore's lock left the workers blocked on it, and the build hung (seen in
    # about 1 of 10 interrupted builds). Ctrl-C now stops the writer at its next tensor.
    failure: list[BaseException] = []
    saver = threading.Thread(target=save, name="save_model")
    saver.start()
    try:
        while saver.is_alive():
            saver.join(0.1)
    except KeyboardInterrupt:
        stop.set()
        saver.join()
        raise
    if failure and not isinstance(failure[0], _Stopped):
        raise failure[0]


class _Stopped(Exception):
    """The save was asked to stop (Ctrl-C) between two tensors."""


def _parallel_save_options() -> dict:
    """Threads, their memory bound and page alignment, where onnx-ir has them (1.1 on).

    onnx-ir 1.0 writes one tensor at a time (lazy tensors still made one at a time, so memory
    stays flat, only slower) and page-aligns the large tensors by itself.
    """
    if "max_workers" not in inspect.signature(ir.save).parameters:
        return {}
    return {
        "max_workers": SAVE_WORKERS,
        "max_in_flight_bytes": SAVE_IN_FLIGHT_BYTES,
        # Page-aligned tensors let onnxruntime map the weights instead of copying them.
        "alignment": 4096,
    }


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=4) + "\n", encoding="utf-8")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an --output that exists (unless --overwrite) before any work or download starts."""
    output = Path(output).absolute()
    existing = next(p for p in output.parents if p.exists())
    if not existing.is_dir():
        raise InternLM2GraphError(
            f"{existing}: is a file, so --output {output} cannot be made inside it; "
            "choose another --output"
        )
    if not output.exists():
        return
    if not overwrite:
        raise InternLM2GraphError(
            f"{output}: already exists; choose another --output or pass --overwrite to replace it"
        )
    if not output.is_dir():
        raise InternLM2GraphError(f"{output}: is a file, not a folder; choose another --output")
    # --overwrite deletes the old folder: only ever one this tool wrote (or an empty one), so a
    # slip such as `-o . --overwrite` cannot wipe a home or project folder.
    if any(output.iterdir()) and not (output / "genai_config.json").is_file():
        raise InternLM2GraphError(
            f"{output}: exists and is not a model folder (no genai_config.json), so --overwrite "
            "will not delete it; remove it yourself or choose another --output"
        )


def check_apart(output: Path, source: Path) -> None:
    """Refuse to replace the folder the weights are read from (or one holding it)."""
    output, source = Path(output).resolve(), Path(source).resolve()
    if output == source or output in source.parents:
        raise InternLM2GraphError(
            f"{output}: --output would replace the checkpoint being converted ({source}); "
            "choose another --output"
        )


@contextlib.contextmanager
def staged_folder(output: Path, overwrite: bool, expected_bytes: int = 0) -> Iterator[Path]:
    """A temporary sibling of `output` that becomes `output` only if the block succeeds.

    On any failure, Ctrl-C included, the sibling (and any parent folders made for it) is
    removed, and an existing `output` is left exactly as it was.
    """
    output = Path(output).absolute()
    check_output(output, overwrite)
    made = _make_parents(output.parent)
    try:
        _check_free_space(output.parent, expected_bytes)
        # Created with mkdir, not mkdtemp, so the folder gets the umask's permissions (mkdtemp's
        # 0700 would hide the model from other users once moved into place).
        staging = output.with_name(f".{output.name}.{secrets.token_hex(4)}.partial")
        staging.mkdir()
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield staging
        _move_into_place(staging, output)
    except OSError as err:
        full = _disk_full(err, staging)
        _discard(staging, made)
        if full:
            needs = human_bytes(expected_bytes)
            raise InternLM2GraphError(
                f"{output.parent}: no space left on the device while writing the model (it "
                f"needs about {needs}); free some space or choose another --output"
            ) from None
        raise
    except BaseException:
        _discard(staging, made)
        raise


def _check_free_space(folder: Path, expected_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if expected_bytes > free:
        needs, left = human_bytes(expected_bytes), human_bytes(free)
        raise InternLM2GraphError(
            f"{folder}: the model needs about {needs} but only {left} is free there; free some "
            "space or choose another --output"
        )


def _disk_full(err: OSError, folder: Path) -> bool:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return err.errno is None and shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`; an existing `output` is swapped out atomically."""
    if not output.exists():
        os.replace(staging, output)
        return
    # The new folder is in place once the swap is done: failing to delete the old one after
    # that must not fail the build.
    if exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old folder
        return
    # No atomic swap here (not Linux, or a filesystem without it): two renames, undone on error.
    old = staging.with_suffix(".old")
    os.replace(output, old)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's renameat2(RENAME_EXCHANGE); False if unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _make_parents(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created, deepest first, to undo on failure."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _discard(staging: Path, made: list[Path]) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    _remove_empty(made)
