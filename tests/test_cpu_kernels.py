"""The compiled row kernels of stablemath/_cpu_kernels.py on their own: the float64
``exp`` they evaluate, the row split over threads, and the rows they hand back. (Their
softmax, log_softmax and logsumexp values are held to the SPEC by the whole suite
through the NumPy and torch-CPU fast paths.)"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from stablemath import _cpu_kernels as ck

KERNELS = {
    "softmax": (ck.softmax_rows, False),
    "log_softmax": (ck.log_softmax_rows, False),
    "logsumexp": (ck.logsumexp_rows, True),
}


def _exp_all(d: np.ndarray) -> np.ndarray:
    import numba

    @numba.njit
    def run(d, out):
        for i in range(d.shape[0]):
            out[i] = ck._exp_nonpos(d[i])

    out = np.empty_like(d)
    run(d, out)
    return out


def test_exp_is_accurate_far_below_a_float32_ulp():
    """Relative error below 2e-10 (0.003 of a float32 ulp) over the whole range the
    kernels use, against the correctly rounded math.exp; exactly 1 at 0."""
    rng = np.random.default_rng(1)
    d = np.concatenate(
        [
            -np.linspace(0.0, 708.0, 200_001),
            -rng.exponential(5.0, 100_000),
            # both sides of the reduction's breakpoints (k + 1/2) ln2
            (-np.arange(1, 400) - 0.5)[:, None] * math.log(2) + np.array([-1e-9, 0.0, 1e-9]),
        ],
        axis=None,
    )
    d = np.minimum(d.ravel(), 0.0)
    got = _exp_all(d)
    ref = np.array([math.exp(v) for v in d])
    assert np.max(np.abs(got - ref) / ref) < 2e-10
    assert _exp_all(np.array([0.0]))[0] == 1.0


def test_exp_of_minus_inf_and_far_below_is_negligible():
    got = _exp_all(np.array([-math.inf, -1e300, -709.0, -5000.0]))
    assert np.all(got >= 0.0) and np.all(got < 1e-307)


def _rows(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.choice([0.1, 3.0, 80.0], (shape[0], 1))).astype(
        np.float32
    )
    x[::5, ::3] = -np.inf
    return x


@pytest.fixture(autouse=True)
def _small_pool_blocks(monkeypatch):
    """The pool takes the 203x700 arrays below, in blocks of 5 rows (it takes none of
    fewer than 2**18 elements, in blocks of 2**17, outside the tests)."""
    monkeypatch.setattr(ck, "_POOL_FROM", 1 << 14)
    monkeypatch.setattr(ck, "_POOL_BLOCK", 1 << 12)


@pytest.mark.parametrize("func", list(KERNELS))
def test_rows_split_over_threads_give_the_same_bits(func, monkeypatch):
    """run_rows on an array big enough to be split equals one call over all rows."""
    kernel, reduce = KERNELS[func]
    x = _rows((203, 700))  # 142100 elements: more than one part
    assert x.size >= ck._POOL_FROM and x.size // ck._POOL_BLOCK > 1
    whole = np.empty(x.shape[0] if reduce else x.shape, np.float32)
    assert kernel(x, whole, 0, x.shape[0], 1.0)
    monkeypatch.setattr(ck, "_threads", lambda: 3)  # an uneven split, whatever the machine
    split = np.full_like(whole, np.nan)
    assert ck.run_rows(kernel, x, split, 1.0)
    np.testing.assert_array_equal(split, whole)


@pytest.mark.parametrize("func", list(KERNELS))
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, -math.nan], ids=str)
@pytest.mark.parametrize("where", [0, 101, 202])
@pytest.mark.parametrize("col", [0, 7, 699])
def test_a_row_for_the_generic_kernel_is_reported_from_any_part(
    func, bad, where, col, monkeypatch
):
    """A row with a NaN, or whose maximum is +-inf, makes the run return False, in
    whichever thread's part it lies; a NaN anywhere in the row (first, inside, or in
    the tail after the SIMD loop), of either sign: the row maximum passes over a NaN
    whose sign bit is set, which the sum then catches."""
    kernel, reduce = KERNELS[func]
    monkeypatch.setattr(ck, "_threads", lambda: 3)
    x = _rows((203, 700))
    if bad == -math.inf:
        x[where, :] = bad
    else:
        x[where, col] = bad
        assert np.signbit(x[where, col]) == (math.copysign(1.0, bad) < 0)
    out = np.empty(x.shape[0] if reduce else x.shape, np.float32)
    assert not ck.run_rows(kernel, x, out, 1.0)


@pytest.mark.parametrize(
    "row",
    [
        [math.nan],
        [math.nan, math.nan],
        [math.nan, -math.inf],
        [-math.inf, math.nan, 1.0],
        [math.inf, math.nan],
    ],
)
def test_rows_of_nan_and_infinities_are_reported(row):
    x = np.array([row], np.float32)
    for kernel, reduce in KERNELS.values():
        out = np.empty(1 if reduce else x.shape, np.float32)
        assert not kernel(x, out, 0, 1, 1.0)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 63, 64, 65, 1000])
def test_the_maximum_is_found_wherever_it_lies(n):
    """The row maximum at every position of rows whose lengths straddle the SIMD
    widths: logsumexp and softmax against float64 NumPy."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, n)).astype(np.float32)
    # row i has its maximum at i, so far above the rest that a shift by any other
    # entry would overflow exp (the result does not depend on the shift otherwise)
    x[np.arange(n), np.arange(n)] = 1000.0 + np.arange(n, dtype=np.float32)
    lse = np.empty(n, np.float32)
    p = np.empty_like(x)
    assert ck.logsumexp_rows(x, lse, 0, n, 1.0)
    assert ck.softmax_rows(x, p, 0, n, 1.0)
    x64 = x.astype(np.float64)
    m = x64.max(axis=1, keepdims=True)
    ref = m[:, 0] + np.log(np.sum(np.exp(x64 - m), axis=1))
    np.testing.assert_allclose(lse, ref, rtol=1e-7)
    np.testing.assert_allclose(p, np.exp(x64 - ref[:, None]), rtol=3e-7, atol=1e-30)


