"""The benchmark scripts' own logic: kernel classification and the summary of committed results."""

import shutil

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
