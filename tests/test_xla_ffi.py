"""The JAX fast path on the CPU (stablemath/_xla_ffi.py): the compiled row kernels as
XLA FFI calls. It runs for float32, bfloat16 and float16 arrays on one axis, eager and
under jit, vmap and grad, and gives the generic kernels' values (SPEC §3) on every row,
the ``+-inf`` and NaN rows that its handler fills in included; its derivatives are
the generic ones. (The whole suite also holds it to the SPEC: the jax session runs
with it.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import DEVICE, backends_named, spy_kernels

import stablemath as sm
from stablemath import _fastpaths

pytestmark = pytest.mark.skipif(
    not backends_named("jax") or DEVICE != "cpu", reason="the jax backend on the CPU"
)
FUNCS = ["softmax", "log_softmax", "logsumexp"]
INF, NAN = math.inf, math.nan
# normal rows, and every row the kernels refuse (the handler's SPEC §3 values)
EDGES = np.array(
    [
        [0.5, -3.0, 40.0, 2.0, -60.0],
        [1.0, INF, 0.0, -INF, 3.0],  # one +inf
        [INF, 2.0, INF, INF, -1.0],  # three
        [-INF] * 5,  # all -inf
        [1.0, NAN, 2.0, INF, -INF],  # NaN (with +inf)
        [NAN, -INF, -INF, -INF, -INF],
        [-INF, -INF, 7.0, -INF, -INF],  # one finite entry
        [3e38, -3e38, 0.0, 1e38, -1.0],  # max - min beyond float32
    ]
)


def _edges(dtype):
    """EDGES in ``dtype``, its last row scaled to the dtype's range."""
    x = EDGES.copy()
    x[-1] *= float(np.finfo(np.float16).max) / 3e38 if dtype == "float16" else 1.0
    return x


@pytest.fixture
def jax(monkeypatch):
    """JAX, with the fast paths on (also in the jax-generic session)."""
    import jax

    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    return jax


@pytest.fixture
def generic_calls(monkeypatch):
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    return spy_kernels(monkeypatch, FUNCS)


def _generic(jax, func, x, monkeypatch, **kw):
    """The generic kernels' value, under jit as the fast path's is."""
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    try:
        return np.asarray(jax.jit(lambda v: getattr(sm, func)(v, **kw))(x), dtype=np.float64)
    finally:
        monkeypatch.delenv(_fastpaths.DISABLE_ENV)


def _fast(jax, func, x, **kw):
    return np.asarray(jax.jit(lambda v: getattr(sm, func)(v, **kw))(x), dtype=np.float64)


