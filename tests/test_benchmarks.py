"""The benchmark scripts' own logic: kernel classification, and the README and docs tables
that are generated from the committed results (they cannot drift from them)."""

import ast
import dataclasses
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import (
    common,
    convert,
    gpu_steps,
    harness,
    kernel_profile,
    quality_per_byte,
    report,
    rows,
)

ROOT = Path(__file__).resolve().parents[1]

# Kernel names as CUPTI reports them for our H100 decode (benchmarks/results/kernels-*.md).
KERNELS = {
    "void onnxruntime::contrib::cuda::MatMulFloat4BitsKernelM1<__half, 32, false>(__half*)": (
        "matmul nbits"
    ),
    "void onnxruntime::cuda::_SplitSmallInnerKernel<int4>(onnxruntime::cuda::TArray<long, 4>)": (
        "elementwise"
    ),
    "onnxruntime::contrib::cuda::H128::grp4_fp16::kernel_mha(unsigned int)": "attention",
    "void onnxruntime::contrib::cuda::UnpackRoPEAppend<__half, __half, 16, 128>()": "attention",
    "void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<__half, 512u, 8, true>()": "norm",
    "void onnxruntime::cuda::_UnaryElementWise<__half, __half, OP_QuickGelu<__half>>()": (
        "elementwise"
    ),
}


@pytest.mark.parametrize("name", KERNELS)
def test_kernels_are_classified_by_what_they_do(name):
    assert kernel_profile.kind_of(name) == KERNELS[name]


def test_readme_headline_is_what_the_committed_results_make():
    assert report.readme_block(report.README.read_text()) == report.headline(rows.read_all()), (
        "run `python -m benchmarks headline` and commit README.md"
    )


def test_benchmarks_page_is_what_the_committed_results_make():
    assert report.PAGE.read_text() == report.page(rows.read_all()), (
        "run `python -m benchmarks report` and commit docs/benchmarks.md"
    )


@pytest.mark.parametrize("kind", convert.KINDS)
def test_converted_rows_are_the_measured_files(kind):
    committed = rows.read(rows.ROWS / f"converted-{kind}.json")
    assert committed == convert.convert(kind), "run `python -m benchmarks.convert` and commit"


def test_a_study_result_refreshes_its_converted_rows(monkeypatch, tmp_path):
    assert convert.kind_of("runtime-h100-7b-int4-cuda") == "runtime"
    assert convert.kind_of("tokenizer_agreement-cpu2") is None
    written = []
    monkeypatch.setattr(convert, "write", written.append)
    common.write_results("runtime-x", {}, "", out_dir=tmp_path)  # elsewhere: rows untouched
    assert written == []
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.write_results("runtime-x", {}, "", out_dir=tmp_path)
    assert written == ["runtime"]


def test_headline_moves_with_the_results():
    found = rows.read_all()
    line = report.DECODE[0]
    ours = report.pick(found, line, line.ours, "gen_tok_s")
    assert f"| {rows.number(ours.value)} |" in report.headline(found)
    changed = [dataclasses.replace(r, value=r.value * 2) if r is ours else r for r in found]
    assert report.headline(changed) != report.headline(found)
    assert report.pick(found, dataclasses.replace(line, source="nowhere.json"), "ours", "x") is None


def test_decode_without_a_runtime_names_the_extra(tmp_path):
    hide = "import sys; sys.modules['onnxruntime_genai'] = None\n"
    args = ["run", "decode", "--workdir", str(tmp_path), "--param", f"folders={tmp_path}"]
    script = hide + f"from benchmarks.__main__ import main; main({args!r})"
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert 'pip install "internlm2_graph[cpu]"' in result.stderr


def test_one_gpu_driver_without_python_inside():
    drivers = sorted((ROOT / "benchmarks").rglob("*.sh"))
    assert [d.name for d in drivers] == ["gpu.sh"]
    text = drivers[0].read_text()
    assert subprocess.run(["bash", "-n", str(drivers[0])]).returncode == 0
    assert not re.search(r"python3? +(-c|-)\s", text), "Python belongs in benchmarks/gpu_steps.py"
    for module in set(re.findall(r"python3? -m ([\w.]+)", text)):
        assert importlib.util.find_spec(module) is not None, module
        if module.startswith("benchmarks."):  # a module without main() would run nothing, exit 0
            assert "def main(" in (ROOT / (module.replace(".", "/") + ".py")).read_text(), module
    for suites, params in harness_calls(text):
        harness.modules(suites, params)  # the suites, study and settings exist
    listed = set(re.findall(r"^([\w-]+)\)", text, flags=re.M))
    usage = text.split("set -euo pipefail")[0]
    assert all(task in usage for task in listed), listed - set(re.findall(r"[\w-]+", usage))


def harness_calls(script: str) -> list[tuple[list[str], dict[str, str]]]:
    """(suites, {setting: value}) of each `python3 -m benchmarks run` in a shell script."""
    calls = []
    for line in script.replace("\\\n", " ").splitlines():
        if line.lstrip().startswith("#"):
            continue
        found = re.search(r"python3? -m benchmarks run ([\w,]+)(.*)", line)
        if not found:
            continue
        words, params = shlex.split(found.group(2).split(";")[0]), {}
        if "--param" in words:
            for word in words[words.index("--param") + 1 :]:
                if word.startswith("-"):
                    break
                key, sep, value = word.partition("=")
                if sep and re.fullmatch(r"[a-z_0-9]+", key):
                    params[key] = value
        calls.append((found.group(1).split(","), params))
    return calls


def test_gpu_steps_write_scales_and_turn_the_builders_cuda_graph_on(tmp_path):
    gpu_steps.main(["scales", "2", str(tmp_path / "kv.json"), "127"])
    scales = json.loads((tmp_path / "kv.json").read_text())["scales"]
    assert len(scales["k_scales"]) == 2 and scales["v_scales"][1][1023] == 8.0 / 127
    genai = {
        "model": {"decoder": {"session_options": {"provider_options": [{"cuda": {}}]}}},
        "search": {"max_length": 4096},
    }
    (tmp_path / "genai_config.json").write_text(json.dumps(genai))
    gpu_steps.main(["builder-best", str(tmp_path), "--max-length", "32768"])
    written = json.loads((tmp_path / "genai_config.json").read_text())
    options = written["model"]["decoder"]["session_options"]["provider_options"][0]["cuda"]
    assert options == {"enable_cuda_graph": "1"} and written["search"]["max_length"] == 32768


def test_probes_state_their_finding():
    for probe in sorted((ROOT / "benchmarks" / "probes").glob("[!_]*.py")):
        assert "Finding" in (ast.get_docstring(ast.parse(probe.read_text())) or ""), probe.name


def test_per_byte_variants_split_recipe_fields_from_extra_options():
    extra, recipe = quality_per_byte.split_options(
        {"algo_config": "gptq", "recipe.damp": "1e6", "recipe.search": "false", "block_size": "64"}
    )
    assert extra == {"algo_config": "gptq", "block_size": "64"}
    assert recipe == {"damp": 1e6, "search": False}
