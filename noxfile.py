"""nox sessions: the single entry point for lint, types, tests, conformance and benchmarks."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint (with the ASYNC rules) and formatting."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and the examples."""
    session.install("-e", ".[test]", "mypy>=1.10", "nox>=2024.4")
    session.run("mypy", "--strict")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite."""
    session.install("-e", ".[test]")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python=PYTHON)
def conformance(session: nox.Session) -> None:
    """Autobahn|Testsuite sections 1-10 through Atlas to a conformant echo backend (kosoku)."""
    session.install("-e", ".[test]", "kosoku>=0.1")
    session.run("python", "tests/conformance/run_autobahn.py", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: Atlas beside a direct connection, nginx and HAProxy (benchmarks/README.md).

    run.py installs nginx and haproxy with apt-get where missing (as root) and the Node
    load generator with npm; pass its options after `--`, e.g. `nox -s bench -- --quick`.
    """
    session.install("-e", ".")
    session.run("python", "benchmarks/run.py", *session.posargs)
