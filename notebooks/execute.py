"""Execute the notebooks in this folder top to bottom, in a kernel of this very interpreter.

    python notebooks/execute.py                  # full mode, outputs written back (committed)
    python notebooks/execute.py --quick --check  # CI: SIZES_NOTEBOOK_QUICK=1, nothing written

The kernel is always `sys.executable` with ipykernel, from a kernel spec written to a temporary
folder, so it works on a clean machine with only `pip install -e .[test]` (or `.[notebooks]`)
done: no `jupyter kernelspec install`, and no other Python's "python3" kernel picked up by name.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL = "internlm2-graph-notebooks"
QUICK_ENV = {"SIZES_NOTEBOOK_QUICK": "1"}


def execute(path: str | Path, *, env: dict[str, str] | None = None, timeout: int = 900):
    """Run every cell of the notebook at `path`; returns the executed notebook.

    Raises nbclient.exceptions.CellExecutionError on the first cell that fails. `env` is added to
    this process's environment for the kernel only. The working directory is the notebook's.
    """
    import os

    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from traitlets import default

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="nb-kernels-") as kernels:
        write_kernel_spec(Path(kernels) / KERNEL)

        class Manager(AsyncKernelManager):
            @default("kernel_spec_manager")
            def _only_ours(self):
                return KernelSpecManager(kernel_dirs=[kernels], ensure_native_kernel=False)

        client = NotebookClient(
            nb,
            kernel_name=KERNEL,
            kernel_manager_class=Manager,
            timeout=timeout,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute(env={**os.environ, **(env or {})})
    # Commit the kernel the notebook was written for, not the temporary one.
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every *.ipynb here")
    parser.add_argument("--quick", action="store_true", help="set SIZES_NOTEBOOK_QUICK=1")
    parser.add_argument("--check", action="store_true", help="execute only; write nothing back")
    args = parser.parse_args(argv)
    for path in args.notebooks or sorted(HERE.glob("*.ipynb")):
        start = time.perf_counter()
        nb = execute(path, env=QUICK_ENV if args.quick else None)
        if not args.check:
            nbformat.write(nb, path)
        size = path.stat().st_size
        print(
            f"{path}: ok in {time.perf_counter() - start:.0f} s, {size / 2**20:.2f} MiB", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
