"""SPEC §3 for logsumexp, softmax and log_softmax, on every backend."""

from __future__ import annotations

import math
from fractions import Fraction

import _reference as ref
import numpy as np
import pytest

import stablemath as sm

INF = math.inf
NAN = math.nan


def _np(backend, x):
    return backend.to_numpy(x)


# --- §3.3 edge rows, forward ----------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", list(ref.EDGE_ROWS))
def test_edge_rows(backend, case, dtype):
    row, lse, p, lp = ref.EDGE_ROWS[case]
    x = backend.asarray(np.array([row, [0.0] * len(row)]), dtype=dtype)
    rtol = 1e-15 if dtype == "float64" else 1e-7
    np.testing.assert_allclose(_np(backend, sm.logsumexp(x))[0], lse, rtol=rtol)
    np.testing.assert_allclose(_np(backend, sm.softmax(x))[0], p, rtol=rtol, atol=0)
    np.testing.assert_allclose(_np(backend, sm.log_softmax(x))[0], lp, rtol=rtol, atol=0)
    # the other row is untouched by its neighbour's edge
    np.testing.assert_allclose(_np(backend, sm.softmax(x))[1], np.full(len(row), 1 / len(row)))


def test_finite_row_properties(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)) * 30
    p = _np(backend, sm.softmax(backend.asarray(x)))
    lp = _np(backend, sm.log_softmax(backend.asarray(x)))
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(lp))
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-14)
    assert np.all(lp <= 0)


def test_masked_entries_equal_neg_inf(backend):
    x = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = np.array([[True, False, True, False], [False, False, False, False]])
    filled = np.where(mask, x, -INF)
    xb, mb = backend.asarray(x), backend.asarray(mask)
    for f in (sm.logsumexp, sm.softmax, sm.log_softmax):
        got = _np(backend, f(xb, where=mb))
        want = _np(backend, f(backend.asarray(filled)))
        np.testing.assert_array_equal(got, want)
    # fully masked row: logsumexp -inf, softmax 0, log_softmax -inf
    assert _np(backend, sm.logsumexp(xb, where=mb))[1] == -INF
    np.testing.assert_array_equal(_np(backend, sm.softmax(xb, where=mb))[1], 0.0)
    np.testing.assert_array_equal(_np(backend, sm.log_softmax(xb, where=mb))[1], -INF)


def test_masked_nan_is_ignored(backend):
    x = backend.asarray(np.array([[0.0, NAN, 0.0]]))
    mask = backend.asarray(np.array([[True, False, True]]))
    np.testing.assert_array_equal(_np(backend, sm.softmax(x, where=mask)), [[0.5, 0.0, 0.5]])


@pytest.mark.parametrize("dtype", ["float64", "float32"])  # float32: the fast paths
def test_empty_axis(backend, dtype):
    x = backend.asarray(np.zeros((3, 0), dtype))
    np.testing.assert_array_equal(_np(backend, sm.logsumexp(x)), [-INF] * 3)
    assert _np(backend, sm.softmax(x)).shape == (3, 0)
    assert _np(backend, sm.log_softmax(x)).shape == (3, 0)
    assert _np(backend, sm.logsumexp(x, axis=None)) == -INF
    y = backend.asarray(np.zeros((2, 3, 0), dtype))  # more axes: no rows to form
    np.testing.assert_array_equal(_np(backend, sm.logsumexp(y)), np.full((2, 3), -INF))
    assert _np(backend, sm.softmax(y)).shape == (2, 3, 0)
    assert _np(backend, sm.log_softmax(y, temperature=2.0)).shape == (2, 3, 0)


# --- §3.2 overflow / underflow ----------------------------------------------------

