"""The bad-input catalogue: each way a user's input can be wrong, as the CLI answers it.

Every case must exit non-zero with ONE line on stderr that names the file, tensor or field and
says what to do, print no traceback (unless --verbose), and leave nothing at --output: no
folder, no `.partial` sibling, not even the parent folders the build would have made.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from surgery import copy_checkpoint, drop_tensor, edit_entry, edit_json, get_tensor, set_tensor

from internlm2_graph import convert, package
from internlm2_graph.cli import main
from internlm2_graph.errors import InternLM2GraphError

SHARD_2 = "model-00002-of-00003.safetensors"
W2 = "model.layers.0.feed_forward.w2.weight"


@dataclass(frozen=True)
class Case:
    id: str
    damage: Callable[[Path], None]  # breaks a copy of the tiny checkpoint
    expect: tuple[str, ...]  # what the error line must say
    args: tuple[str, ...] = ()


def _config(**changes) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder / "config.json", **changes)


def _only_bin(folder: Path) -> None:
    for path in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch pickle stand-in")


def _truncate(keep: Callable[[Path], int]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / SHARD_2
        data = path.read_bytes()
        path.write_bytes(data[: keep(path)])

    return damage


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _garble_header(folder: Path) -> None:
    path = folder / SHARD_2
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))


def _lfs_pointer(folder: Path) -> None:
    (folder / SHARD_2).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 108256\n"
    )


def _poke(name: str, value: float) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        values = get_tensor(folder, name)
        values.flat[7] = value
        set_tensor(folder, name, values)

    return damage


def _reappended_chat_tokens(folder: Path) -> None:
    """Old transformers fine-tunes appended the chat tokens again past the embedding rows."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for offset, name in enumerate(["<|im_start|>", "<|im_end|>"]):
        entry = {"content": name, "special": True}
        config["added_tokens_decoder"][str(1024 + offset)] = entry
    path.write_text(json.dumps(config))


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _intact(folder: Path) -> None:
    """The checkpoint is fine; the options are not."""


