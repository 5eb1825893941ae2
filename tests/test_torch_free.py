"""The package must run where torch and transformers are not installed."""

import subprocess
import sys

import pytest

PROBE = """
import sys

attempted = []


class Forbid:
    # Records and refuses any import of torch/transformers, even one guarded by try/except.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            attempted.append(name)
            raise ImportError(name + " is forbidden in this test")


sys.meta_path.insert(0, Forbid())
{body}
print("attempted:", attempted)
sys.exit(1 if attempted else 0)
"""


def run_probe(body: str) -> subprocess.CompletedProcess:
    code = PROBE.format(body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.model
def test_build_imports_neither_torch_nor_transformers(tiny_checkpoint, tmp_path):
    body = f"""
from internlm2_graph import build
from internlm2_graph import cli, reference, sizes, synthetic, verify  # noqa: F401
build({str(tiny_checkpoint)!r}, {str(tmp_path / "out")!r}, "int4", "cpu")
"""
    result = run_probe(body)
    assert result.returncode == 0, result.stdout + result.stderr


def test_probe_catches_an_import():
    result = run_probe("try:\n    import transformers\nexcept ImportError:\n    pass")
    assert result.returncode == 1 and "attempted: ['transformers']" in result.stdout
