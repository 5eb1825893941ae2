"""What a user sees: progress while building, the closing summary, `verify` and `inspect`."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from hub_server import HubServer
from surgery import copy_checkpoint, get_tensor, set_tensor

from internlm2_graph import BuildSummary
from internlm2_graph.cli import main
from internlm2_graph.progress import Progress
from internlm2_graph.synthetic import make_config


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- progress and summary -------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_task(stream, total: int, fail_at: int | None = None, quiet: bool = False) -> str:
    with Progress(quiet=quiet, stream=stream).task("writing weights") as update:
        for index in range(total):
            if index == fail_at:
                raise RuntimeError("boom")
            update(type("Tensor", (), {"name": f"layer.{index}"})(), index, total)
    return stream.getvalue()


def test_progress_is_plain_lines_when_not_a_terminal():
    lines = run_task(io.StringIO(), 100).splitlines()
    # One line per tenth of the work (plus the first), not one per tensor: logs stay short.
    assert len(lines) == 11
    assert lines[0].startswith("writing weights: 1/100 tensors")
    assert lines[-1].startswith("writing weights: 100/100 tensors")
    assert "\r" not in "".join(lines)


def test_progress_is_a_bar_on_a_terminal():
    text = run_task(Terminal(), 20)
    assert text.count("\r") == 20
    assert f"[{'#' * 30}] 20/20" in text and "layer.19" in text
    assert text.endswith("\n")


def test_progress_bar_ends_its_line_when_the_work_fails():
    stream = Terminal()
    with pytest.raises(RuntimeError):
        run_task(stream, 20, fail_at=5)
    assert stream.getvalue().endswith("\n")  # the error message gets a line of its own


def test_quiet_progress_writes_nothing():
    assert run_task(Terminal(), 20, quiet=True) == ""


@pytest.mark.model
def test_build_reports_progress_and_a_summary(tiny_checkpoint, tmp_path, capsys):
    code, out, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", tmp_path / "out")
    assert code == 0
    assert re.search(r"^writing weights: \d+/\d+ tensors", err, re.M), err
    # parameters, precision, output size, wall time, peak memory
    pattern = (
        r"^built .*out: 217k parameters, fp32 on cpu, [\d.]+ kB on disk, [\d.]+ s, "
        r"peak memory [\d.]+ [MG]B$"
    )
    assert re.match(pattern, out.strip()), out


@pytest.mark.model
def test_quiet_build_prints_nothing(tiny_checkpoint, tmp_path, capsys):
    code, out, err = run_cli(capsys, "-i", tiny_checkpoint, "-o", tmp_path / "out", "--quiet")
    assert (code, out, err) == (0, "", "")


@pytest.mark.model
def test_quiet_build_from_a_hub_id(tiny_checkpoint, tmp_path):
    """--quiet silences huggingface_hub's download bars as well as ours."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "home")}
    with HubServer({"internlm/tiny-chat": {"main": tiny_checkpoint}}) as hub:
        command = ["-i", "internlm/tiny-chat", "-o", str(tmp_path / "out"), "--quiet"]
        result = subprocess.run(
            [sys.executable, "-m", "internlm2_graph", *command],
            env={**env, "HF_ENDPOINT": hub.url},
            capture_output=True,
            text=True,
        )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_summary_reads_like_a_model_card():
    summary = BuildSummary(
        output="out",
        parameters=7_737_708_544,
        precision="int4",
        execution_provider="cuda",
        output_bytes=4_903_000_000,
        seconds=61.04,
        peak_rss_bytes=1_230_000_000,
    )
    assert str(summary) == (
        "built out: 7.74B parameters, int4 on cuda, 4.9 GB on disk, 61.0 s, peak memory 1.23 GB"
    )


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "internlm2_graph", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--extra_options" in result.stdout and "verify" in result.stdout


# --- verify ---------------------------------------------------------------------------------


@pytest.mark.model
def test_verify_reports_ok_for_a_faithful_build(tiny_fp32, tiny_checkpoint, capsys):
    code, out, _ = run_cli(capsys, "verify", tiny_fp32, "--against", tiny_checkpoint)
    assert code == 0, out
    error = float(re.search(r"max \|logit difference\| (\S+)", out).group(1))
    assert error < 1e-4
    assert re.search(r"greedy tokens agree on (\d+)/\1", out)
    assert out.strip().endswith("OK")


@pytest.mark.model
def test_verify_catches_a_model_built_from_other_weights(
    tiny_fp32, tiny_checkpoint, tmp_path, capsys
):
    other = copy_checkpoint(tiny_checkpoint, tmp_path / "other")
    set_tensor(other, "output.weight", -get_tensor(other, "output.weight"))
    code, out, _ = run_cli(capsys, "verify", tiny_fp32, "--against", other, "--steps", "3")
    assert code == 1
    assert out.strip().endswith("MISMATCH (tolerance 0.001)")


def test_verify_needs_a_built_folder(tiny_checkpoint, capsys):
    code, _, err = run_cli(capsys, "verify", tiny_checkpoint, "--against", tiny_checkpoint)
    assert code == 2
    assert err.startswith("error: ") and "no genai_config.json" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.model