def _row_maxima(rows: np.ndarray) -> np.ndarray:
    import numba

    @numba.njit
    def run(rows, out):
        for i in range(rows.shape[0]):
            out[i] = ck._row_max(rows[i])

    out = np.empty(rows.shape[0])
    run(rows, out)
    return out


# each element type with the float32 values of its bits
_ELEMENTS = {
    "float64": lambda v: (v.astype(np.float64), v.astype(np.float64)),
    "float32": lambda v: (v, v),
    # bfloat16 bits: the top halves of the float32 numbers, whose low halves are cleared
    "bfloat16": lambda v: (
        (v.view(np.uint32) >> 16).astype(np.uint16),
        (v.view(np.uint32) & 0xFFFF0000).view(np.float32),
    ),
    "float16": lambda v: (_half(v).view(np.int16), _half(v)),
}


def _half(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # to +-inf beyond float16's range
        return v.astype(np.float16)


@pytest.mark.parametrize("element", list(_ELEMENTS))
@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 1000])
def test_the_row_maximum_of_every_sign_and_element_type(element, n):
    """The row maximum (taken on the elements' bits, as integers) is the largest
    value for rows all negative, all positive and mixed, with zeros of both signs,
    infinities, subnormals and values of the largest magnitudes: NumPy's maximum of
    the same values. A row with a NaN gives NaN or the maximum of its other entries
    (by the NaN's sign), and NaN where the NaN's sign bit is clear."""
    if element == "float16" and not ck.FLOAT16_CONVERSIONS:
        pytest.fail("this CPU has no float16 conversions: the test needs one that has")
    rng = np.random.default_rng(n)
    base = np.ldexp(rng.uniform(1.0, 2.0, (12, n)), rng.integers(-140, 120, (12, n)))
    base = base.astype(np.float32)
    rows = np.stack(
        [
            -base[0],
            base[1],
            base[2] * rng.choice([-1.0, 1.0], n).astype(np.float32),
            np.where(rng.random(n) < 0.5, np.float32(-0.0), -base[3]),
            np.where(rng.random(n) < 0.5, np.float32(0.0), -base[4]),
            np.full(n, -0.0, np.float32),
            np.full(n, -np.inf, np.float32),
            np.where(rng.random(n) < 0.5, -np.inf, -base[5]).astype(np.float32),
            np.where(rng.random(n) < 0.3, np.inf, base[6] * -1).astype(np.float32),
            -base[7] * np.float32(2.0**-126),  # subnormal and zero
            base[8] * np.float32(2.0**-130) * rng.choice([-1.0, 1.0], n).astype(np.float32),
            -np.abs(base[9]).clip(6e4, None),  # beyond float16 for float16: -inf
        ]
    )
    # every row's maximum (and minimum) at each end as well
    rows[:, -1] = np.where(rng.random(12) < 0.5, rows[:, -1], rows[:, 0])
    bits, values = _ELEMENTS[element](rows)
    got = _row_maxima(bits)
    want = np.max(values.astype(np.float64), axis=1)
    np.testing.assert_array_equal(got, want)

    nan = np.array([np.nan, -np.nan], np.float32)
    rows_nan = np.repeat(rows[:4], 2, axis=0)
    rows_nan[np.arange(8), rng.integers(0, n, 8)] = np.tile(nan, 4)
    bits, values = _ELEMENTS[element](rows_nan)
    got = _row_maxima(bits)
    rest = np.nanmax(values.astype(np.float64), axis=1) if n > 1 else np.full(8, np.nan)
    assert np.all(np.isnan(got) | (got == rest))
    assert np.all(np.isnan(got[::2]))  # NaN with the sign bit clear


