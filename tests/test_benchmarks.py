"""The benchmark scripts' own logic: kernel classification and the summary of committed results."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_profile, summary
from benchmarks.common import RESULTS

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


def test_summary_of_committed_results_prefers_sessions_run_in_both_orders(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(RESULTS, folder, ignore=shutil.ignore_patterns("*.png", "SUMMARY.md"))
    summary.main(["--results", str(folder), "--no-plots"])
    text = (folder / "SUMMARY.md").read_text()
    for section in ("## Export", "## Runtime", "## CUDA parity", "## Peak RSS"):
        assert section in text
    rows = summary.runtime_rows(summary.load(folder, "runtime-*.json"))
    chosen = summary.plot_selection(rows)
    cpu = [r for r in chosen if r["ep"] == "cpu"]
    assert cpu and all(r["abba"] for r in cpu)


def test_runtime_benchmark_without_a_runtime_names_the_extra(tmp_path):
    hide = "import sys; sys.modules['onnxruntime_genai'] = None\n"
    script = hide + f"from benchmarks import runtime; runtime.main([{str(tmp_path)!r}])"
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert 'pip install "internlm2_graph[cpu]"' in result.stderr
