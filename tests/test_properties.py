"""Property-based tests (hypothesis) on every backend: inputs mix huge, tiny,
subnormal, +-inf and masked values; the properties hold without NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import stablemath as sm

SHAPE = (3, 5)
SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# float64 values from every regime; max - min stays below the float64 maximum (SPEC §3.2)
FINITE = st.one_of(
    st.floats(-1e3, 1e3),
    st.floats(-1e300, 1e300),
    st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 2.2e-308, 1e-200]),
)
ANY = st.one_of(FINITE, st.sampled_from([math.inf, -math.inf]))
LOGITS = hnp.arrays(np.float64, SHAPE, elements=ANY)
FINITE_LOGITS = hnp.arrays(np.float64, SHAPE, elements=FINITE)
MODERATE = hnp.arrays(np.float64, SHAPE, elements=st.floats(-1e3, 1e3))
MASKS = hnp.arrays(np.bool_, SHAPE)


def _np(backend, x):
    return backend.to_numpy(x)


@SETTINGS
@given(x=LOGITS, mask=MASKS)
def test_no_nan_and_rows_sum_to_one(backend, x, mask):
    xb, mb = backend.asarray(x), backend.asarray(mask)
    p = _np(backend, sm.softmax(xb, where=mb))
    lp = _np(backend, sm.log_softmax(xb, where=mb))
    lse = _np(backend, sm.logsumexp(xb, where=mb))
    assert not np.isnan(p).any() and not np.isnan(lp).any() and not np.isnan(lse).any()
    assert np.all((p >= 0) & (p <= 1)) and np.all(lp <= 0)
    live = mask & (x > -math.inf)
    rows = live.any(axis=-1)
    np.testing.assert_allclose(p.sum(axis=-1)[rows], 1.0, rtol=1e-13)
    np.testing.assert_array_equal(p[~rows], 0.0)
    np.testing.assert_array_equal(lse[~rows], -math.inf)
    np.testing.assert_array_equal(p[~mask], 0.0)
    np.testing.assert_array_equal(lp[~mask], -math.inf)


@SETTINGS
@given(x=MODERATE, c=st.floats(-100, 100))
def test_shift_invariance(backend, x, c):
    a = _np(backend, sm.softmax(backend.asarray(x)))
    b = _np(backend, sm.softmax(backend.asarray(x + c)))
    # x + c rounds by up to an ulp of 1100, which moves the exponent by as much
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-300)


@SETTINGS
@given(x=FINITE_LOGITS)
@example(x=np.array([[2.2e-308] + [-676.0] * 4, [-676.0] * 5]))  # a subnormal maximum
def test_log_softmax_is_x_minus_logsumexp(backend, x):
    xb = backend.asarray(x)
    lp = _np(backend, sm.log_softmax(xb))
    lse = _np(backend, sm.logsumexp(xb, keepdims=True))
    if backend.flushes_float32_subnormals:
        # XLA on the CPU reads subnormal inputs as 0, in float64 too (SPEC §3.5 note):
        # hypothesis found [2.2e-308 (subnormal), -676, ...], where lse lost the 2.2e-308
        x = np.where(np.abs(x) < np.finfo(x.dtype).tiny, 0.0, x)
    scale = np.maximum(np.abs(x), np.abs(lse))
    assert np.all(np.abs(lp - (x - lse)) <= 4 * np.spacing(scale))


@SETTINGS
@given(x=FINITE_LOGITS, t=hnp.arrays(np.int64, (3,), elements=st.integers(0, 4)))
def test_cross_entropy_nonnegative_and_onehot(backend, x, t):
    xb, tb = backend.asarray(x), backend.asarray(t)
    hard = _np(backend, sm.cross_entropy(xb, tb, reduction="none"))
    soft = _np(backend, sm.cross_entropy(xb, backend.asarray(np.eye(5)[t]), reduction="none"))
    assert np.all(hard >= 0) and not np.isnan(hard).any()
    np.testing.assert_allclose(soft, hard, rtol=1e-14)


@SETTINGS
@given(x=MODERATE, temperature=st.floats(0.05, 50))
def test_temperature_scaling(backend, x, temperature):
    a = _np(backend, sm.softmax(backend.asarray(x), temperature=temperature))
    b = _np(backend, sm.softmax(backend.asarray(x / temperature)))
    # XLA may divide through a reciprocal: an ulp of x / T moves exp(x / T) by
    # |x / T| ulp
    rtol = 4e-16 * (1 + np.max(np.abs(x)) / temperature)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-300)


@SETTINGS
@given(x=LOGITS, mask=MASKS, t=hnp.arrays(np.int64, (3,), elements=st.integers(0, 4)))
def test_gradients_never_nan(backend, x, mask, t):
    if backend.name not in ("torch", "jax"):
        pytest.skip("autodiff: torch and jax")
    if backend.name == "torch":
        torch = backend.module
        xt = torch.tensor(x, requires_grad=True)
        mt = torch.tensor(mask)
        tt = torch.tensor(t)
        parts = [
            sm.logsumexp(xt, where=mt).clamp(-1e300, 1e300).sum(),
            sm.softmax(xt, where=mt).sum(),
            torch.where(mt, sm.log_softmax(xt, where=mt), 0.0).clamp(-1e300, 1e300).sum(),
            sm.cross_entropy(xt, tt, reduction="none").clamp(max=1e300).sum(),
        ]
        grads = [torch.autograd.grad(p, xt)[0].numpy() for p in parts]
    else:
        import jax
        import jax.numpy as jnp

        mj, tj = jnp.asarray(mask), jnp.asarray(t)
        fns = [
            lambda v: jnp.clip(sm.logsumexp(v, where=mj), -1e300, 1e300).sum(),
            lambda v: sm.softmax(v, where=mj).sum(),
            lambda v: jnp.clip(jnp.where(mj, sm.log_softmax(v, where=mj), 0.0), -1e300).sum(),
            lambda v: jnp.clip(sm.cross_entropy(v, tj, reduction="none"), None, 1e300).sum(),
        ]
        grads = [np.asarray(jax.grad(f)(jnp.asarray(x))) for f in fns]
    for g in grads:
        assert not np.isnan(g).any()