def test_temperature_and_float64_output():
    """inv_t scales the shifted row; a float64 output (for float16 inputs) carries the
    unrounded result."""
    x = _rows((4, 9))
    out = np.empty(x.shape, np.float64)
    assert ck.softmax_rows(x, out, 0, 4, 0.25)
    ref = np.exp(
        x.astype(np.float64) / 4 - np.max(x.astype(np.float64) / 4, axis=1, keepdims=True)
    )
    ref /= ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("with_grad", [False, True])
def test_cross_entropy_rows_split_over_threads(with_grad, monkeypatch):
    """The cross-entropy kernel, with and without its gradient, split over threads
    equals one call over all rows, and its losses torch's definition with a
    temperature and the z-loss (ignored rows: 0)."""
    x = _rows((203, 700))
    x[x == -np.inf] = -50.0  # -inf logits go to the generic kernel
    rng = np.random.default_rng(3)
    t = rng.integers(0, 700, 203)
    t[::7] = -100
    w = rng.uniform(0.5, 2.0, 700)

    def run(call):
        loss = np.full(203, np.nan)
        grad = np.full(x.shape if with_grad else (0, 0), np.nan, np.float32)
        assert call(loss, grad)
        return loss, grad

    whole = run(
        lambda lo, g: ck.cross_entropy_rows(x, lo, 0, 203, t, w, -100, 0.1, 0.8, 0.01, 0.0, g, 0.5)
    )
    monkeypatch.setattr(ck, "_threads", lambda: 3)
    split = run(
        lambda lo, g: ck.run_rows(
            ck.cross_entropy_rows, x, lo, t, w, -100, 0.1, 0.8, 0.01, 0.0, g, 0.5
        )
    )
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_array_equal(a, b)
    loss, grad = whole
    # torch's definition in float64 of logits x / T, T = 1 / 0.8: (1 - eps) w_t (lse -
    # x_t) + eps / C sum_c w_c (lse - x_c), plus the z-loss z lse**2, z = 0.01
    x64 = x.astype(np.float64) * 0.8
    m = x64.max(axis=1)
    lse = m + np.log(np.exp(x64 - m[:, None]).sum(axis=1))
    rows = np.arange(203)
    ts = np.where(t == -100, 0, t)
    want = 0.9 * w[ts] * (lse - x64[rows, ts]) + 0.1 / 700 * (w * (lse[:, None] - x64)).sum(axis=1)
    want += 0.01 * lse**2
    want[t == -100] = 0.0
    # the kernels' exp is within 2e-10 relative (0.003 of a float32 ulp), lse within 4e-10
    np.testing.assert_allclose(loss, want, rtol=1e-9, atol=0)
    if with_grad:
        assert np.all(grad[::7] == 0)
        # a row's gradient sums to scale / T ((a + 2 z lse) - eps sum(w) / C - (1 - eps)
        # w_t) = scale / T 2 z lse
        want_sum = np.where(t == -100, 0.0, 0.5 * 0.8 * 2 * 0.01 * lse)
        np.testing.assert_allclose(grad.astype(np.float64).sum(axis=1), want_sum, atol=1e-6)


