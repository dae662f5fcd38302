"""SPEC §3.6: gradients through torch autograd and jax.grad are the analytic ones,
finite at every §3 edge; every function works under jax.jit, vmap and torch.compile."""

from __future__ import annotations

import math

import _reference as ref
import numpy as np
import pytest
from conftest import backends_named

import stablemath as sm

INF = math.inf
NAN = math.nan

AD = backends_named("torch", "jax")
pytestmark = pytest.mark.skipif(not AD, reason="no autodiff backend (torch, jax) selected")


@pytest.fixture(params=AD, ids=[b.name for b in AD])
def ad(request):
    return request.param


def grad(ad, f, x, dtype="float64"):
    """Gradient of a scalar function ``f`` at the NumPy point ``x`` taken in ``dtype``
    (float32 inputs take the fast paths of stablemath/_fastpaths.py on torch CPU)."""
    if ad.name == "torch":
        torch = ad.module
        t = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
        f(t).backward()
        return t.grad.double().numpy()
    import jax

    return np.asarray(jax.grad(f)(jax.numpy.asarray(x, dtype=dtype)), dtype=np.float64)


# (rtol, atol) of the gradient checks per input dtype
TOL = {"float64": (1e-13, 1e-16), "float32": (2e-6, 1e-7)}
DTYPES = pytest.mark.parametrize("dtype", list(TOL))


def _softmax(row):
    row = np.asarray(row, dtype=np.float64)
    if np.all(row == -INF):
        return np.zeros_like(row)
    if np.any(row == INF):
        return (row == INF) / np.sum(row == INF)
    return ref.softmax(row)


ROWS = {
    "finite": [1.0, 2.0, 3.0, -1.0],
    "some_neg_inf": [1.0, -INF, 3.0, -INF],
    "all_neg_inf": [-INF, -INF, -INF, -INF],
    "ties": [2.0, 2.0, -1.0, 2.0],
    # SPEC §3: the limit of the finite-row gradient, p = 1/k at the k +inf entries
    "two_pos_inf": [INF, 1.0, INF, -INF],
    "one_pos_inf": [2.0, INF, -1.0, 0.0],
}


@DTYPES
@pytest.mark.parametrize("case", list(ROWS))
def test_logsumexp_gradient_is_softmax(ad, case, dtype):
    row = np.array(ROWS[case])
    g = grad(ad, lambda x: sm.logsumexp(x), row, dtype)
    rtol = 1e-14 if dtype == "float64" else 2e-7
    np.testing.assert_allclose(g, _softmax(row), rtol=rtol, atol=1e-300)


@DTYPES
def test_logsumexp_gradient_at_pos_inf(ad, dtype):
    row = np.array([INF, 1.0, INF, -INF])
    g = grad(ad, lambda x: sm.logsumexp(x), row, dtype)
    np.testing.assert_array_equal(g, [0.5, 0.0, 0.5, 0.0])


@DTYPES
@pytest.mark.parametrize("case", list(ROWS))
def test_softmax_and_log_softmax_gradients(ad, case, dtype):
    row = np.array(ROWS[case])
    v = np.array([0.3, -1.0, 2.0, 0.5])
    p = _softmax(row)
    rtol, atol = TOL[dtype]
    # d/dx sum(v * softmax(x)) = p * (v - p.v)
    g = grad(ad, lambda x: (sm.softmax(x) * ad_const(ad, v, dtype)).sum(), row, dtype)
    np.testing.assert_allclose(g, p * (v - p @ v), rtol=rtol, atol=atol)
    # d/dx sum(v * log_softmax(x)) over the finite outputs = v - p * sum(v)
    live = (row > -INF) & ((row == INF) | ~np.any(row == INF))
    vl = np.where(live, v, 0.0)
    g = grad(
        ad,
        lambda x: ad_where_sum(ad, live, sm.log_softmax(x) * ad_const(ad, vl, dtype)),
        row,
        dtype,
    )
    want = np.where(live, vl - p * vl.sum(), 0.0) if live.any() else np.zeros(4)
    np.testing.assert_allclose(g, want, rtol=rtol, atol=atol)


def ad_const(ad, a, dtype="float64"):
    if ad.name == "torch":
        return ad.module.tensor(a, dtype=getattr(ad.module, dtype))
    import jax.numpy as jnp

    return jnp.asarray(a, dtype=dtype)


