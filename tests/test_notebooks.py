"""The notebooks run top to bottom, and the committed copies carry their outputs.

Execution uses nbclient with a kernel of this interpreter (see notebooks/execute.py), in quick
mode (SIZES_NOTEBOOK_QUICK=1: a 4096-token vocabulary for the 1-layer builds), about 20 s here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SIZES = NOTEBOOKS / "sizes.ipynb"
MAX_BYTES = 1.5 * 2**20


def _executor():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(nb: dict) -> list[dict]:
    return [o for cell in nb["cells"] if cell["cell_type"] == "code" for o in cell["outputs"]]


def _errors(nb: dict) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}" for o in _outputs(nb) if o["output_type"] == "error"
    ]


def _images(nb: dict) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb))


def _stdout(nb: dict) -> str:
    return "".join(
        "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
        for o in _outputs(nb)
        if o["output_type"] == "stream"
    )


@pytest.mark.model
def test_sizes_notebook_runs_in_quick_mode():
    pytest.importorskip("nbclient", reason="needs the test extra: pip install -e .[test]")
    pytest.importorskip("ipykernel", reason="needs the test extra: pip install -e .[test]")
    pytest.importorskip("matplotlib", reason="needs the test extra: pip install -e .[test]")
    execute = _executor()
    # Raises CellExecutionError, with the cell and its traceback, on the first failing cell.
    nb = execute.execute(SIZES, env=execute.QUICK_ENV)
    assert not _errors(nb)
    assert "mode: QUICK" in _stdout(nb)
    assert "vocab 4096" in _stdout(nb)  # the 1-layer builds took the small vocabulary
    assert _images(nb) >= 5


def test_committed_sizes_notebook_has_its_full_outputs():
    """Readers see the pictures without running anything: committed executed, in full mode."""
    assert SIZES.stat().st_size < MAX_BYTES, "keep the committed notebook small"
    nb = json.loads(SIZES.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    unexecuted = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unexecuted, f"code cells {unexecuted} have no outputs: python notebooks/execute.py"
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), (
        "run top to bottom once: python notebooks/execute.py"
    )
    assert not _errors(nb)
    assert "mode: full" in _stdout(nb), "commit the full run, not SIZES_NOTEBOOK_QUICK=1"
    assert _images(nb) >= 5