SEEDS = [
    [1000.0, 2000.0, 3000.0],
    [1000.0, 1.0, -1000.0],
    [55.8906, -114.5621, 6.3440, -30.2473, -44.1440],
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seed_cases(backend, seed, dtype):
    x = np.array(SEEDS[seed], dtype=dtype)
    xb = backend.asarray(x)
    rtol = 1e-6 if dtype == "float32" else 1e-14
    # subnormal results carry few digits: within one subnormal step, or flushed to 0
    atol = np.finfo(dtype).smallest_subnormal
    if dtype == "float32" and backend.flushes_float32_subnormals:
        atol = np.finfo(dtype).tiny
    np.testing.assert_allclose(_np(backend, sm.logsumexp(xb)), ref.logsumexp(x), rtol=rtol)
    np.testing.assert_allclose(_np(backend, sm.softmax(xb)), ref.softmax(x), rtol=rtol, atol=atol)
    np.testing.assert_allclose(
        _np(backend, sm.log_softmax(xb)), ref.log_softmax(x), rtol=rtol, atol=0
    )


def test_float32_extremes(backend):
    x = np.array([1e38, -1e38, 3e37, 0.0], dtype=np.float32)
    xb = backend.asarray(x)
    np.testing.assert_allclose(_np(backend, sm.logsumexp(xb)), 1e38, rtol=1e-6)
    np.testing.assert_array_equal(_np(backend, sm.softmax(xb)), [1.0, 0.0, 0.0, 0.0])
    lp = _np(backend, sm.log_softmax(xb))
    np.testing.assert_allclose(lp, [0.0, -2e38, -7e37, -1e38], rtol=1e-6)


def test_float32_beyond_range_overflows_to_inf_silently(backend):
    """max - min = 6e38 is beyond float32: the true log-probability -6e38 is rounded to
    -inf (SPEC §3.2), with no NaN and no "overflow in cast" warning (warnings are
    errors in this suite)."""
    x = backend.asarray(np.array([3e38, -3e38, 3e38], dtype=np.float32))
    np.testing.assert_array_equal(_np(backend, sm.softmax(x)), [0.5, 0.0, 0.5])
    lp = _np(backend, sm.log_softmax(x))
    np.testing.assert_allclose(lp, [-math.log(2), -INF, -math.log(2)], rtol=1e-7)
    np.testing.assert_allclose(_np(backend, sm.logsumexp(x)), 3e38, rtol=1e-7)
    t = backend.asarray(np.array([1]))
    ce = sm.cross_entropy(backend.asarray(np.array([[3e38, -3e38]], dtype=np.float32)), t)
    assert _np(backend, ce) == INF


# --- §3.4 half precision ----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_long_row(backend, dtype):
    if not backend.has(dtype) or (backend.name == "numpy" and dtype == "bfloat16"):
        pytest.skip(f"{backend.name} has no {dtype}")
    x = backend.asarray(np.zeros(70_000, dtype=np.float32), dtype=dtype)
    p = sm.softmax(x)
    assert p.dtype == x.dtype
    tol = 2.0**-8 if dtype == "float16" else 2.0**-7
    np.testing.assert_allclose(_np(backend, p), 1 / 70_000, rtol=tol)
    lse = sm.logsumexp(x)
    assert lse.dtype == x.dtype
    np.testing.assert_allclose(_np(backend, lse), math.log(70_000), rtol=tol)
    assert sm.log_softmax(x).dtype == x.dtype


def test_dtype_argument(backend):
    x = backend.asarray(np.array([1.0, 2.0, 3.0], dtype=np.float32))
    p = sm.softmax(x, dtype=backend.dtype("float64"))
    assert p.dtype == backend.dtype("float64")
    np.testing.assert_allclose(_np(backend, p), ref.softmax(np.array([1.0, 2.0, 3.0])), rtol=1e-15)


def test_integer_input_promotes(backend):
    x = backend.asarray(np.array([1, 2, 3]))
    p = sm.softmax(x)
    np.testing.assert_allclose(_np(backend, p), ref.softmax(np.array([1.0, 2.0, 3.0])), rtol=1e-6)


# --- §3.5 accuracy -------------------------------------------------------------------


def _reference_rows():
    rng = np.random.default_rng(1234)
    rows = [rng.standard_normal((4, n)) * s for n, s in [(3, 1), (17, 1), (64, 10), (33, 30)]]
    dominant = np.array([[0.0, -40.0, -41.0], [10.0, -30.0, -35.0], [0.0, -20.0, -60.0]])
    return [*rows, dominant]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ulp_accuracy(backend, dtype):
    worst = {"logsumexp": 0.0, "softmax": 0.0, "log_softmax": 0.0}
    for rows in _reference_rows():
        x = rows.astype(dtype)
        if dtype is np.float32 and backend.flushes_float32_subnormals:
            # keep the rows whose probabilities stay normal floats (SPEC §3.5)
            x = x[np.all(ref.softmax(x) >= np.finfo(np.float32).tiny, axis=-1)]
            if x.size == 0:
                continue
        xb = backend.asarray(x)
        worst["logsumexp"] = max(
            worst["logsumexp"],
            ref.ulp_error(_np(backend, sm.logsumexp(xb)), ref.logsumexp(x), dtype),
        )
        worst["softmax"] = max(
            worst["softmax"], ref.ulp_error(_np(backend, sm.softmax(xb)), ref.softmax(x), dtype)
        )
        worst["log_softmax"] = max(
            worst["log_softmax"],
            ref.ulp_error(_np(backend, sm.log_softmax(xb)), ref.log_softmax(x), dtype),
        )
    assert all(v <= 2.0 for v in worst.values()), worst


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 4097])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_error_free_sum(backend, n, dtype):
    """The softmax denominator's pair ``hi + lo`` (kernels._accurate_sum) is the
    exact sum to a hundredth of an ulp; a plain sum of 1000 terms misses by ulps."""
    from array_api_compat import array_namespace

    from stablemath import _kernels

    rng = np.random.default_rng(n)
    v = rng.random((3, n)).astype(dtype) * np.array([[1.0], [1e-3], [3.0]], dtype=dtype)
    xv = backend.asarray(v)
    hi, lo = _kernels._accurate_sum(xv, (1,), xp=array_namespace(xv))
    hi, lo = _np(backend, hi)[:, 0].astype(np.float64), _np(backend, lo)[:, 0].astype(np.float64)
    for row, h, low in zip(v.astype(np.float64), hi, lo, strict=True):
        exact = sum(map(Fraction, row))
        ulp = Fraction(float(np.spacing(np.asarray(float(exact), dtype=dtype))))
        err = abs(Fraction(h) + Fraction(low) - exact) / ulp
        assert err <= Fraction(1, 100), float(err)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_quotient_of_pairs_is_rounded_once(backend, dtype):
    """The softmax quotient ``(e + e_lo) / (hi + lo)`` (kernels._divide_pairs) is
    within a rounding of the exact one: <= 0.5 ulp plus a hair, where ``e / hi``
    corrected without the exact product reaches an ulp."""
    from array_api_compat import array_namespace

    from stablemath import _kernels

    rng = np.random.default_rng(7)
    eps = float(np.finfo(dtype).eps)
    a = rng.random((64, 50)).astype(dtype)
    a_lo = (a * (rng.random((64, 50)) - 0.5) * eps).astype(dtype)
    b = (1.0 + 999.0 * rng.random((64, 1))).astype(dtype)
    b_lo = (b * (rng.random((64, 1)) - 0.5) * eps).astype(dtype)
    xa, xa_lo, xb, xb_lo = (backend.asarray(v) for v in (a, a_lo, b, b_lo))
    q = _np(backend, _kernels._divide_pairs(xa, xa_lo, xb, xb_lo, xp=array_namespace(xa)))
    worst = Fraction(0)
    for i, j in np.ndindex(a.shape):
        exact = (Fraction(float(a[i, j])) + Fraction(float(a_lo[i, j]))) / (
            Fraction(float(b[i, 0])) + Fraction(float(b_lo[i, 0]))
        )
        ulp = Fraction(float(np.spacing(np.asarray(float(exact), dtype=dtype))))
        worst = max(worst, abs(Fraction(float(q[i, j])) - exact) / ulp)
    assert worst <= Fraction(51, 100), float(worst)


