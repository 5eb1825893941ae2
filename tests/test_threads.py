"""og's intra-op thread count on the CPU: what runtime.load_model overlays and when it leaves
og's default alone (og 0.18 assumes two hardware threads per core)."""

import os

import pytest

from internlm2_graph.runtime import cpu_threads_overlay, physical_cores


def config(**session_options) -> dict:
    session = {"log_id": "onnxruntime-genai", "provider_options": [], **session_options}
    return {"model": {"decoder": {"session_options": session}}}


def threads(overlay: dict | None) -> int | None:
    if overlay is None:
        return None
    return overlay["model"]["decoder"]["session_options"]["intra_op_num_threads"]


@pytest.mark.parametrize(
    ("cores", "logical", "expected"),
    [
        (2, 2, 2),  # a 2-vCPU VM without SMT: og would use 1
        (16, 16, 16),
        (2, 16, 2),  # pinned to 2 cores of a 16-core host: og would use 8
        (8, 16, None),  # two threads per core: og's default is right
        (1, 2, None),
    ],
)
def test_overlay_gives_the_physical_cores(cores, logical, expected):
    assert threads(cpu_threads_overlay(config(), cores, logical)) == expected


def test_a_count_the_folder_sets_is_kept():
    assert cpu_threads_overlay(config(intra_op_num_threads=3), 2, 2) is None


def test_cuda_folders_are_left_alone():
    cuda = config(provider_options=[{"cuda": {"enable_cuda_graph": "1"}}])
    assert cpu_threads_overlay(cuda, 2, 2) is None


def test_unknown_core_count_leaves_og_default():
    assert cpu_threads_overlay(config(), None, 2) is None


def test_physical_cores_within_the_affinity():
    cores = physical_cores()
    assert cores is not None and 1 <= cores <= len(os.sched_getaffinity(0))
