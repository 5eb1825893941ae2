"""nox sessions: tests, lint, oldest, wheel, notebooks, benchmarks, report."""

import re
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def oldest(session: nox.Session) -> None:
    """The tests on the lowest versions pyproject.toml allows (its core and `cpu` lower bounds)."""
    constraints = Path(session.create_tmp()) / "lowest.txt"
    constraints.write_text("\n".join(lowest_versions()) + "\n")
    session.install("-c", str(constraints), "-e", ".[test]")
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


def lowest_versions() -> list[str]:
    """`name==lower bound` for every core and `cpu` dependency: pip's answer to uv's
    `--resolution lowest-direct`, so that every lower bound we state is one we have tested."""
    import tomllib  # Python 3.11+: this session only

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    pins = []
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["cpu"]]:
        name, lower = re.fullmatch(r"([\w.-]+)>=([\w.]+)(?:,<.*)?", requirement).groups()
        pins.append(f"{name}=={lower}")
    return pins


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the wheel, install it with the CPU runtime, and use it outside the repository."""
    tmp = Path(session.create_tmp()).resolve()
    for old in ("dist", "ckpt", "model"):
        shutil.rmtree(tmp / old, ignore_errors=True)
    session.install("build")
    session.run("python", "-m", "build", "--wheel", "--outdir", str(tmp / "dist"))
    session.install(f"{next((tmp / 'dist').glob('*.whl'))}[cpu]")
    session.chdir(tmp)  # the installed package, not this checkout
    session.run("internlm2-graph", "--help", silent=True)
    session.run("internlm2-graph", "chat", "--help", silent=True)
    session.run("python", "-m", "internlm2_graph.synthetic", "ckpt", "--size", "tiny")
    session.run("internlm2-graph", "-i", "ckpt", "-o", "model", "-p", "int4")
    session.run("internlm2-graph", "chat", "model", "--prompt", "Hello", "--max-new-tokens", "16")


@nox.session
def thorough(session: nox.Session) -> None:
    """The property tests with many more examples."""
    session.install("-e", ".[test]")
    session.run(
        "python", "-m", "pytest", "-q", *session.posargs, env={"HYPOTHESIS_PROFILE": "thorough"}
    )


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")


@nox.session
def notebooks(session: nox.Session) -> None:
    """Execute the notebooks (quick mode) and check the committed outputs are complete."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", "tests/test_notebooks.py", *session.posargs)


@nox.session
def refresh_notebooks(session: nox.Session) -> None:
    """Re-run the notebooks in full and save their outputs (commit the result)."""
    session.install("-e", ".[notebooks]")
    session.run("python", "notebooks/execute.py")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Every suite that runs on this machine, through the harness (about an hour on 2 cores; 80 GB
    of free disk for the 20B checkpoint), then the tables and plots. The builder side needs the
    `bench` extra (torch). Each run adds a rows file to benchmarks/results/rows/; commit the ones
    the README or docs should quote (benchmarks/README.md). GPU: `bash benchmarks/gpu.sh`."""
    session.install("-e", ".[cpu,bench]")
    bench = ("python", "-m", "benchmarks", "run")
    session.run(*bench, "export", "--model", "1.8b", "-p", "int4,fp32", "--tools", "ours,builder")
    session.run(*bench, "decode", "--model", "1.8b", "-p", "int4", "--tools", "ours,builder",
                "--repeat", "5")  # fmt: skip
    session.run(*bench, "quality,speculative,kernels", "--model", "1.8b", "-p", "int4")
    # The builder needs 39 GB for a 7B int4 export and more for 20B: ours alone here.
    session.run(*bench, "export", "--model", "7b", "-p", "int4,fp16", "--repeat", "1")
    session.run(*bench, "export", "--model", "20b", "-p", "int4,fp16", "--repeat", "1")
    session.run(*bench, "export", "--param", "study=peak_rss", "cases=1.8b:fp32,1.8b:int4,7b:int4")
    report(session)


@nox.session
def report(session: nox.Session) -> None:
    """docs/benchmarks.md, its plots and the README's headline table, from the committed rows."""
    session.install("-e", ".[cpu,bench]")
    session.run("python", "-m", "benchmarks", "report")
    session.run("python", "-m", "benchmarks", "headline")