def test_dominant_term_full_precision(backend):
    x = backend.asarray(np.array([0.0, -40.0]))
    got = float(_np(backend, sm.logsumexp(x)))
    want = math.log1p(math.exp(-40.0))
    assert got == pytest.approx(want, rel=4e-16, abs=0)
    assert got > 0


def test_log_sum_without_an_exact_zero(backend):
    """The shift puts the maximal entries at exactly 0, unless a compiler computes the
    logits one way for the maximum and another for the shift: XLA on the CPU, under
    jit, rounded ``x / 0.75`` for the row maximum through the reciprocal and for the
    shift by a division, so the maximal entry was shifted to -9.5e-7 and no entry
    counted as maximal. The sum then must not add a maximal term of its own: it gave
    ``log_softmax`` ``-log 2`` where the answer was -1e-22."""
    from stablemath import _kernels
    from stablemath._lib._compat import array_namespace

    z = np.array([[-(2.0**-20), -50.0, -3.0], [0.0, -1.0, -1.0]])
    xp, (zb,) = array_namespace(backend.asarray(z))
    _, total, log_total = _kernels._log_sum(zb, (1,), xp=xp)
    want = np.log(np.exp(z).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(_np(backend, log_total), want, rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(_np(backend, total), np.exp(want), rtol=1e-15)


# --- options ----------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1, (0, 2), None])
def test_axes_against_scipy(backend, axis):
    special = pytest.importorskip("scipy.special")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 5)) * 5
    xb = backend.asarray(x)
    # SPEC §5: relative 1e-12, or absolute 1e-15 near zero (scipy's log_softmax loses
    # relative precision at the maximum, where it is close to 0)
    tol = {"rtol": 1e-12, "atol": 1e-15}
    np.testing.assert_allclose(
        _np(backend, sm.logsumexp(xb, axis=axis)), special.logsumexp(x, axis=axis), **tol
    )
    np.testing.assert_allclose(
        _np(backend, sm.softmax(xb, axis=axis)), special.softmax(x, axis=axis), **tol
    )
    np.testing.assert_allclose(
        _np(backend, sm.log_softmax(xb, axis=axis)), special.log_softmax(x, axis=axis), **tol
    )
    kd = _np(backend, sm.logsumexp(xb, axis=axis, keepdims=True))
    np.testing.assert_allclose(kd, special.logsumexp(x, axis=axis, keepdims=True), rtol=1e-13)