@pytest.mark.parametrize("n", [2, 1000, 32000])
def test_a_dominant_term_keeps_its_precision_on_both_sides_of_the_switch(n):
    """Rows ``[0, -a, ..., -a]`` whose total ``log1p(r)``, ``r = (n - 1) exp(-a)``,
    runs from 1e-14 to 0.1: the kernels take ``log(sum)`` above ``_clear(n)`` and
    count the maximal entries below it (SPEC §3.5). logsumexp, log_softmax at the
    maximum and the cross-entropy of target 0, in float64 outputs, are within 1e-9
    relative of mpmath on both sides (a switch at a fixed sum such as ``1 + 2**-40``
    gives errors of 1e-5 near it)."""
    mpmath = pytest.importorskip("mpmath")
    r = np.geomspace(1e-14, 0.1, 57)
    a = (-np.log(r / (n - 1))).astype(np.float32)
    x = np.repeat(-a[:, None], n, axis=1)
    x[:, 0] = 0.0
    rows = x.shape[0]
    assert (r[0] < ck._clear(n) - 1 < r[-1]) and x.dtype == np.float32
    with mpmath.workdps(40):
        want = np.array(
            [float(mpmath.log1p((n - 1) * mpmath.exp(-mpmath.mpf(float(v))))) for v in a]
        )
    lse = np.empty(rows)
    assert ck.logsumexp_rows(x, lse, 0, rows, 1.0)
    log_p = np.empty((rows, n))
    assert ck.log_softmax_rows(x, log_p, 0, rows, 1.0)
    loss = np.empty(rows)
    target = np.zeros(rows, np.int64)
    grad = np.empty((rows, n), np.float32)
    no_weight = np.empty(0)
    args = (target, no_weight, -100, 0.0, 1.0, 0.0, 0.0)
    assert ck.cross_entropy_rows(x, loss, 0, rows, *args, grad, 1.0)
    for name, got in [("logsumexp", lse), ("log_softmax", -log_p[:, 0]), ("loss", loss)]:
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=0, err_msg=name)


def test_tanh_and_its_slope_against_mpmath():
    """The soft-cap's tanh and ``1 - tanh**2`` (the kernels' own, which vectorise) to a
    relative 1e-9 of 50-digit mpmath on both sides of the switch between the series
    and the exponential form, out to where the slope is ~1e-300; the limits at
    ``+-inf`` and NaN through."""
    import mpmath
    import numba

    @numba.njit
    def tanh_slope(u):
        th, sl = np.empty_like(u), np.empty_like(u)
        for j in range(u.shape[0]):
            th[j], sl[j] = ck._tanh_slope(u[j])
        return th, sl

    tiny = np.geomspace(1e-12, 0.6, 400)
    u = np.concatenate([tiny, -tiny, np.linspace(0.25, 0.35, 101), np.linspace(-300, 300, 601)])
    th, sl = tanh_slope(u)
    with mpmath.workdps(50):
        want_th = np.array([float(mpmath.tanh(mpmath.mpf(v))) for v in u])
        want_sl = np.array([float(mpmath.sech(mpmath.mpf(v)) ** 2) for v in u])
    nonzero = want_th != 0
    np.testing.assert_allclose(th[nonzero], want_th[nonzero], rtol=1e-9, atol=0)
    assert np.all(th[~nonzero] == 0)
    np.testing.assert_allclose(sl, want_sl, rtol=1e-9, atol=0)
    th, sl = tanh_slope(np.array([np.inf, -np.inf, np.nan]))
    assert th[0] == 1.0 and th[1] == -1.0 and np.isnan(th[2])
    assert 0 < sl[0] < 1e-300 and 0 < sl[1] < 1e-300 and np.isnan(sl[2])


