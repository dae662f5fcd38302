"""Test matrix and tasks.

``nox`` runs ``tests`` and ``lint``. ``nox -s tests`` runs the suite once per backend,
each in its own virtualenv holding only that array library (plus the test tools), so a
test that needs a library which is not the backend under test must skip, not fail.
Sessions use the interpreter that runs nox (any Python >= 3.11) and pip, so the
machine's pip configuration (indexes, constraints) applies.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "tests_triton", "lint"]
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "virtualenv"  # pip inside: pip's configuration applies
# Each session re-runs its installs, so a reused venv picks up changed code and
# requirements; delete .nox/ (or pass --no-reuse-existing-virtualenvs) to start clean.
nox.options.reuse_existing_virtualenvs = True

# The torch requirement. A plain `torch` requirement pulls a multi-GB CUDA build on
# Linux; set STABLEMATH_TORCH to a CPU build (the README's commands and .ci/run use
# torch==2.13.0, the CPU wheel on the CI machines).
TORCH = os.environ.get("STABLEMATH_TORCH", "torch")

BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "dask"]
# NumPy, torch CPU and JAX on the CPU also run with the fast paths
# (stablemath/_fastpaths.py, stablemath/_xla_ffi.py) turned off, so that the generic
# kernels stay tested on them as well
SESSIONS = [*BACKENDS, "numpy-generic", "torch-generic", "jax-generic"]
# What each backend's session installs besides the package with its `test` extra
# (pytest, pytest-timeout, mpmath, hypothesis, scipy). Versions come from pyproject's extras.
BACKEND_INSTALL = {
    "numpy": [".[test]"],
    "array_api_strict": [".[test,strict]"],
    "torch": [".[test]", TORCH],
    "jax": [".[test,jax]", "optax"],
    "dask": [".[test,dask]"],
}
LINTED = ["stablemath", "tests", "benchmarks", "noxfile.py"]
# A test that hangs (a native kernel that spins never returns to Python, so only a
# watchdog thread can stop it) fails its session after this long instead of running
# into CI's limit; the slowest test takes well under a minute
TIMEOUT = ["--timeout=600", "--timeout-method=thread"]


@nox.session
@nox.parametrize("backend", SESSIONS, ids=SESSIONS)
def tests(session: nox.Session, backend: str) -> None:
    """The test suite on one backend; STABLEMATH_BACKEND tells the tests which.

    Arguments after ``--`` go to pytest, e.g. ``nox -s "tests(torch)" -- -k softmax -x``.
    Without them, NumPy also runs the docstring examples.
    """
    env = {}
    if backend.endswith("-generic"):
        backend = backend.removesuffix("-generic")
        env["STABLEMATH_DISABLE_FASTPATHS"] = "1"
    session.install(*BACKEND_INSTALL[backend])
    args = session.posargs
    if not args:
        args = ["-q"]
        if backend == "numpy":
            # (modules needing an optional dependency, e.g. Triton, are skipped)
            args += ["--doctest-modules", "--doctest-ignore-import-errors", "stablemath", "tests"]
    session.run("pytest", *TIMEOUT, *args, env={"STABLEMATH_BACKEND": backend, **env})


@nox.session
def tests_triton(session: nox.Session) -> None:
    """The Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the generic
    path (no GPU needed); on a CUDA machine the same tests run on the GPU."""
    session.install(".[test]", TORCH, "triton")
    args = session.posargs or ["-q"]
    session.run(
        "pytest",
        "tests/test_triton.py",
        *TIMEOUT,
        *args,
        env={"TRITON_INTERPRET": "1", "STABLEMATH_BACKEND": "torch"},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """The cross-framework benchmark (benchmarks/run.py; `-- --full` for every shape)."""
    session.install(".[bench]", TORCH, "jax[cpu]", "optax", "dask[array]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting (check only; `ruff format` fixes)."""
    session.install("ruff")
    session.run("ruff", "check", *LINTED)
    session.run("ruff", "format", "--check", *LINTED)


@nox.session
def demo(session: nox.Session) -> None:
    """The seed cases: naive formula vs the framework's own function vs stablemath.

    Installs every CPU backend (NumPy with SciPy, PyTorch, JAX with optax) and fails if
    stablemath is ever NaN or wrong.
    """
    session.install(".", "scipy", TORCH, "jax[cpu]", "optax")
    session.run("python", "benchmarks/demo.py")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml, docs/), built strictly into site/.

    First tests/test_docs.py: the committed tables under docs/generated/ equal the
    output of the commands that make them, and every ```python example on the pages is
    marked for execution. Then ``mkdocs build --strict``, during which markdown-exec runs
    those examples; any warning, a failing example included, fails the build. Every
    framework the examples compare against is installed, so nothing is skipped.
    ``nox -s docs -- regenerate`` rewrites docs/generated/ first (python docs/generate.py);
    ``nox -s docs -- serve`` serves the site on localhost:8000 instead of building it.
    """
    session.install(".[docs,test,jax,dask]", TORCH, "optax")
    env = {"NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2, not a warning
    if "regenerate" in session.posargs:
        session.run("python", "docs/generate.py")
    if "serve" in session.posargs:
        session.run("mkdocs", "serve", env=env)
        return
    session.run("pytest", "tests/test_docs.py", "-q", "-p", "no:cacheprovider")
    session.run("mkdocs", "build", "--strict", env=env)
