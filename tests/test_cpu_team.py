"""The row kernels run on PyTorch's OpenMP threads (stablemath/_cpu_team.py): the
same bits as one call on the calling thread, every kernel and output dtype, rows for
the generic kernel reported from any block, torch's thread count obeyed, and a
forked child that does not wait for threads it does not have. (The values themselves
are held to the SPEC by the whole suite through the torch-CPU fast path.)"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import backends_named

pytestmark = pytest.mark.skipif(not backends_named("torch"), reason="torch not selected")

if backends_named("torch"):
    import torch

    from stablemath import _cpu_kernels as ck
    from stablemath import _cpu_team as team


def _rows(shape, seed=0):
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.1, 3.0, 80.0], (shape[0], 1))
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x[::5, ::3] = -np.inf
    return x


SHAPE = (517, 700)  # 361900 elements: split into blocks, an uneven last one


def test_the_team_is_found_where_torch_runs_on_gnu_openmp():
    """On Linux with torch's wheels (the CI machine) the kernels run on torch's team;
    elsewhere the module says so and the kernels run on stablemath's pool."""
    info = torch.__config__.parallel_info()
    wheel = os.path.exists(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"))
    expected = sys.platform.startswith("linux") and "backend: OpenMP" in info and wheel
    if expected:
        assert team.available()
        assert team._gnu_openmp_of_torch().endswith("libgomp.so.1")


@pytest.fixture
def on_team(monkeypatch):
    """The team, with its usual number of threads (at least 2), or the test fails."""
    if not team.available():
        pytest.fail("no OpenMP team: see test_the_team_is_found_where_torch_runs_on_gnu_openmp")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    monkeypatch.setattr(ck, "run_rows", _refuse)  # the team runs, not the pool
    yield
    torch.set_num_threads(threads)


def _refuse(*args):
    raise AssertionError("ran on stablemath's pool, not on torch's team")


def _bits(x, dtype):
    """float32 rows as bfloat16 (uint16) or float16 (int16) bits."""
    bits = torch.from_numpy(x).to(getattr(torch, dtype)).view(torch.int16).numpy()
    return bits.view(np.uint16) if dtype == "bfloat16" else bits


@pytest.mark.parametrize(
    ("rows", "out"),
    [
        ("float32", "float32"),
        ("float32", "float64"),
        ("bfloat16", "bfloat16"),
        ("float16", "float16"),
    ],
)
@pytest.mark.parametrize(
    "kernel",
    ["softmax_rows", "log_softmax_rows", "logsumexp_rows"],
)
def test_the_team_gives_the_bits_of_one_call(kernel, rows, out, on_team):
    k = getattr(ck, kernel)
    x = _rows(SHAPE) if rows == "float32" else _bits(_rows(SHAPE), rows)
    reduce = kernel == "logsumexp_rows"
    dtype = {"float32": np.float32, "float64": np.float64, "bfloat16": np.uint16}.get(
        out, np.int16
    )
    if reduce and out in ("bfloat16", "float16"):
        dtype = np.float32  # one value a row: rounded by torch
    inv_t = 1.0 if reduce else 0.75
    whole = np.empty(SHAPE[0] if reduce else SHAPE, dtype)
    assert k(x, whole, 0, SHAPE[0], inv_t)
    split = np.full_like(whole, 0x7E00 if dtype in (np.uint16, np.int16) else np.nan)
    assert team.run_rows(k, x, split, inv_t)
    np.testing.assert_array_equal(split, whole)


@pytest.mark.parametrize("rows", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_team_gives_the_cross_entropy_of_one_call(with_grad, weighted, rows, on_team):
    x = _rows(SHAPE)
    x[x == -np.inf] = -50.0
    if rows != "float32":
        x = _bits(x, rows)
    rng = np.random.default_rng(3)
    t = rng.integers(0, SHAPE[1], SHAPE[0])
    t[::7] = -100
    w = rng.uniform(0.5, 2.0, SHAPE[1]) if weighted else np.empty(0)

    def run(call):
        loss = np.full(SHAPE[0], np.nan)
        grad = np.full(SHAPE if with_grad else (0, 0), np.nan, np.float32)
        assert call(loss, grad)
        return loss, grad

    args = (t, w, -100, 0.1, 0.8, 0.01, 0.0)
    whole = run(lambda lo, g: ck.cross_entropy_rows(x, lo, 0, SHAPE[0], *args, g, 0.5))
    split = run(lambda lo, g: team.run_rows(ck.cross_entropy_rows, x, lo, *args, g, 0.5))
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", [0, 300, 516])
def test_a_bad_row_is_reported_from_any_block(bad, where, on_team):
    for kernel in (ck.softmax_rows, ck.log_softmax_rows, ck.logsumexp_rows):
        x = _rows(SHAPE)
        if bad == -math.inf:
            x[where, :] = bad
        else:
            x[where, 699] = bad
        out = np.empty(SHAPE[0] if kernel is ck.logsumexp_rows else SHAPE, np.float32)
        assert not team.run_rows(kernel, x, out, 1.0)


def test_one_torch_thread_runs_on_the_calling_thread(monkeypatch):
    """torch.set_num_threads(1) is obeyed: no team, no pool."""
    calls = []

    def gomp(*args):
        calls.append(args)

    monkeypatch.setattr(team, "_GOMP", gomp)
    monkeypatch.setattr(ck, "run_rows", _refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = _rows(SHAPE)
        out = np.empty(SHAPE, np.float32)
        assert team.run_rows(ck.softmax_rows, x, out, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert calls == []
    whole = np.empty_like(out)
    ck.softmax_rows(x, whole, 0, SHAPE[0], 1.0)
    np.testing.assert_array_equal(out, whole)


_FORK_SCRIPT = """
import os, signal, sys
import numpy as np
import torch
import stablemath as sm
from stablemath import _cpu_team as team
torch.set_num_threads(2)
x = torch.randn(517, 700)
assert team.available()
parent = sm.softmax(x)  # the team's threads now exist in the parent
pid = os.fork()
if pid == 0:
    signal.alarm(100)  # a hung child ends on its own
    # no torch op here: torch's own parallel ops hang in such a child
    ok = not team.available() and np.array_equal(sm.softmax(x).numpy(), parent.numpy())
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX")
def test_a_forked_child_does_not_use_the_parents_team():
    """In a child made by fork the team's threads do not exist: GOMP_parallel would
    wait for them for ever (torch's own parallel ops do hang there). The child runs the
    kernels on a pool of its own."""
    if not team.available():
        pytest.fail("no OpenMP team: see test_the_team_is_found_where_torch_runs_on_gnu_openmp")
    try:
        env = {k: v for k, v in os.environ.items() if k != "STABLEMATH_DISABLE_FASTPATHS"}
        cmd = [sys.executable, "-c", _FORK_SCRIPT]
        done = subprocess.run(cmd, timeout=120, check=False, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("softmax in the forked child did not finish in 120 s")
    assert done.returncode == 0