CATALOGUE = [
    Case("missing-folder", shutil.rmtree, ("does not exist", "checkpoint folder")),
    Case("no-config", _remove("config.json"), ("config.json: not found", "--input")),
    Case(
        "other-architecture",
        _config(architectures=["LlamaForCausalLM"], model_type="llama"),
        ("config.json", "LlamaForCausalLM", "expected InternLM2ForCausalLM"),
    ),
    Case(
        "hidden-not-divisible-by-heads",
        _config(num_attention_heads=3, num_key_value_heads=1),
        ("config.json", "hidden_size 64 is not divisible by num_attention_heads 3"),
    ),
    Case(
        "heads-not-divisible-by-kv-heads",
        _config(num_key_value_heads=3),
        ("config.json", "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    ),
    Case(
        "unknown-rope-scaling",
        _config(rope_scaling={"type": "yarn", "factor": 4.0}),
        ("config.json", "rope_scaling type 'yarn'", "linear, dynamic"),
    ),
    Case(
        "head-dim-not-a-multiple-of-16",
        _config(num_attention_heads=8, num_key_value_heads=2),
        ("config.json", "head_dim 8", "multiple of 16", "GroupQueryAttention"),
    ),
    Case(
        "only-pytorch-bin",
        _only_bin,
        ("pytorch_model.bin: not a readable torch.save file", "download it again"),
    ),
    Case(
        "index-names-missing-shard",
        _remove(SHARD_2),
        ("model.safetensors.index.json names shard " + SHARD_2, "download the missing shard"),
    ),
    Case(
        "tensor-missing",
        lambda f: drop_tensor(f, "model.layers.1.ffn_norm.weight"),
        ("tensor model.layers.1.ffn_norm.weight is missing", "download the checkpoint again"),
    ),
    Case(
        "tensor-wrong-shape",
        lambda f: edit_entry(f, "output.weight", shape=[64, 1024]),
        ("output.weight has shape [64, 1024]", "implies [1024, 64]"),
    ),
    Case(
        "tensor-int32",
        lambda f: edit_entry(f, "model.norm.weight", dtype="I32", shape=[32]),
        (SHARD_2, "model.norm.weight has dtype I32", "re-save the checkpoint in bf16"),
    ),
    Case(
        "tensor-float64",
        lambda f: edit_entry(f, W2, dtype="F64", shape=[64, 40]),
        (SHARD_2, f"{W2} has dtype F64", "re-save"),
    ),
    Case(
        "file-shorter-than-header",
        _truncate(lambda path: 5),
        (SHARD_2, "corrupt safetensors file", "download it again"),
    ),
    Case(
        "header-cut-short",
        _truncate(lambda path: 8 + _header_length(path) // 2),
        (SHARD_2, "header length points past the end", "download it again"),
    ),
    Case("header-garbled", _garble_header, (SHARD_2, "header is not valid JSON", "download it")),
    Case(
        "data-truncated",
        _truncate(lambda path: path.stat().st_size - 100),
        (SHARD_2, "model.norm.weight runs past the end of the file", "download it again"),
    ),
    Case("git-lfs-pointer", _lfs_pointer, (SHARD_2, "Git LFS pointer", "git lfs pull")),
    Case(
        "nan-weight",
        _poke(W2, np.nan),
        (SHARD_2, f"tensor {W2} contains NaN or Inf", "--allow_nonfinite"),
    ),
    Case(
        "inf-weight",
        _poke("output.weight", np.inf),
        ("tensor output.weight contains NaN or Inf", "--allow_nonfinite"),
    ),
    Case(
        "tokenizer-ids-past-embedding",
        _reappended_chat_tokens,
        ("tokenizer has ids 1024", "embedding has 1024 rows", "added_tokens_decoder"),
    ),
    Case(
        "no-tokenizer-model",
        _remove("tokenizer.model"),
        ("tokenizer.model: not found", "copy it from the base model"),
    ),
    Case(
        "unknown-extra-option",
        _intact,
        ("--extra_options: unknown option 'int4_blok_size'", "block_size"),
        ("-p", "int4", "--extra_options", "int4_blok_size=32"),
    ),
    Case(
        "extra-option-not-key-value",
        _intact,
        ("'int4_block_size' is not KEY=VALUE",),
        ("-p", "int4", "--extra_options", "int4_block_size"),
    ),
    Case(
        "extra-option-bad-number",
        _intact,
        ("block_size='thirty'", "expected a whole number"),
        ("-p", "int4", "--extra_options", "int4_block_size=thirty"),
    ),
    Case(
        "extra-option-bad-bool",
        _intact,
        ("is_symmetric='maybe'", "expected true or false"),
        ("-p", "int4", "--extra_options", "is_symmetric=maybe"),
    ),
    Case(
        "extra-option-for-another-precision",
        _intact,
        ("block_size only apply to --precision int4/int8",),
        ("--extra_options", "int4_block_size=32"),
    ),
    Case(
        "extra-option-for-another-device",
        _intact,
        ("enable_cuda_graph only applies to --execution_provider cuda",),
        ("--extra_options", "enable_cuda_graph=1"),
    ),
    Case(
        "extra-option-filename-outside-output",
        _intact,
        ("filename='../model.onnx'", "without folders"),
        ("--extra_options", "filename=../model.onnx"),
    ),
    Case(
        "extra-option-max-length-not-positive",
        _intact,
        ("max_length='0'", "expected a positive number"),
        ("--extra_options", "max_length=0"),
    ),
    Case(
        "max-length-past-the-context",
        _config(rope_scaling={"type": "linear", "factor": 2.0}),
        ("max_length=1000", "512 positions", "factor 2", "use max_length <= 512"),
        ("--extra_options", "max_length=1000"),
    ),
    Case(
        "max-length-past-exact-counting",
        _config(rope_scaling={"type": "dynamic", "factor": 2.0}),
        ("max_length=16777217", "16777216 positions the graph counts exactly"),
        ("--extra_options", "max_length=16777217"),
    ),
    Case(
        "extra-option-given-twice",
        _intact,
        ("max_length is given twice",),
        ("--extra_options", "max_length=64", "max_length=128"),
    ),
]


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, to break."""
    return copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *fragments: str) -> str:
    """stderr is exactly one `error:` line (no traceback) holding every fragment."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def assert_nothing_left(folder: Path, *allowed: str) -> None:
    """Nothing in `folder` but `allowed`: no output, no staging sibling, no made parents."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(allowed)


@pytest.mark.model
@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_is_refused_in_one_line(case, checkpoint, tmp_path, capsys):
    case.damage(checkpoint)
    output = tmp_path / "models" / "tiny"  # its parent does not exist yet either
    code, out, err = run_cli(capsys, "-i", checkpoint, "-o", output, "-q", *case.args)
    assert code == 2
    assert_one_line(err, *case.expect)
    assert out == ""
    assert_nothing_left(tmp_path, *(["ckpt"] if checkpoint.exists() else []))


# Found only as the data is read, while the folder is written (reading every weight first would
# double the build's disk reads): the staged folder is removed.
FOUND_WHILE_WRITING = {"nan-weight", "inf-weight"}


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_bad_input_is_refused_before_anything_is_written(case, checkpoint, tmp_path, monkeypatch):
    """Decided before the first write: a doomed build never makes its staging folder."""
    staged = []

    def staged_folder(*args):
        staged.append(args)
        raise InternLM2GraphError("staging")

    monkeypatch.setattr(package, "staged_folder", staged_folder)
    case.damage(checkpoint)
    assert main(["-i", str(checkpoint), "-o", str(tmp_path / "out"), "-q", *case.args]) == 2
    assert bool(staged) == (case.id in FOUND_WHILE_WRITING)


def test_verbose_shows_the_traceback(checkpoint, tmp_path):
    (checkpoint / "config.json").unlink()
    with pytest.raises(InternLM2GraphError, match="config.json: not found"):
        main(["-i", str(checkpoint), "-o", str(tmp_path / "out"), "--verbose"])


def test_real_command_prints_no_traceback(tmp_path):
    """The installed entry point, in a fresh interpreter, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "internlm2_graph", "-i", str(tmp_path / "nope"), "-o", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert_one_line(result.stderr, "does not exist")


@pytest.mark.model
def test_nonfinite_weights_build_with_a_warning_when_allowed(checkpoint, tmp_path, capsys):
    _poke(W2, np.nan)(checkpoint)
    output = tmp_path / "out"
    args = ("-i", checkpoint, "-o", output, "-q", "--allow_nonfinite")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"tensor {W2} contains NaN or Inf" in warnings[0]
    assert (output / "genai_config.json").is_file()


# --- the output folder ----------------------------------------------------------------------


def test_existing_output_is_kept_without_overwrite(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", output)
    assert code == 2
    assert_one_line(err, f"{output}: already exists", "--overwrite")
    assert (output / "notes.txt").read_text() == "mine"
    assert_nothing_left(tmp_path, "out")


@pytest.mark.model
def test_overwrite_replaces_an_old_build(tiny_checkpoint, tiny_fp32, tmp_path, capsys):
    output = tmp_path / "out"
    copy_checkpoint(tiny_fp32, output)
    (output / "stale.txt").write_text("from an older build")
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", output, "-q", "--overwrite")
    assert code == 0, err
    assert not (output / "stale.txt").exists()
    assert (output / "genai_config.json").is_file()
    assert_nothing_left(tmp_path, "out")


@pytest.mark.model
def test_overwrite_without_an_atomic_swap(tiny_checkpoint, tiny_fp32, tmp_path, monkeypatch):
    """Where renameat2 is missing (macOS, some filesystems) two renames do the same job."""
    monkeypatch.setattr(package, "exchange", lambda a, b: False)
    output = tmp_path / "out"
    copy_checkpoint(tiny_fp32, output)
    (output / "stale.txt").write_text("from an older build")
    assert main(["-i", str(tiny_checkpoint), "-o", str(output), "-q", "--overwrite"]) == 0
    assert not (output / "stale.txt").exists() and (output / "model.onnx").is_file()
    assert_nothing_left(tmp_path, "out")


@pytest.mark.model
def test_failed_overwrite_keeps_the_old_build(checkpoint, tiny_fp32, tmp_path, capsys):
    _poke(W2, np.inf)(checkpoint)
    output = tmp_path / "out"
    copy_checkpoint(tiny_fp32, output)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    code, _, err = run_cli(capsys, "-i", checkpoint, "-o", output, "-q", "--overwrite")
    assert code == 2
    assert_one_line(err, "contains NaN or Inf")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert_nothing_left(tmp_path, "ckpt", "out")


def test_overwrite_never_deletes_a_folder_it_did_not_write(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "project"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", output, "--overwrite")
    assert code == 2
    assert_one_line(err, "is not a model folder (no genai_config.json)", "remove it yourself")
    assert (output / "thesis.tex").exists()


def test_output_may_not_replace_the_checkpoint(checkpoint, capsys):
    # Some hub repos hold an ONNX build next to the safetensors, genai_config.json included.
    (checkpoint / "genai_config.json").write_text("{}")
    code, _, err = run_cli(capsys, "-i", checkpoint, "-o", checkpoint, "--overwrite")
    assert code == 2
    assert_one_line(err, "would replace the checkpoint being converted")
    assert (checkpoint / "config.json").is_file()


def test_output_that_is_a_file(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"")
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", output, "--overwrite")
    assert code == 2
    assert_one_line(err, "is a file, not a folder")


def test_output_inside_a_file(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "notes").write_text("")
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", tmp_path / "notes" / "out")
    assert code == 2
    assert_one_line(err, f"{tmp_path / 'notes'}: is a file", "choose another --output")


def test_other_write_errors_are_one_line_too(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    def save_model(model, folder, filename, on_tensor=None):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder / filename))

    monkeypatch.setattr(package, "save_model", save_model)
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", tmp_path / "out", "-q")
    assert code == 2
    assert_one_line(err, "model.onnx: Permission denied", "--verbose")
    assert_nothing_left(tmp_path)


# --- a full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 kB filesystem (tmpfs; needs root), too small for the tiny model's ~1 MB."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_disk_too_small_is_refused_before_writing(tiny_checkpoint, small_disk, capsys):
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", small_disk / "out")
    assert code == 2
    assert_one_line(err, f"{small_disk}: the model needs about 886 kB", "is free there")
    assert_nothing_left(small_disk)


@pytest.mark.model
def test_disk_filling_up_while_writing(tiny_checkpoint, small_disk, capsys, monkeypatch):
    """The estimate can be wrong (or another process fills the disk): fail cleanly mid-write."""
    monkeypatch.setattr(convert, "graph_bytes", lambda *args: 0)
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", small_disk / "out", "-q")
    assert code == 2
    assert_one_line(err, f"{small_disk}: no space left on the device", "free some space")
    assert_nothing_left(small_disk)


def test_disk_full_simulated(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """The same without root: the saver fails with ENOSPC after writing part of the data."""

    def save_model(model, folder, filename, on_tensor=None):
        (folder / (filename + ".data")).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / filename))

    monkeypatch.setattr(package, "save_model", save_model)
    code, _, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", tmp_path / "out", "-q")
    assert code == 2
    assert_one_line(err, "no space left on the device", "choose another --output")
    assert_nothing_left(tmp_path)


# --- Ctrl-C ---------------------------------------------------------------------------------

# The tiny model is written in a blink: slow each tensor down so the signal lands mid-write.
SLOW_BUILD = """
import sys, time
from internlm2_graph import package
from internlm2_graph.cli import main

save_model = package.save_model

def slow_save(model, folder, filename, on_tensor):
    def on(tensor, index, total):
        on_tensor(tensor, index, total)
        time.sleep(0.3)
    save_model(model, folder, filename, on)

package.save_model = slow_save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.model
def test_ctrl_c_leaves_no_half_written_folder(tiny_checkpoint, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_BUILD, "-i", str(tiny_checkpoint), "-o", str(output)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # As from a terminal: a suite started in the background (nohup, `cmd &`) inherits an
        # ignored SIGINT, and Python then never raises KeyboardInterrupt (the build ran on).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Progress lines go to stderr as tensors are written: the first one means mid-write.
    first = process.stderr.readline()
    assert first.startswith("writing weights"), first
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in rest and "Traceback" not in rest
    assert_nothing_left(tmp_path)


@pytest.mark.model
def test_staging_folder_is_readable_like_any_folder(tiny_checkpoint, tmp_path):
    """mkdtemp would make the model folder private (0700); users share model folders."""
    output = tmp_path / "out"
    main(["-i", str(tiny_checkpoint), "-o", str(output), "-q"])
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o777 & ~umask
