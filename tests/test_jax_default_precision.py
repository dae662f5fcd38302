"""JAX in its default configuration, ``jax_enable_x64`` off: no float64 at all, so
float32 input runs the compensated float32 kernels (error-free shift, pairwise
compensated sum, quotient of pairs) instead of the float64 arithmetic that every other
JAX test sees (conftest turns x64 on for the suite). Every JAX user who has not turned
x64 on gets these results.

XLA on the CPU flushes float32 subnormals to zero, in the intermediate values too;
SPEC §3.5 lets results below the smallest normal float32 be 0, and these tests
hold every result above it to the 2 ulp of SPEC §3.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import _reference as ref
import numpy as np
import pytest
from conftest import backends_named

import stablemath as sm

pytestmark = pytest.mark.skipif(not backends_named("jax"), reason="jax backend not selected")

DATA = json.loads((Path(__file__).parent / "data" / "reference.json").read_text())
TINY = float(np.finfo(np.float32).tiny)


def _x32(fn, *args, jit=False):
    """``fn(*args)`` with x64 off, the inputs made float32 JAX arrays inside."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(False):
        arrays = [jnp.asarray(a) for a in args]
        out = (jax.jit(fn) if jit else fn)(*arrays)
        return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=np.float64), out), out


def _ulps(got, want):
    want = np.asarray(want, dtype=np.float64)
    spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    err = np.abs(got - want) / spacing
    return np.where((got == want) | (np.abs(want) < TINY), 0.0, err)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("func", ["softmax", "log_softmax", "logsumexp", "cross_entropy"])
def test_reference_vectors_with_x64_off(func, jit):
    """SPEC §3.5 in JAX's default configuration. Probabilities between 1e-38 and 1e-34
    (a float32 row of scale 30) were off by up to 58 ulp under jit and 2044 ulp
    eagerly: the corrections of the quotient are 2**-24 of it, below float32's normal
    range there, and XLA flushed them to zero."""
    worst, where = 0.0, None
    for row in DATA["float32"]:
        x = np.array(row["x"], dtype=np.float32)
        if func == "cross_entropy":
            t = np.array([row["target"]], dtype=np.int32)
            got, out = _x32(
                lambda x, t: sm.cross_entropy(x, t, reduction="none"), x[None], t, jit=jit
            )
        else:
            got, out = _x32(getattr(sm, func), x, jit=jit)
        assert out.dtype == np.float32
        err = float(np.max(_ulps(got, row[func])))
        if err > worst:
            worst, where = err, row["name"]
    assert worst <= 2.0, f"{func}: {worst:.2f} ulp on {where!r}"


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_tiny_probabilities_keep_their_ulps(jit):
    """Probabilities of 1e-31 down to just above the float32 normal range, whose
    corrections are subnormal, in a row whose shift ``x - max`` is inexact and whose
    total is not a power of two (so that every correction matters): within 2 ulp of
    mpmath. Without the scaled quotient: 42 ulp."""
    # fmt: off
    x = np.array([
        10.3, 9.93, 9.2, -52.0125, -56.0939, -71.3344, -65.4184, -52.2415,
        -61.3944, -62.6344, -54.013, -69.5336, -52.7691, -60.2632, -63.652, -61.327,
    ], dtype=np.float32)
    # fmt: on
    got, _ = _x32(sm.softmax, x, jit=jit)
    want = ref.softmax(x)
    assert np.all(want[want > 0] > TINY)
    assert float(np.max(_ulps(got, want))) <= 2.0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(ref.EDGE_ROWS))
def test_edge_rows_with_x64_off(case, jit):
    """SPEC §3.3 on the compensated float32 path: the three functions, and the
    gradient of softmax (the analytic one, finite, NaN only in a NaN row)."""
    import jax
    import jax.numpy as jnp

    row, lse, p, lp = ref.EDGE_ROWS[case]
    x = np.array([row, [0.0] * len(row)], dtype=np.float32)
    for func, want in (("logsumexp", lse), ("softmax", p), ("log_softmax", lp)):
        got, _ = _x32(getattr(sm, func), x, jit=jit)
        np.testing.assert_allclose(got[0], want, rtol=1e-7, atol=0, err_msg=func)
    got, _ = _x32(sm.softmax, x, jit=jit)
    np.testing.assert_allclose(got[1], np.full(len(row), 1 / len(row)), rtol=1e-7)
    v = np.linspace(-1.0, 1.0, x.size, dtype=np.float32).reshape(x.shape)

    def vjp(x, v):
        return jax.vjp(sm.softmax, x)[1](v)[0]

    grad, out = _x32(vjp, x, v, jit=jit)
    assert out.dtype == jnp.float32
    if np.isnan(row).any():
        assert np.all(np.isnan(grad[0]))
    else:
        pa = np.array(p)
        want = pa * (v[0] - np.sum(v[0] * pa))
        np.testing.assert_allclose(grad[0], want, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(grad[1]))