def ad_where_sum(ad, mask, y):
    """Sum of ``y`` over ``mask`` without touching the -inf entries."""
    m = ad_const(ad, mask).astype(bool) if ad.name == "jax" else ad.module.tensor(mask)
    if ad.name == "torch":
        return ad.module.where(m, y, 0.0).sum()
    import jax.numpy as jnp

    return jnp.where(m, y, 0.0).sum()


@DTYPES
def test_log_softmax_vjp_with_masked_and_neg_inf_outputs(ad, dtype):
    """The cotangent of every output, the ``-inf`` ones included, goes back as for
    ``x - logsumexp(x)``: ``gx_j = [j live] v_j - p_j sum_i v_i``, the masked outputs
    (``-inf - lse``) adding ``-p v_i`` and nothing that depends on where the max is.
    Rows: masked entries (maximum tied), an unmasked ``-inf``, two ``+inf`` (limit)."""
    x = np.array([[3.0, 1.0, 3.0, 0.5], [1.0, -INF, 2.0, 0.0], [INF, 1.0, INF, 2.0]])
    mask = np.array([[True, False, True, False], [True] * 4, [True, True, True, False]])
    v = np.array([[0.3, -1.0, 2.0, 0.5], [1.5, 0.25, -0.5, 1.0], [0.7, -0.2, 0.4, 3.0]])
    p = np.stack([_softmax(np.where(mk, r, -INF)) for r, mk in zip(x, mask, strict=True)])
    want = np.where(mask, v, 0.0) - p * v.sum(axis=1, keepdims=True)
    if ad.name == "torch":
        torch = ad.module
        tx = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
        y = sm.log_softmax(tx, where=torch.tensor(mask))
        (got,) = torch.autograd.grad(y, tx, torch.tensor(v, dtype=y.dtype))
    else:
        import jax

        jm = jax.numpy.asarray(mask)
        _, vjp = jax.vjp(lambda a: sm.log_softmax(a, where=jm), jax.numpy.asarray(x, dtype))
        (got,) = vjp(jax.numpy.asarray(v, dtype))
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("func", ["logsumexp", "softmax", "log_softmax"])
def test_masked_gradient_is_zero(ad, func):
    row = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = np.array([[True, False, True], [False, False, False]])
    f = getattr(sm, func)

    def loss(x):
        y = f(
            x,
            where=ad_const(ad, mask).astype(bool) if ad.name == "jax" else ad.module.tensor(mask),
        )
        y = y if func != "log_softmax" else ad_where_sum(ad, mask, y)
        return y.sum()

    g = grad(ad, loss, row)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[~mask], 0.0)


CE_ROWS = [
    ([2.0, 1.0, 0.1], 0),
    ([0.0, -INF, 1.0], 2),
    ([0.0, -INF, 1.0], 1),  # masked target: softmax - onehot, -1 at the target
    ([-INF, -INF, -INF], 1),  # all -inf: -onehot(t)
    ([INF, 1.0, INF], 0),  # +inf rows: the limit softmax - onehot(t)
    ([INF, 1.0, INF], 1),
    ([2.0, INF, -INF], 2),
]


@DTYPES
@pytest.mark.parametrize("case", range(len(CE_ROWS)))
def test_cross_entropy_gradient(ad, case, dtype):
    row, t = CE_ROWS[case]
    row = np.array([row])
    tgt = ad_const(ad, np.array([t])).astype(int) if ad.name == "jax" else ad.module.tensor([t])
    g = grad(ad, lambda x: sm.cross_entropy(x, tgt), row, dtype)
    want = _softmax(row[0]) - np.eye(3)[t]
    rtol = 1e-14 if dtype == "float64" else 2e-7
    np.testing.assert_allclose(g[0], want, rtol=rtol, atol=1e-300)