def test_cross_entropy_gradient_factors_per_row_and_half_precision():
    """The gradient with one factor a row (the XLA FFI path's reduction factors)
    equals the gradient with that factor as the number, row by row; written as
    bfloat16 or float16 bits it is the float32 one rounded once (the float64 value
    rounded to float32 first could differ only at a float32 tie); and it is the
    analytic softmax - onehot against float64 NumPy."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((37, 300)) * 6).astype(np.float32)
    t = rng.integers(0, 300, 37)
    t[5] = -100
    no_weight = np.empty(0)
    factors = rng.uniform(0.1, 3.0, 37).astype(np.float32)
    loss = np.empty(37)
    per_row = np.empty(x.shape, np.float32)
    assert ck.cross_entropy_rows(
        x, loss, 0, 37, t, no_weight, -100, 0.2, 1.0, 0.0, 0.0, per_row, factors
    )
    one = np.empty((1, 300), np.float32)
    for i in range(37):
        f = float(factors[i])
        assert ck.cross_entropy_rows(
            x, loss, i, i + 1, t, no_weight, -100, 0.2, 1.0, 0.0, 0.0, one[:0], f
        )
        whole = np.empty(x.shape, np.float32)
        assert ck.cross_entropy_rows(
            x, loss, i, i + 1, t, no_weight, -100, 0.2, 1.0, 0.0, 0.0, whole, f
        )
        np.testing.assert_array_equal(per_row[i], whole[i])
    x64 = x.astype(np.float64)
    p = np.exp(x64 - x64.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want = p - 0.2 / 300
    want[np.arange(37), np.maximum(t, 0)] -= 0.8
    want *= factors[:, None]
    want[5] = 0.0
    np.testing.assert_allclose(per_row, want, rtol=3e-7, atol=1e-12)
    # bfloat16: the top half of the float32, rounded to nearest even
    as_bits = per_row.view(np.uint32).astype(np.uint64)
    bf16 = ((as_bits + 0x7FFF + ((as_bits >> 16) & 1)) >> 16).astype(np.uint16)
    g = np.empty(x.shape, np.uint16)
    assert ck.cross_entropy_rows(
        x, loss, 0, 37, t, no_weight, -100, 0.2, 1.0, 0.0, 0.0, g, factors
    )
    np.testing.assert_array_equal(g, bf16)
    if ck.FLOAT16_CONVERSIONS:
        g = np.empty(x.shape, np.int16)
        assert ck.cross_entropy_rows(
            x, loss, 0, 37, t, no_weight, -100, 0.2, 1.0, 0.0, 0.0, g, factors
        )
        np.testing.assert_array_equal(g.view(np.float16), per_row.astype(np.float16))


_FORK_SCRIPT = """
import os, signal, sys
import numpy as np
from stablemath import _cpu_kernels as ck
ck._THREADS = max(ck._THREADS, 2)
ck._POOL_FROM, ck._POOL_BLOCK = 1 << 14, 1 << 12
x = np.random.default_rng(0).standard_normal((203, 700)).astype(np.float32)
out = np.empty_like(x)
assert ck.run_rows(ck.softmax_rows, x, out, 1.0)  # the parent's pool now exists
pid = os.fork()
if pid == 0:
    signal.alarm(100)  # a hung child ends on its own
    child = np.empty_like(out)
    ok = ck.run_rows(ck.softmax_rows, x, child, 1.0) and np.array_equal(child, out)
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork: POSIX")
def test_a_forked_child_gets_a_pool_of_its_own():
    """After fork the parent's pool threads do not exist in the child; a split run
    there must not wait for them (it hung before the pool was reset at fork). Run in
    a fresh interpreter, away from the test process's JAX and torch threads."""
    try:
        done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the split run in the forked child did not finish in 120 s")
    assert done.returncode == 0


def _widened(bits):
    """The kernels' float32 of each half precision bit pattern (uint16: bfloat16,
    int16: float16)."""
    import numba

    @numba.njit
    def widen(bits, out):
        for i in range(bits.shape[0]):
            out[i] = ck._real(bits[i])

    out = np.empty(bits.size, np.float32)
    widen(bits, out)
    return out


def _rounded(values, bits_dtype):
    """The kernels' half precision bits of each float64 value (as they store them)."""
    import numba

    @numba.njit
    def narrow(values, out):
        for i in range(values.shape[0]):
            ck._put(out, i, values[i])

    out = np.empty(values.size, bits_dtype)
    narrow(values, out)
    return out


