"""nox sessions: tests, lint, notebooks, benchmarks."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


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
    session.install("-e", ".[test,notebooks]")
    session.run("python", "-m", "pytest", "-q", "--nbmake", "notebooks", *session.posargs)


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Everything that runs on this machine; the builder side needs the `bench` extra (torch)."""
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/export.py", *session.posargs)
    session.run("python", "benchmarks/runtime.py", *session.posargs)