@DTYPES
@pytest.mark.parametrize(("temperature", "z"), [(0.6, 0.0), (2.5, 0.0), (0.6, 0.01), (1.0, 0.01)])
@pytest.mark.parametrize("case", range(len(CE_ROWS)))
def test_cross_entropy_gradient_with_temperature_and_z_loss(ad, case, temperature, z, dtype):
    """The rows above at a temperature T, with the z-loss: the gradient is (their
    gradient at x / T, plus 2 z lse(x / T) softmax(x / T) where that lse is finite) / T,
    in reverse and in forward mode (-1 / T at a -inf target; the forward-mode
    derivative of the z-loss of an all -inf row was NaN)."""
    row, t = CE_ROWS[case]
    row = np.array([row])
    tgt = ad_const(ad, np.array([t])).astype(int) if ad.name == "jax" else ad.module.tensor([t])

    def loss(x):
        return sm.cross_entropy(x, tgt, temperature=temperature, z_loss=z)

    g = grad(ad, loss, row, dtype)
    scaled = row[0] / temperature
    p = _softmax(scaled)
    want = p - np.eye(3)[t]
    if z and np.isfinite(np.max(scaled)):
        want += 2 * z * (np.max(scaled) + np.log(np.sum(np.exp(scaled - np.max(scaled))))) * p
    want /= temperature
    rtol = 1e-14 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(g[0], want, rtol=rtol, atol=1e-300)
    d = np.array([[0.3, -1.0, 2.0]])
    if ad.name == "torch":
        torch = ad.module
        x_, d_ = (torch.tensor(a, dtype=getattr(torch, dtype)) for a in (row, d))
        tangent = torch.func.jvp(loss, (x_,), (d_,))[1]
    else:
        import jax

        x_, d_ = (jax.numpy.asarray(a, dtype=dtype) for a in (row, d))
        tangent = jax.jvp(loss, (x_,), (d_,))[1]
    np.testing.assert_allclose(float(tangent), float(np.sum(want * d)), rtol=rtol * 10)