def test_bfloat16_conversions_are_torchs():
    """The kernels' bfloat16 widening (all 65536 bit patterns but NaN) and rounding
    (float32 values at and around every rounding tie, subnormals, the overflow edge,
    infinities, zeros) give torch's conversions bit for bit."""
    torch = pytest.importorskip("torch")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    wide = _widened(bits)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    keep = ~np.isnan(want)
    assert np.array_equal(wide[keep].view(np.uint32), want[keep].view(np.uint32))

    rng = np.random.default_rng(5)
    patterns = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 1 << 16, 20_000, dtype=np.uint64).astype(np.uint32) << 16) | 0x8000
    near = np.concatenate([ties - 1, ties, ties + 1])
    edges = np.array(
        [
            0x7F7F7FFF,
            0x7F7F8000,
            0x7F7FFFFF,
            0x7F800000,
            0x00000001,
            0x00008000,
            0x00018000,
            0x80000000,
            0xFF800000,
            0x3F808000,
            0x3F818000,
        ],
        dtype=np.uint32,
    )
    values = np.concatenate([patterns, near, edges]).view(np.float32)
    values = values[~np.isnan(values)]
    out = _rounded(values.astype(np.float64), np.uint16)  # the kernels put float64 values
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(out, want)


def test_float16_conversions_are_torchs():
    """Where the CPU converts float16 (F16C, AArch64; the CI machine does), the
    kernels' float16 widening (all 65536 bit patterns but NaN) and rounding (float32
    values at and around rounding ties, subnormals, the overflow edge) are torch's."""
    torch = pytest.importorskip("torch")
    if not ck.FLOAT16_CONVERSIONS:
        pytest.fail("this CPU has no float16 conversions: the test needs one that has")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    wide = _widened(bits)
    want = torch.from_numpy(bits).view(torch.float16).float().numpy()
    keep = ~np.isnan(want)
    assert np.array_equal(wide[keep].view(np.uint32), want[keep].view(np.uint32))

    rng = np.random.default_rng(6)
    exps = rng.integers(-30, 17, 100_000)
    values = np.ldexp(rng.uniform(1.0, 2.0, exps.size), exps)
    halves = np.arange(0x7C00, dtype=np.int32).astype(np.int16).view(np.float16)  # finite
    mids = (halves[:-1].astype(np.float64) + halves[1:]) / 2  # the ties, exact in float32
    values = np.concatenate([values, mids, np.nextafter(mids, 0), np.nextafter(mids, 1)])
    values = np.concatenate([values, -values, [65504.0, 65519.0, 65520.0, 1e6, 0.0, np.inf]])
    values = values.astype(np.float32)
    out = _rounded(values.astype(np.float64), np.int16)
    want = torch.from_numpy(values).to(torch.float16).view(torch.int16).numpy()
    assert np.array_equal(out, want)


def test_the_kernels_ask_for_the_widest_vectors():
    """Every kernel is compiled with ``"prefer-vector-width"="512"`` (without it, LLVM
    vectorises the float64 exp over 256 bits on CPUs with AVX-512, at half the
    speed); where the CPU has AVX-512 (NumPy's feature table says so), the loops of the
    compiled kernels use its 512-bit registers. Each kernel is compiled afresh here,
    with its own options but no disk cache, whose code Numba does not show."""
    import numba

    x = np.random.default_rng(0).standard_normal((8, 300)).astype(np.float32)
    t = np.arange(8) % 300
    args = {
        ck.softmax_rows: (x, np.empty_like(x), 0, 8, 1.0),
        ck.log_softmax_rows: (x, np.empty_like(x), 0, 8, 1.0),
        ck.logsumexp_rows: (x, np.empty(8, np.float32), 0, 8, 1.0),
        ck.cross_entropy_rows: (
            x,
            np.empty(8),
            0,
            8,
            t,
            np.empty(0),
            -100,
            0.0,
            1.0,
            0.0,
            30.0,
            np.empty_like(x),
            1.0,
        ),
    }
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    avx512 = __cpu_features__.get("AVX512F", False)
    for kernel, a in args.items():
        options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
        fresh = numba.njit(**options)(kernel.py_func)
        assert fresh(*a)
        sig = fresh.signatures[0]
        assert '"prefer-vector-width"="512"' in fresh.inspect_llvm(sig), kernel
        if avx512:
            assert "zmm" in fresh.inspect_asm(sig), kernel
