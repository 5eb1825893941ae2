"""Shared helpers: measured child processes, machine facts, medians, tables, result files.

Only the standard library and numpy/onnx are needed here; psutil and matplotlib are optional.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Measured:
    """One child process: wall seconds, peak RSS of its process tree, how it ended."""

    command: list[str]
    seconds: float
    peak_rss_bytes: int
    returncode: int
    log: str
    memory_limit_hit: bool = False
    cpu_seconds: float = 0.0  # user + sys of the tree: independent of other work on the box

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        if self.memory_limit_hit:
            return "OOM (stopped at the memory limit)"
        if self.returncode == -signal.SIGKILL:
            return "killed (OOM?)"
        return f"failed (exit {self.returncode})"


def run_measured(
    command: list[str], log: Path, env: dict | None = None, memory_limit: int | None = None
) -> Measured:
    """Run `command` to completion; wall time and peak RSS from wait4's rusage.

    The kernel's ru_maxrss for a reaped child is the largest RSS of that child and of every
    descendant it waited for, so this covers helper processes too. With `memory_limit` (bytes),
    a watchdog stops the child's process group once its tree's RSS passes the limit, before
    the kernel's OOM killer picks a victim on a shared machine.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
        hit = threading.Event()
        if memory_limit:
            threading.Thread(target=_watch, args=(proc, memory_limit, hit), daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(
        command, seconds, usage.ru_maxrss * 1024, proc.returncode, str(log), hit.is_set(), cpu
    )


def _watch(proc: subprocess.Popen, limit: int, hit: threading.Event) -> None:
    while proc.returncode is None:
        if tree_rss(proc.pid) > limit:
            hit.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.2)


def tree_rss(pid: int) -> int:
    """Current RSS in bytes of a process and its descendants (psutil if installed, else /proc)."""
    if has_module("psutil"):
        import psutil

        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        return sum(_rss(p) for p in procs)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def _rss(proc) -> int:
    try:
        return proc.memory_info().rss
    except Exception:  # psutil.Error: the process ended meanwhile
        return 0


def memory_available_bytes() -> int:
    return _meminfo("MemAvailable:")


def _pythonpath() -> str:
    parts = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(parts))


def tail(path: str | Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def has_module(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


# --- machine --------------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine may be shared: other work skews timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_state() -> dict:
    """The commit and the files changed since, so a result can be matched to the code."""

    def git(*a: str) -> str:
        try:
            out = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.rstrip() if out.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "internlm2_graph").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "changed": [line[3:] for line in changed if len(line) > 3],
    }


def memory_total_bytes() -> int:
    return _meminfo("MemTotal:")


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines()
    return names[0].strip() if out.returncode == 0 and names else None


def machine_info() -> dict:
    return {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gb": round(memory_total_bytes() / 1e9, 1),
        "gpu": gpu_name(),
        "python": sys.version.split()[0],
        "versions": package_versions(),
        "git": git_state(),
    }


def default_machine_name() -> str:
    gpu = gpu_name()
    if gpu:
        return gpu.replace("NVIDIA ", "").split()[0].lower()
    return f"cpu{os.cpu_count()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def require_genai() -> None:
    """Exit with the package's one-line install hint when no onnxruntime_genai is installed.

    Looked up without importing internlm2_graph, which the runtime benchmarks otherwise do
    without (they run with only the repo on PYTHONPATH)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        from internlm2_graph.runtime import MissingRuntime, genai

        try:
            genai()
        except MissingRuntime as err:
            sys.exit(f"error: {err}")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    names = (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-genai",
        "onnxruntime-genai-cuda",
        "torch",
        "transformers",
    )
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# --- numbers and output ---------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict, markdown: str, out_dir: Path = RESULTS) -> Path:
    """benchmarks/results/<name>.json and .md; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    if out_dir == RESULTS:
        from benchmarks import convert  # the rows the tables and the README are made from

        kind = convert.kind_of(name)
        try:
            if kind:
                convert.write(kind)
        except (KeyError, TypeError, ValueError) as err:  # the results are written: keep them
            print(f"warning: {kind} rows not refreshed ({err!r}); fix benchmarks/convert.py")
    return path


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value)}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


# --- model facts ----------------------------------------------------------------------------


def quant_summary(model_dir: Path) -> dict:
    """MatMulNBits settings and the dtype of the lm head, read from the graph (no weights)."""
    import onnx

    config = json.loads((Path(model_dir) / "genai_config.json").read_text())
    path = Path(model_dir) / config["model"]["decoder"]["filename"]
    graph = onnx.load(str(path), load_external_data=False).graph
    nbits = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            key = f"bits={attrs.get('bits')} block={attrs.get('block_size')} "
            key += f"acc={attrs.get('accuracy_level', 0)}"
            nbits[key] = nbits.get(key, 0) + 1
    return {"matmulnbits": nbits, "nodes": len(graph.node), "ops": _op_counts(graph)}


def _op_counts(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def try_plot(path: Path, title: str, labels: list[str], series: dict[str, list[float]]) -> bool:
    """A grouped bar chart if matplotlib is installed; returns whether one was written."""
    if not has_module("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(labels)), 3.2))
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, [v or 0 for v in values], width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return True