def test_temperature(backend):
    x = np.array([[55.8906, -114.5621, 6.3440, -30.2473, -44.1440]])
    xb = backend.asarray(x)
    np.testing.assert_allclose(
        _np(backend, sm.softmax(xb, temperature=10.0)), ref.softmax(x / 10.0), rtol=1e-14
    )
    np.testing.assert_allclose(
        _np(backend, sm.log_softmax(xb, temperature=10.0)), ref.log_softmax(x / 10.0), rtol=1e-14
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_temperature_at_the_edges(backend, dtype):
    """The temperature divides the shifted logits: every SPEC §3 edge keeps its value,
    and a spread beyond the dtype's range gives exact 0 and 1, with no NaN from the
    remainder of the division and no overflow warning (warnings are errors here)."""
    big = float(np.finfo(dtype).max) / 4
    x = np.array(
        [
            [big, -big, 0.0, 1.0],
            [1.0, INF, -INF, INF],
            [-INF, -INF, -INF, -INF],
            [1.0, NAN, 0.0, 2.0],
            [-INF, 3.0, -INF, -INF],
        ]
    )
    xb = backend.asarray(x, dtype=dtype)
    p = _np(backend, sm.softmax(xb, temperature=0.3))
    lp = _np(backend, sm.log_softmax(xb, temperature=0.3))
    want_p = np.array(
        [[1, 0, 0, 0], [0, 0.5, 0, 0.5], [0, 0, 0, 0], [NAN] * 4, [0, 1, 0, 0]], dtype=float
    )
    np.testing.assert_array_equal(p, want_p)
    np.testing.assert_array_equal(np.exp(lp), want_p)
    np.testing.assert_array_equal(lp[1, [1, 3]], -np.log(2.0).astype(dtype))


@pytest.mark.parametrize(
    "b",
    [
        [1.0, 2.0, 0.5],
        [1.0, -1.0, 0.5],
        [0.0, 1.0, 1.0],
        [-1.0, -1.0, -1.0],
        [1.0, 0.0, -1.0],
    ],
)
def test_logsumexp_b_against_scipy(backend, b):
    special = pytest.importorskip("scipy.special")
    x = np.array([[3.0, 1.0, 3.0], [0.5, -2.0, 7.0]])
    bb = np.array(b)
    got, sign = sm.logsumexp(backend.asarray(x), b=backend.asarray(bb), return_sign=True)
    want, wsign = special.logsumexp(x, b=bb, axis=-1, return_sign=True)
    np.testing.assert_allclose(_np(backend, got), want, rtol=1e-14)
    np.testing.assert_array_equal(_np(backend, sign), wsign)
    plain = _np(backend, sm.logsumexp(backend.asarray(x), b=backend.asarray(bb)))
    np.testing.assert_array_equal(np.isnan(plain), wsign < 0)
    np.testing.assert_allclose(plain[wsign > 0], want[wsign > 0], rtol=1e-14)


def test_logsumexp_b_zero_excludes_entry(backend):
    x = backend.asarray(np.array([1e308, 0.0, NAN]))
    b = backend.asarray(np.array([0.0, 1.0, 0.0]))
    assert float(_np(backend, sm.logsumexp(x, b=b))) == 0.0


def test_logsumexp_sign_of_all_neg_inf(backend):
    x = backend.asarray(np.array([-INF, -INF]))
    res, sign = sm.logsumexp(x, return_sign=True)
    assert float(_np(backend, res)) == -INF
    assert float(_np(backend, sign)) == 0.0


def test_logsumexp_complex(backend):
    special = pytest.importorskip("scipy.special")
    x = np.array([[1 + 2j, 3 - 1j, -1 + 3j], [0.5 + 3.1j, 0.2 + 3.1j, 0 + 0j]])
    got = _np(backend, sm.logsumexp(backend.asarray(x)))
    want = special.logsumexp(x, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-14)
    assert np.all(np.abs(got.imag) <= math.pi)
    mag, phase = sm.logsumexp(backend.asarray(x), return_sign=True)
    wmag, wphase = special.logsumexp(x, axis=-1, return_sign=True)
    np.testing.assert_allclose(_np(backend, mag), wmag, rtol=1e-14)
    np.testing.assert_allclose(_np(backend, phase), wphase, rtol=1e-14)


def test_zero_d_results_are_arrays(backend):
    x = backend.asarray(np.array([1.0, 2.0]))
    r = sm.logsumexp(x)
    assert backend.is_native(r)
    assert r.ndim == 0
    assert backend.is_native(sm.softmax(x))