@DTYPES
def test_cross_entropy_gradient_with_options(ad, dtype):
    """weight, ignore_index, label_smoothing and the weighted mean: the gradient by
    hand (PyTorch's definition), in float64 and in float32 (torch's fast path)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 5)) * 3).astype(dtype).astype(np.float64)
    t = np.array([0, 4, -100, 2])
    w = rng.random(5) + 0.5
    kw = {"ignore_index": -100, "label_smoothing": 0.1}
    tgt = ad_const(ad, t).astype(int) if ad.name == "jax" else ad.module.tensor(t)
    g = grad(ad, lambda x: sm.cross_entropy(x, tgt, weight=ad_const(ad, w, dtype), **kw), x, dtype)
    g64 = grad(ad, lambda x: sm.cross_entropy(x, tgt, weight=ad_const(ad, w), **kw), x)
    # per kept sample: w[t] (1 - e) (p - onehot(t)) + (e / C) sum_c w[c] (p - onehot(c)),
    # divided by the sum of w[t] over kept samples
    p = np.stack([_softmax(r) for r in x])
    kept = t != -100
    onehot = np.eye(5)[np.where(kept, t, 0)]
    wt = np.where(kept, w[np.where(kept, t, 0)], 0.0)
    e = 0.1
    per = (1 - e) * wt[:, None] * (p - onehot) + (e / 5) * (w.sum() * p - w[None, :])
    want = np.where(kept[:, None], per, 0.0) / wt.sum()
    np.testing.assert_allclose(g64, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g, want, rtol=TOL[dtype][0], atol=1e-7)


@DTYPES
@pytest.mark.parametrize("option", ["label_smoothing", "z_loss", "weight"])
def test_cross_entropy_gradient_limit_at_pos_inf(ad, option, dtype):
    """SPEC §3, k entries +inf: the loss is +inf with smoothing or z-loss, and the
    gradient is the finite limit of the finite-row one: w[t] (1 - e) (p - onehot(t))
    + (e / C) sum_c w[c] (p - onehot(c)); the z-loss term, whose gradient is infinite
    there, adds nothing (as in the Triton kernels)."""
    row = np.array([[INF, 1.0, INF, -2.0], [0.5, 1.0, -1.0, 2.0]])
    t = np.array([2, 1])
    tgt = ad_const(ad, t).astype(int) if ad.name == "jax" else ad.module.tensor(t)
    w = np.array([0.5, 2.0, 1.5, 1.0]) if option == "weight" else np.ones(4)
    e = 0.2 if option == "label_smoothing" else 0.0
    kw = {"label_smoothing": e} if e else {}
    if option == "z_loss":
        kw["z_loss"] = 0.01
    if option == "weight":
        kw["weight"] = ad_const(ad, w, dtype)
    g = grad(ad, lambda x: sm.cross_entropy(x, tgt, reduction="sum", **kw), row, dtype)
    p = np.stack([_softmax(r) for r in row])
    onehot = np.eye(4)[t]
    want = (1 - e) * w[t][:, None] * (p - onehot) + (e / 4) * (w.sum() * p - w[None, :])
    if option == "z_loss":
        # finite row: plus 2 z lse(x) p
        want[1] += 2 * 0.01 * np.log(np.exp(row[1]).sum()) * p[1]
    np.testing.assert_allclose(g, want, rtol=TOL[dtype][0], atol=1e-7)


@pytest.mark.parametrize("func", ["logsumexp", "softmax", "log_softmax"])
def test_second_derivatives(ad, func):
    """Hessians through the custom derivative of the shift: of logsumexp,
    diag(p) - p p^T; of sum(v * softmax) and sum(v * log_softmax) by finite
    differences of the analytic gradient."""
    row = np.array([0.3, -1.2, 2.0, 0.7])
    v = np.array([0.5, -1.0, 2.0, 0.25])
    f = getattr(sm, func)

    def scalar(x):
        y = f(x)
        return y if func == "logsumexp" else (y * ad_const(ad, v)).sum()

    if ad.name == "torch":
        h = ad.module.autograd.functional.hessian(scalar, ad.module.tensor(row)).numpy()
    else:
        import jax

        h = np.asarray(jax.hessian(scalar)(jax.numpy.asarray(row)))

    def analytic_grad(r):
        p = ref.softmax(r)
        if func == "logsumexp":
            return p
        if func == "softmax":
            return p * (v - p @ v)
        return v - p * v.sum()

    eps = 1e-6
    fd = np.stack(
        [
            (analytic_grad(row + eps * d) - analytic_grad(row - eps * d)) / (2 * eps)
            for d in np.eye(4)
        ]
    )
    np.testing.assert_allclose(h, fd, rtol=1e-7, atol=1e-8)


@DTYPES
def test_cross_entropy_ignored_and_all_ignored_gradient(ad, dtype):
    row = np.array([[-INF, -INF], [1.0, 2.0]])
    tgt = (
        ad_const(ad, np.array([-100, -100])).astype(int)
        if ad.name == "jax"
        else ad.module.tensor([-100, -100])
    )
    g = grad(ad, lambda x: sm.cross_entropy(x, tgt), row, dtype)
    np.testing.assert_array_equal(g, 0.0)


def test_nan_gives_nan_gradient(ad):
    row = np.array([1.0, NAN, 2.0])
    for f in (sm.logsumexp, lambda x: sm.softmax(x)[0], lambda x: sm.log_softmax(x)[2]):
        g = grad(ad, f, row)
        assert np.all(np.isnan(g))


def test_gradcheck_torch_options():
    torch = pytest.importorskip("torch")
    if "torch" not in [b.name for b in AD]:
        pytest.skip("torch backend not selected")
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 4, 2])
    w = torch.rand(5, dtype=torch.float64)
    q = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    mask = torch.tensor([[True, True, False, True, True]] * 3)
    checks = [
        lambda x: sm.softmax(x, axis=0, temperature=2.0),
        lambda x: sm.softmax(x, where=mask),
        lambda x: sm.log_softmax(x, temperature=0.5),
        lambda x: sm.logsumexp(x, axis=(0, 1)),
        lambda x: sm.logsumexp(x, b=w),
        lambda x: sm.cross_entropy(
            x, t, weight=w, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, temperature=1.5
        ),
        lambda x: sm.cross_entropy(x, q, label_smoothing=0.2),
        lambda x: sm.nll_loss(x, t, weight=w),
    ]
    for f in checks:
        assert torch.autograd.gradcheck(f, (x,))


# --- transformations -----------------------------------------------------------------


def _jax():
    if "jax" not in [b.name for b in AD]:
        pytest.skip("jax backend not selected")
    import jax

    return jax


def test_jax_jit_and_vmap_match_eager():
    jax = _jax()
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 6)) * 10)
    x = x.at[1].set(-jnp.inf).at[2, 3].set(jnp.inf)
    t = jnp.asarray(rng.integers(0, 6, 4))
    w = jnp.asarray(rng.random(6))
    calls = {
        "softmax": lambda x: sm.softmax(x, temperature=2.0),
        "log_softmax": lambda x: sm.log_softmax(x),
        "logsumexp": lambda x: sm.logsumexp(x, b=w),
        "cross_entropy": lambda x: sm.cross_entropy(
            x, t, weight=w, reduction="none", label_smoothing=0.1
        ),
        "nll_loss": lambda x: sm.nll_loss(sm.log_softmax(x), t, reduction="sum"),
    }
    for name, f in calls.items():
        eager = np.asarray(f(x))
        # XLA may fuse and reorder: equal to an ulp, and equal at every inf
        np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), eager, rtol=4e-16, err_msg=name)
    row_fns = [sm.softmax, sm.log_softmax, sm.logsumexp]
    for f in row_fns:
        np.testing.assert_allclose(np.asarray(jax.vmap(f)(x)), np.asarray(f(x)), rtol=4e-16)
    g = jax.jit(jax.grad(lambda x: sm.cross_entropy(x, t)))(x)
    assert np.all(np.isfinite(np.asarray(g)))


def test_jax_jit_bad_target_gives_nan():
    jax = _jax()
    jnp = jax.numpy
    x = jnp.zeros((3, 4))
    t = jnp.array([0, 9, 2])
    got = np.asarray(jax.jit(lambda x, t: sm.cross_entropy(x, t, reduction="none"))(x, t))
    assert np.isnan(got[1]) and np.all(np.isfinite(got[[0, 2]]))
    mean = jax.jit(lambda x, t: sm.cross_entropy(x, t))(x, t)
    assert np.isnan(float(mean))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_torch_compile_fullgraph(dtype):
    """float32 and half precision too: the generic kernel computes them in float64 and
    rounds at the end, a cast torch.compile could not trace (`isinstance` with a
    union of NumPy types) until stop 15; eager float32 takes the fast paths, within
    an ulp of the compiled generic kernel."""
    if "torch" not in [b.name for b in AD]:
        pytest.skip("torch backend not selected")
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 6, dtype=getattr(torch, dtype), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 5, 2, 1])
    tol = {"rtol": 1e-12, "atol": 1e-15} if dtype == "float64" else {}
    calls = [
        lambda x: sm.softmax(x),
        lambda x: sm.log_softmax(x, temperature=3.0),
        lambda x: sm.logsumexp(x, axis=None),
        lambda x: sm.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3),
        lambda x: sm.nll_loss(x, t),
    ]
    for f in calls:
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), f(x), **tol)
    if dtype != "float64":
        return
    # the hand-written derivative of the shift compiles too: the limit at a +inf row
    xi = torch.tensor([[INF, 1.0, INF], [0.5, -1.0, 2.0]], dtype=torch.float64)
    ti = torch.tensor([0, 2])

    def ce_grad(x):
        x = x.detach().requires_grad_()
        sm.cross_entropy(x, ti, reduction="sum").backward()
        return x.grad

    torch._dynamo.reset()
    eager = ce_grad(xi)
    want = np.stack([_softmax(r) for r in xi.numpy()]) - np.eye(3)[[0, 2]]
    np.testing.assert_allclose(eager.numpy(), want, rtol=1e-15, atol=1e-16)
    compiled = torch.compile(
        lambda x: sm.cross_entropy(x, ti, reduction="sum"), fullgraph=True, backend="aot_eager"
    )
    xc = xi.clone().requires_grad_()
    compiled(xc).backward()
    torch.testing.assert_close(xc.grad, eager, rtol=1e-15, atol=1e-16)


@pytest.mark.parametrize("func", ["logsumexp", "softmax", "log_softmax"])
def test_forward_mode_matches_reverse_mode(ad, func):
    """jax.jvp / torch.func.jvp give J @ d with the same Jacobian as reverse mode,
    at a +inf row (the limit) and a finite one; torch.func.grad works too."""
    x = np.array([[INF, 1.0, INF, -2.0], [0.5, 1.0, -1.0, 2.0]])
    d = np.array([[0.3, -1.0, 2.0, 0.5], [1.0, 0.25, -0.5, 2.0]])
    f = getattr(sm, func)
    # the limit Jacobian-vector products, row by row
    p = np.stack([_softmax(r) for r in x])
    pd = np.sum(p * d, axis=1, keepdims=True)
    want = {"logsumexp": pd[:, 0], "softmax": p * (d - pd), "log_softmax": d - pd}[func]
    if ad.name == "torch":
        torch = ad.module
        tx, td = torch.tensor(x), torch.tensor(d)
        _, got = torch.func.jvp(f, (tx,), (td,))
        fg = torch.func.grad(lambda a: sm.logsumexp(a).sum())(tx)
        # the generated vmap rule of the hand-written derivative, forward and reverse
        torch.testing.assert_close(torch.func.vmap(f)(tx), f(tx), rtol=0, atol=0)
        if func != "logsumexp":
            jac = torch.func.vmap(torch.func.jacrev(f))(tx)
            _, vjp = torch.func.vjp(f, tx)
            want_vjp = torch.einsum("bi,bij->bj", td, jac)
            torch.testing.assert_close(vjp(td)[0], want_vjp, rtol=1e-14, atol=1e-15)
    else:
        import jax

        jx, jd = jax.numpy.asarray(x), jax.numpy.asarray(d)
        _, got = jax.jvp(f, (jx,), (jd,))
        fg = jax.grad(lambda a: sm.logsumexp(a).sum())(jx)
    got = np.asarray(got)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(np.asarray(fg), p, rtol=1e-14)
