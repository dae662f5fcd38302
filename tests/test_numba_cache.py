"""Numba's disk cache serves the compiled functions that the kernel modules make inside
other functions (stablemath/_numba_cache.py): a second process finds every one of them
in the cache, and writes nothing to it; their keys are the same in every process and
differ from variant to variant."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import backends_named

from stablemath import _cpu_kernels as ck
from stablemath import _cpu_team as team
from stablemath import _numba_cache as keyed
from stablemath import _xla_ffi as ffi

# the calls of a user's process: NumPy, torch on its team and at the address of a small
# tensor, JAX through the FFI handlers (where their backends are selected)
_USER = """
import sys
import numpy as np
import stablemath as sm
libs = sys.argv[1].split(",")
rng = np.random.default_rng(0)
x = rng.standard_normal((300, 1000)).astype(np.float32)
t = rng.integers(0, 1000, 300)
for rows, n in ((300, 1000), (1, 10)):
    a, b = x[:rows, :n], t[:rows] % n
    if "numpy" in libs:
        sm.softmax(a); sm.cross_entropy(a, b)
    if "torch" in libs:
        import torch
        sm.softmax(torch.from_numpy(a)); sm.cross_entropy(torch.from_numpy(a), torch.from_numpy(b))
    if "jax" in libs:
        import jax.numpy as jnp
        sm.softmax(jnp.asarray(a)).block_until_ready()
        sm.cross_entropy(jnp.asarray(a), jnp.asarray(b)).block_until_ready()
print("ok")
"""


def _run(code, *args, env=None):
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_a_second_process_compiles_nothing(tmp_path):
    """The first process compiles and fills an empty cache; the second loads all it
    needs from it (before: every closure that held another compiled function was
    compiled again in every process, and added to the cache again)."""
    libs = [lib for lib in ("numpy", "torch", "jax") if backends_named(lib)]
    if not libs:
        pytest.skip("none of numpy, torch, jax selected")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("STABLEMATH_DISABLE_FASTPATHS", None)  # the compiled kernels, in any session
    assert "ok" in _run(_USER, ",".join(libs), env=env)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert any(name.endswith(".nbc") for name in files)
    out = _run(_USER, ",".join(libs), env={**env, "NUMBA_DEBUG_CACHE": "1"})
    saved = [line for line in out.splitlines() if "saved" in line]
    assert not saved, "\n".join(saved[:20])
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == files


def _variants():
    """Every function the kernel modules make inside others, by how it was made."""
    made = {}
    for (kernel, element), fn in team._BODIES.items():
        made["team", kernel.py_func.__name__, element.__name__] = fn
    for element in (np.float32, np.uint16, np.int16):
        made["at_address", element.__name__] = team._cross_entropy_at_address(element)
        for kernel in (ck.softmax_rows, ck.log_softmax_rows, ck.logsumexp_rows):
            made["at_address", kernel.py_func.__name__, element.__name__] = team._at_address(
                kernel, element
            )
    for func, (kernel, kind) in ffi._KERNELS.items():
        for element in ffi._ELEMENTS.values():
            made["ffi rows", func, element.__name__] = ffi._rows_runner(kernel, element, kind)
            rows_symbol = ffi._symbols(kernel, element, kind)[0]
            made["ffi work", func, element.__name__] = ffi._work(rows_symbol)
    made["ce kernel", "capped"] = ck._capped_rows
    made["ce kernel", "uncapped"] = ck.uncapped_cross_entropy_rows
    return made


_IDENTITIES = """
import sys
sys.path.insert(0, sys.argv[1])
from test_numba_cache import _variants
from stablemath._numba_cache import identity
for key, fn in sorted(_variants().items()):
    print(repr(key), identity(fn))
"""


def test_keys_are_the_same_in_every_process_and_differ_between_variants():
    made = _variants()
    ours = {key: keyed.identity(fn) for key, fn in made.items()}
    assert None not in ours.values()
    groups: dict = {}
    for key, value in ours.items():
        groups.setdefault(value, []).append(key)
    shared = sorted(sorted(keys) for keys in groups.values() if len(keys) > 1)
    # none is shared: the FFI row runners, in particular, are C functions of addresses,
    # whose signature does not hold the element type that their key must
    assert shared == []
    theirs = _run(_IDENTITIES, os.path.dirname(__file__)).splitlines()
    assert theirs == [f"{key!r} {ours[key]}" for key in sorted(ours)]


def test_a_value_without_a_stable_description_keeps_numbas_own_key():
    held = np.ones(1)  # an array: no description, so Numba's key (its pickle) decides

    def f(x):
        return x + held[0]

    assert keyed.identity(f) is None
    assert type(keyed._cache_for(f)) is keyed.FunctionCache
    assert keyed.njit()(f)(1.0) == 2.0