def test_verify_text_reports_agreement_per_paragraph(tiny_fp32, tmp_path, capsys):
    text = tmp_path / "text.md"
    text.write_text("# 标题\n\n中文模型，分词器。Hello, world!\n\n \ndef f(x):\n    return x\n")
    code, out, _ = run_cli(capsys, "verify", tiny_fp32, "--text", text)
    assert code == 0, out
    runtime, exact, pieces, verdict = out.strip().splitlines()
    everything = r" agrees with SentencePiece on 3/3 paragraphs \(100.0%\) and (\d+)/\1 tokens .*"
    assert re.fullmatch("og.Tokenizer" + everything, runtime)
    assert re.fullmatch("exact_tokenizer" + everything, exact)
    assert re.fullmatch(r"og.Tokenizer gives (\d+)/\1 pieces of the vocabulary .*", pieces)
    assert verdict == "OK"


def test_verify_text_names_the_paragraphs_og_gets_wrong(internlm_v1_tokenizer, tmp_path, capsys):
    """Works on the folder alone (tokenizer.model is copied at build time): no --against."""
    text = tmp_path / "text.md"
    text.write_text("| a | b |\n\n| " + "-" * 400 + " |\n\nx = 1\n")
    code, out, _ = run_cli(capsys, "verify", internlm_v1_tokenizer, "--text", text)
    assert code == 1, out
    runtime, where, exact, pieces, verdict = out.strip().splitlines()
    assert runtime.startswith("og.Tokenizer agrees with SentencePiece on 2/3 paragraphs (66.7%)")
    assert where.startswith("  paragraphs that differ start on lines 3 (og.Tokenizer: ")
    assert exact.startswith("exact_tokenizer agrees with SentencePiece on 3/3 paragraphs")
    assert pieces.startswith("og.Tokenizer gives 91829/91829 pieces")
    assert verdict.startswith("MISMATCH") and "exact_tokenizer(folder)" in verdict


@pytest.mark.model
def test_verify_text_and_logits_together(tiny_fp32, tiny_checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("Hello\n")
    args = ("verify", tiny_fp32, "--against", tiny_checkpoint, "--text", text, "--steps", "2")
    code, out, _ = run_cli(capsys, *args)
    assert code == 0, out
    assert "greedy tokens agree" in out and "1/1 paragraphs" in out


@pytest.mark.model
@pytest.mark.parametrize(
    "args, message",
    [
        ((), "verify needs --against CHECKPOINT"),
        (("--text", "missing.txt"), "missing.txt: No such file"),
        (("--text", "latin1.txt"), "latin1.txt: not UTF-8 text"),
    ],
)
def test_verify_errors_are_one_line(tiny_fp32, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    code, _, err = run_cli(capsys, "verify", tiny_fp32, *args)
    assert code == 2
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1


# --- inspect --------------------------------------------------------------------------------


def test_inspect_a_checkpoint(tiny_checkpoint, capsys):
    code, out, _ = run_cli(capsys, "inspect", tiny_checkpoint)
    assert code == 0
    assert "InternLM2, 217k parameters" in out
    assert "heads 4 (kv 2, GQA group 2), head_dim 16" in out
    # The context (256) is below the 4096 default, so the KV cache covers all of it.
    assert "KV cache of 256 tokens" in out
    # fp32 weights: 4 bytes per parameter (870 kB), and the rotary tables (16 kB).
    assert re.search(r"fp32 cpu +weights +886 kB", out)


def test_inspect_needs_only_config_json(tmp_path, capsys):
    """A 7B-shaped config.json alone: no weights to download to plan a 7B build."""
    (tmp_path / "config.json").write_text(json.dumps(make_config("7b")))
    code, out, _ = run_cli(capsys, "inspect", tmp_path, "--context", 8192)
    assert code == 0
    assert "InternLM2, 7.74B parameters" in out
    rows = {
        tuple(m.group(1, 2)): m.group(3, 4)
        for m in re.finditer(r"(\w+) (cpu|cuda) +weights +(.+?) \+ KV cache +(.+?) =", out)
    }
    assert len(rows) == 8  # every pair a build accepts: fp32/fp16/int4/int8 cpu, all but fp32 cuda
    # bf16: 2 bytes a parameter (~15.5 GB); KV: 2 * 32 layers * 8 kv heads * 128 * 2 bytes
    # = 128 KiB a token, so 8192 tokens take 1.07 GB.
    assert rows["bf16", "cuda"] == ("15.5 GB", "1.07 GB")
    assert rows["fp32", "cpu"][1] == "2.15 GB"
    int4 = float(rows["int4", "cuda"][0].split()[0])
    assert 4 < int4 < 6  # ~0.625 bytes a parameter


def test_inspect_without_config(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 2
    assert "config.json: not found" in err


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_inspect_context_must_be_positive(tmp_path, value, capsys):
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path), "--context", value])
    assert "expected a positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, expected",
    [
        ("one", [(1, "one")]),
        ("one\n\ntwo\n", [(1, "one"), (3, "two\n")]),
        ("\n\n  one\n  more\n \t\n\n\ntwo", [(3, "  one\n  more"), (8, "two")]),
        ("a\n\nb\n\n\n\nc", [(1, "a"), (3, "b"), (7, "c")]),
        ("\n \n", []),
    ],
)
def test_verify_text_splits_paragraphs_at_blank_lines(text, expected):
    from internlm2_graph.verify import paragraphs

    assert paragraphs(text) == expected
