"""Test matrix and tasks. `nox -s tests` runs the suite once per backend, each in an
environment that holds only that array library."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.error_on_missing_interpreters = True

BACKENDS = ["numpy", "array_api_strict", "torch", "jax"]
# A plain `torch` requirement pulls a multi-GB CUDA build on Linux; the README's
# commands set STABLEMATH_TORCH=torch==2.13.0, a CPU wheel on the CI machines.
TORCH = os.environ.get("STABLEMATH_TORCH", "torch")
BACKEND_REQUIREMENTS = {
    "numpy": [],
    "array_api_strict": ["array-api-strict"],
    "torch": [TORCH],
    "jax": ["jax[cpu]"],
}


@nox.session
@nox.parametrize("backend", BACKENDS)
def tests(session: nox.Session, backend: str) -> None:
    """The test suite on one backend (STABLEMATH_BACKEND selects it)."""
    session.install(*BACKEND_REQUIREMENTS[backend], ".[test]")
    args = session.posargs or ["-q"]
    if backend == "numpy":
        # the docstring examples run once, on NumPy
        args = [*args, "--doctest-modules", "stablemath", "tests"]
    session.run("pytest", *args, env={"STABLEMATH_BACKEND": backend})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", "stablemath", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "stablemath", "tests", "benchmarks", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """The seed cases on every CPU backend: naive formula vs framework vs stablemath."""
    session.install(".[test]", TORCH, "jax[cpu]", "optax")
    session.run("python", "benchmarks/demo.py")