def _close(got, want, dtype):
    """Equal at every non-finite value, and to the ulps the two paths may differ by
    where finite (the generic kernels' float32 arithmetic flushes subnormals)."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
    rtol = {"float32": 4e-7, "bfloat16": 8e-3, "float16": 1e-3}[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=2e-38, equal_nan=True)


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_ffi_call_is_what_runs(jax, func, dtype, generic_calls):
    """The compiled program holds the FFI call and no generic kernel is traced, eager
    or under jit."""
    import jax.numpy as jnp

    x = jnp.asarray(EDGES[:1], dtype=dtype)
    f = getattr(sm, func)
    hlo = jax.jit(f).lower(x).compile().as_text()
    assert f"stablemath_{func}_{dtype}" in hlo
    f(x)
    assert generic_calls == []


@pytest.mark.parametrize("func", FUNCS)
def test_switch_and_other_inputs_take_the_generic_path(jax, func, generic_calls, monkeypatch):
    import jax.numpy as jnp

    f = getattr(sm, func)
    x = jnp.asarray(EDGES[:2], dtype="float32")
    f(x, axis=(1,))  # several axes (one given as a tuple)
    f(x, where=x > 0)
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    f(x)
    assert generic_calls == [func] * 3


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_edge_rows_match_the_generic_kernels(jax, func, dtype, monkeypatch):
    import jax.numpy as jnp

    x = jnp.asarray(_edges(dtype), dtype=dtype)
    kw = {} if func == "logsumexp" else {"temperature": 0.75}
    _close(_fast(jax, func, x, **kw), _generic(jax, func, x, monkeypatch, **kw), dtype)


@pytest.mark.parametrize("func", FUNCS)
def test_random_rows_any_axis_and_vmap(jax, func, monkeypatch):
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 40, 5)) * 20, dtype="float32")
    for axis in (0, 1, -1):
        _close(
            _fast(jax, func, x, axis=axis),
            _generic(jax, func, x, monkeypatch, axis=axis),
            "float32",
        )
    f = getattr(sm, func)
    got = np.asarray(jax.vmap(f)(x), dtype=np.float64)
    _close(got, _generic(jax, func, x, monkeypatch), "float32")


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_arrays_shared_among_the_pool_threads(jax, func, dtype, monkeypatch):
    """Arrays of at least 2**17 elements are shared out in blocks of rows among XLA's
    CPU threads; a refused row in any block sends every row through the one-by-one
    pass, the others' values unchanged."""
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 400)) * 20
    fast = {}
    for edges in (False, True):
        if edges:  # refused rows in the first, a middle and the last block
            x[[0, 350, 699]] = EDGES[[1, 3, 4], :1]
            x[351, 7] = NAN
        xb = jnp.asarray(x, dtype=dtype)
        got = fast[edges] = _fast(jax, func, xb)
        _close(got, _generic(jax, func, xb, monkeypatch), dtype)
    same = slice(1, 350) if func == "logsumexp" else (slice(1, 350), slice(None))
    np.testing.assert_array_equal(fast[True][same], fast[False][same])


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_derivatives_match_the_generic_kernels(jax, func, dtype, monkeypatch):
    """Reverse mode (a cotangent on every output, the infinite ones included) and
    forward mode, under jit, on finite rows and at every edge but NaN (whose
    derivatives are NaN on both paths: test_autodiff)."""
    import jax.numpy as jnp

    x = jnp.asarray(_edges(dtype)[[0, 1, 2, 3, 6, 7]], dtype=dtype)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal(x.shape), dtype=dtype)
    v = jnp.asarray(rng.standard_normal(x.shape[:1] if func == "logsumexp" else x.shape), dtype)
    kw = {} if func == "logsumexp" else {"temperature": 1.5}

    @jax.jit
    def both(x):
        f = lambda a: getattr(sm, func)(a, **kw)  # noqa: E731
        _, back = jax.vjp(f, x)
        return back(v)[0], jax.jvp(f, (x,), (w,))[1]

    fast = both(x)
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    jax.clear_caches()
    generic = both(x)
    tol = 2e-6 if dtype == "float32" else 2e-2
    for got, want in zip(fast, generic, strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_platform_dependent_form(jax, monkeypatch):
    """Traced arrays in a process with accelerators get ``lax.platform_dependent``
    (its CPU branch, the FFI call, here)."""
    import jax.numpy as jnp

    from stablemath import _xla_ffi

    monkeypatch.setattr(_xla_ffi, "_cpu_only", lambda x: None)
    x = jnp.asarray(EDGES, dtype="float32")
    f = jax.jit(lambda v: sm.softmax(v, axis=0))
    assert "stablemath_softmax_float32" in f.lower(x).compile().as_text()
    _close(
        np.asarray(f(x), np.float64), _generic(jax, "softmax", x, monkeypatch, axis=0), "float32"
    )


# --- cross-entropy -------------------------------------------------------------------

CE_TARGETS = np.array([2, 1, 0, 2, 0, 2, 3, -100])  # one per EDGES row; -100 ignored
CE_OPTIONS = [
    {"reduction": "none"},
    {"reduction": "none", "label_smoothing": 0.1},
    {"reduction": "mean"},
    {"reduction": "sum", "label_smoothing": 0.3},
    {"reduction": "none", "weight": [1.0, 2.0, 0.0, 0.5, 1.0]},
    {"reduction": "mean", "weight": [1.0, 2.0, 0.5, 0.5, 1.0]},
    {"reduction": "mean", "ignore_index": 2},
    {"reduction": "none", "temperature": 0.6, "z_loss": 1e-2},
    {"reduction": "mean", "label_smoothing": 0.2, "temperature": 2.0, "z_loss": 1e-3},
    {"reduction": "sum", "weight": [1.0, 2.0, 0.0, 0.5, 1.0], "temperature": 0.5},
    {"reduction": "mean", "weight": [1.0, 2.0, 0.5, 0.5, 1.0], "label_smoothing": 0.1},
    {
        "reduction": "none",
        "weight": [1.0, 2.0, 0.0, 0.5, 1.0],
        "label_smoothing": 0.2,
        "z_loss": 1e-2,
        "temperature": 0.8,
    },
]


def _ce(jax, x, t, monkeypatch, generic=False, **kw):
    import jax.numpy as jnp

    if "weight" in kw:
        kw["weight"] = jnp.asarray(kw["weight"], dtype="float32")
    if generic:
        monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    try:
        f = jax.jit(lambda a, b: sm.cross_entropy(a, b, **kw))
        return np.asarray(f(x, t), dtype=np.float64)
    finally:
        monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cross_entropy_ffi_call_is_what_runs(jax, dtype, monkeypatch):
    import jax.numpy as jnp

    spied = spy_kernels(monkeypatch, ["cross_entropy"])
    x = jnp.asarray(_edges(dtype)[:1], dtype=dtype)
    t = jnp.asarray(CE_TARGETS[:1])
    hlo = jax.jit(sm.cross_entropy).lower(x, t).compile().as_text()
    assert f"stablemath_cross_entropy_{dtype}" in hlo
    sm.cross_entropy(x, t, weight=jnp.ones(5, dtype="float32"))
    sm.cross_entropy(x, t, z_loss=1e-4, temperature=2.0, label_smoothing=0.1)
    sm.cross_entropy(x, t, weight=jnp.ones(5, dtype="float32"), label_smoothing=0.1)
    sm.cross_entropy(x, t, weight=jnp.ones(5, dtype="float32"), z_loss=1e-4)
    assert spied == []
    sm.cross_entropy(x, t, softcap=30.0)
    assert len(spied) == 1  # softcap with jax_enable_x64 (see below): the generic kernels


@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_matches_the_generic_kernels(jax, options, dtype, monkeypatch):
    """Every SPEC §3 edge row (its target at the +inf, the -inf, the NaN...), the
    options, each reduction."""
    import jax.numpy as jnp

    x = jnp.asarray(_edges(dtype), dtype=dtype)
    t = jnp.asarray(CE_TARGETS)
    got = _ce(jax, x, t, monkeypatch, **options)
    want = _ce(jax, x, t, monkeypatch, generic=True, **options)
    _close(np.atleast_1d(got), np.atleast_1d(want), dtype)
    finite = jnp.asarray(_edges(dtype)[[0, 6, 7]], dtype=dtype)  # a finite mean, too
    tf = jnp.asarray(CE_TARGETS[[0, 6, 7]])
    got = _ce(jax, finite, tf, monkeypatch, **options)
    _close(
        np.atleast_1d(got),
        np.atleast_1d(_ce(jax, finite, tf, monkeypatch, True, **options)),
        dtype,
    )


@pytest.mark.parametrize("options", [CE_OPTIONS[0], CE_OPTIONS[3], CE_OPTIONS[5]], ids=str)
def test_cross_entropy_where(jax, options, monkeypatch):
    """A per-sample mask (its False samples count as ignored ones) on the FFI path,
    given to jit or captured by it, with the gradient: the generic kernels' values."""
    import jax.numpy as jnp

    rows = [0, 1, 2, 6, 7]
    x = jnp.asarray(EDGES[rows], dtype="float32")
    t = jnp.asarray(CE_TARGETS[rows])
    mask = jnp.asarray([True, False, True, False, True])
    kw = dict(options)
    if "weight" in kw:
        kw["weight"] = jnp.asarray(kw["weight"], dtype="float32")

    def loss(a, m):
        return jnp.sum(sm.cross_entropy(a, t, where=m, **kw))

    def both():
        given = jax.jit(jax.value_and_grad(loss))(x, mask)
        captured = jax.jit(jax.value_and_grad(lambda a: loss(a, mask)))(x)
        return [np.asarray(v, np.float64) for v in (*given, *captured)]

    spied = spy_kernels(monkeypatch, ["cross_entropy"])
    fast = both()
    assert spied == []
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    jax.clear_caches()
    for got, want in zip(fast, both(), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    assert np.isfinite(fast[1]).all() and np.all(fast[1][[1, 3]] == 0)


def test_cross_entropy_bad_target(jax, monkeypatch):
    """SPEC §4: NaN for that sample under jit, ValueError on eager arrays."""
    import jax.numpy as jnp

    x = jnp.asarray(EDGES[[0, 6]], dtype="float32")
    t = jnp.asarray([7, 2])
    got = _ce(jax, x, t, monkeypatch, reduction="none")
    assert np.isnan(got[0]) and np.isfinite(got[1])
    with pytest.raises((ValueError, IndexError)):
        sm.cross_entropy(x, t)


# (not ignore_index 2: then the target -100 is out of range, which an eager target
# sends to the generic kernels)
@pytest.mark.parametrize("options", [o for o in CE_OPTIONS if "ignore_index" not in o], ids=str)
def test_cross_entropy_derivatives_match_the_generic_kernels(jax, options, monkeypatch):
    """Reverse mode w.r.t. logits and weights, forward mode, under jit: finite at
    every edge but NaN (SPEC §3: softmax - onehot, -onehot in an all -inf row, the
    limit in a +inf row). The reductions' factors (1 / count, the class weights) are
    in the kernel's gradient, and their own derivative is a term of the tangent."""
    import jax.numpy as jnp

    rows = [0, 1, 2, 3, 6, 7]
    x = jnp.asarray(EDGES[rows], dtype="float32")
    t = jnp.asarray(CE_TARGETS[rows])
    kw = dict(options)
    weighted = "weight" in kw
    weight = jnp.asarray(kw.pop("weight", [1.0] * 5), dtype="float32")
    rng = np.random.default_rng(2)
    dx = jnp.asarray(rng.standard_normal(x.shape), dtype="float32")
    scale = jnp.arange(1.0, 1.0 + len(rows))  # a cotangent per sample

    def f(a, w):
        loss = sm.cross_entropy(a, t, weight=w if weighted else None, **kw)
        return jnp.sum(loss * scale) if kw["reduction"] == "none" else loss

    @jax.jit
    def both(x, weight):
        grads = jax.grad(f, argnums=(0, 1) if weighted else 0)(x, weight)
        grads = grads if weighted else (grads,)
        return (*grads, jax.jvp(lambda a: f(a, weight), (x,), (dx,))[1])

    spied = spy_kernels(monkeypatch, ["cross_entropy"])
    fast = both(x, weight)
    assert spied == []  # the fast path's derivatives (with the FFI softmax)
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    jax.clear_caches()
    generic = both(x, weight)
    for got, want in zip(fast, generic, strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, equal_nan=True)
    assert np.isfinite(np.asarray(fast[0])).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("options", [CE_OPTIONS[2], CE_OPTIONS[3], CE_OPTIONS[5]], ids=str)
def test_cross_entropy_half_precision_gradient(jax, dtype, options, monkeypatch):
    """The kernel writes the gradient of half-precision logits in their dtype, rounded
    once from float64; the generic kernels' float32 gradient, rounded to the dtype,
    differs from it by at most a rounding of that dtype (at the edges and on random
    rows)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(5)
    x = jnp.asarray(np.concatenate([_edges(dtype), rng.standard_normal((40, 5)) * 4]), dtype)
    t = jnp.asarray(np.concatenate([CE_TARGETS, rng.integers(0, 5, 40)]))
    kw = dict(options)
    if "weight" in kw:
        kw["weight"] = jnp.asarray(kw["weight"], dtype="float32")

    def grad():
        return jax.jit(jax.grad(lambda a: sm.cross_entropy(a, t, **kw).astype("float32")))(x)

    spied = spy_kernels(monkeypatch, ["cross_entropy"])
    fast = grad()
    assert spied == [] and fast.dtype == x.dtype
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    jax.clear_caches()
    generic = np.asarray(grad(), np.float64)
    fast = np.asarray(fast, np.float64)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(generic))
    atol = np.nanmax(np.abs(generic)) * eps / 64
    np.testing.assert_allclose(fast, generic, rtol=eps, atol=atol, equal_nan=True)
    assert np.nanmax(np.abs(fast)) > 0.001


def test_cross_entropy_large_and_vmapped(jax, monkeypatch):
    """Rows shared among the pool threads, refused rows in several blocks; and vmap,
    of the loss and of its gradient (the factors of the mean are per row)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(7)
    x = rng.standard_normal((800, 300)) * 20
    x[[0, 400, 799]] = EDGES[[1, 3, 4], :1]
    t = rng.integers(0, 300, 800)
    t[5] = -100
    xb, tb = jnp.asarray(x, dtype="float32"), jnp.asarray(t)
    for options in ({"reduction": "none"}, {"reduction": "none", "label_smoothing": 0.2}):
        got = _ce(jax, xb, tb, monkeypatch, **options)
        _close(got, _ce(jax, xb, tb, monkeypatch, generic=True, **options), "float32")
    batched = jax.vmap(lambda a, b: sm.cross_entropy(a, b, reduction="none"))
    got = np.asarray(batched(xb.reshape(4, 200, 300), tb.reshape(4, 200)), np.float64)
    want = _ce(jax, xb, tb, monkeypatch, generic=True, reduction="none")
    _close(got.reshape(-1), want, "float32")

    weight = jnp.asarray(rng.uniform(0.5, 2.0, 300), dtype="float32")
    weights = jnp.asarray(rng.uniform(0.5, 2.0, (4, 300)), dtype="float32")

    for smoothing in (0.0, 0.1):  # (with smoothing the weights are the kernel's)

        def loss(a, b, w=weight, smoothing=smoothing):
            return sm.cross_entropy(a, b, weight=w, label_smoothing=smoothing)

        def gradients(generic, loss=loss):
            monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1") if generic else None
            jax.clear_caches()
            whole = jax.jit(jax.grad(loss))(xb, tb)
            xs, ts = xb.reshape(4, 200, 300), tb.reshape(4, 200)
            parts = jax.jit(jax.vmap(jax.grad(loss)))(xs, ts)
            # each vmapped call with weights of its own
            own = jax.jit(jax.vmap(jax.value_and_grad(loss)))(xs, ts, weights)
            monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
            flat = [np.asarray(g, np.float64).reshape(800, 300) for g in (whole, parts, own[1])]
            return [*flat, np.asarray(own[0], np.float64)]

        fast, generic = gradients(False), gradients(True)
        for got, want in zip(fast[:3], generic[:3], strict=True):
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        # the losses (+inf in the blocks with an all -inf row)
        _close(fast[3], generic[3], "float32")


@pytest.mark.parametrize(
    "options",
    [
        {"reduction": "none"},
        {
            "reduction": "mean",
            "weight": [1.0, 2.0, 0.0, 0.5, 1.0],
            "label_smoothing": 0.1,
            "temperature": 0.7,
            "z_loss": 1e-3,
        },
    ],
    ids=str,
)
def test_cross_entropy_softcap_without_x64(jax, options, monkeypatch):
    """A soft-cap with ``jax_enable_x64`` off (JAX's default): XLA caps the logits in
    float32, as the generic kernels then do, and the FFI kernel takes the capped ones
    (+-inf logits become +-softcap): the generic kernels' losses, gradients and
    forward-mode derivatives at every edge row, under jit and vmap. With x64 on the
    generic kernels would cap in float64, more than float32 logits hold: they run."""
    import jax.numpy as jnp

    kw = dict(options, softcap=4.0)
    if "weight" in kw:
        kw["weight"] = np.asarray(kw["weight"], np.float32)
    rows = [0, 1, 2, 3, 4, 6, 7]
    rng = np.random.default_rng(5)
    dx = rng.standard_normal((len(rows), 5)).astype(np.float32)

    def run(generic):
        if generic:
            monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
        jax.clear_caches()
        spied = spy_kernels(monkeypatch, ["cross_entropy"])
        try:
            with jax.enable_x64(False):
                x = jnp.asarray(EDGES[rows], dtype="float32")
                t = jnp.asarray(CE_TARGETS[rows])
                w = {k: jnp.asarray(v) if k == "weight" else v for k, v in kw.items()}

                def loss(a):
                    return jnp.sum(sm.cross_entropy(a, t, **w))

                value, grad = jax.jit(jax.value_and_grad(loss))(x)
                tangent = jax.jit(lambda a: jax.jvp(loss, (a,), (jnp.asarray(dx),))[1])(x)
                batched = jax.jit(jax.vmap(lambda a, b: sm.cross_entropy(a, b, **w)))(
                    x[:, None], t[:, None]
                )
                found = [np.asarray(v, np.float64) for v in (value, grad, tangent, batched)]
        finally:
            monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
        return found, list(spied)

    fast, calls = run(False)
    assert calls == []
    generic, calls = run(True)
    assert calls
    assert np.isnan(fast[1][4]).all()  # the NaN row
    for got, want in zip(fast, generic, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7, equal_nan=True)
    spied = spy_kernels(monkeypatch, ["cross_entropy"])
    x = jnp.asarray(EDGES[rows], dtype="float32")
    sm.cross_entropy(x, jnp.asarray(CE_TARGETS[rows]), softcap=4.0)
    assert spied == ["cross_entropy"]  # x64 on (this suite's setting): generic


@pytest.mark.parametrize("rows", [6, 60000], ids=["one-thread", "pool"])
def test_cross_entropy_class_weights_after_refused_rows(jax, rows, monkeypatch):
    """Class weights inside the kernel, read again for the rows after one the kernel
    refused (a -inf logit at a class of weight 0, with smoothing: its edge values);
    once as one row of weights and once under vmap with a row of them per call: the
    generic kernels' losses and gradients. (A dangling address of the weights made
    the second row read freed memory and the call spin.)"""
    import jax.numpy as jnp

    # (three classes: the edge row's scratch is then as large as what the weights'
    # address once pointed at, which it reused)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((rows, 3)) * 5
    x[::3, 1] = -INF
    t = rng.integers(0, 3, rows)
    w = rng.uniform(0.5, 2.0, (2, 3))
    w[:, 1] = 0.0
    xb, tb = jnp.asarray(x, dtype="float32"), jnp.asarray(t)
    ws = jnp.asarray(w, dtype="float32")
    kw = {"label_smoothing": 0.1, "reduction": "none"}

    def run(generic):
        if generic:
            monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
        jax.clear_caches()
        try:

            def loss(a, b, wt):
                return sm.cross_entropy(a, b, weight=wt, **kw)

            def total(a, b, wt):
                return jnp.sum(loss(a, b, wt))

            one = jax.jit(jax.value_and_grad(total))(xb, tb, ws[0])
            half = (2, rows // 2, 3)
            each = jax.jit(jax.vmap(jax.value_and_grad(total)))(
                xb.reshape(half), tb.reshape(half[:2]), ws
            )
            rowwise = jax.jit(loss)(xb, tb, ws[0])
            found = (one[0], one[1], each[0], each[1], rowwise)
            return [np.asarray(v, np.float64).reshape(-1) for v in found]
        finally:
            monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)

    fast, generic = run(False), run(True)
    assert np.isfinite(fast[4]).all()
    for got, want in zip(fast, generic, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize(
    "options",
    [
        {"label_smoothing": 0.0, "reduction": "sum"},
        {"label_smoothing": 0.2, "reduction": "sum"},
        {"label_smoothing": 0.2, "reduction": "mean"},
        {"weight": [1.0, 2.0, 0.0, 3.0, 0.5], "reduction": "mean"},
        {"label_smoothing": 0.2, "reduction": "mean", "temperature": 0.7, "z_loss": 1e-2},
        {"weight": [1.0, 2.0, 0.0, 3.0, 0.5], "reduction": "sum", "temperature": 1.5},
        {"weight": [1.0, 2.0, 0.0, 3.0, 0.5], "reduction": "mean", "label_smoothing": 0.2},
        {"weight": [1.0, 2.0, 0.5, 3.0, 0.5], "reduction": "sum", "z_loss": 1e-2},
    ],
    ids=str,
)
def test_cross_entropy_second_derivatives(jax, options, monkeypatch):
    """The Hessian w.r.t. the logits (the gradient from the kernel moves with the
    softmax, times the reduction's factors), against the generic kernels', on finite
    rows, a +inf and an all -inf row and an ignored sample (whose curvature would not
    be 0); and the mixed derivative w.r.t. the logits and the class weights."""
    import jax.numpy as jnp

    rows = [[0.3, -1.2, 2.0, 0.7, 1.0], [1.0, 0.5, -0.5, 2.0, 0.0]]
    x = jnp.asarray(np.concatenate([EDGES[[0, 1, 3]], rows]), "float32")
    t = jnp.asarray([2, 1, 0, -100, 3])

    kw = dict(options)
    weight = jnp.asarray(kw.pop("weight", [1.0] * 5), "float32")
    weighted = "weight" in options

    def f(a, w):
        return sm.cross_entropy(a, t, weight=w if weighted else None, **kw)

    def derivatives():
        hessian = jax.jit(jax.hessian(f))(x, weight)
        mixed = jax.jit(jax.jacfwd(jax.grad(f), argnums=1))(x, weight)
        return [np.asarray(d, np.float64) for d in (hessian, mixed)]

    fast = derivatives()
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    jax.clear_caches()
    generic = derivatives()
    assert np.abs(fast[0]).max() > 0.02  # (the finite rows' curvature)
    for got, want in zip(fast, generic, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"temperature": 0.7, "z_loss": 1e-3}], ids=str)
def test_cross_entropy_platform_dependent_form(jax, extra, monkeypatch):
    """As test_platform_dependent_form, for the cross-entropy and its gradient: the
    CPU branch is the FFI call, and the other branch (the generic kernels) must not
    come back to the fast path (it recursed, at trace time)."""
    import jax.numpy as jnp

    from stablemath import _xla_ffi

    monkeypatch.setattr(_xla_ffi, "_cpu_only", lambda x: None)
    x = jnp.asarray(EDGES, dtype="float32")
    t = jnp.asarray(CE_TARGETS)

    def loss(v):
        return sm.cross_entropy(v, t, label_smoothing=0.1, **extra)

    f = jax.jit(jax.value_and_grad(loss))
    assert "stablemath_cross_entropy_grad_float32" in f.lower(x).compile().as_text()
    got = f(x)
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    want = jax.jit(jax.value_and_grad(loss))(x)
    for g, w in zip(got, want, strict=True):
        _close(
            np.atleast_1d(np.asarray(g, np.float64)),
            np.atleast_1d(np.asarray(w, np.float64)),
            "float32",
        )
