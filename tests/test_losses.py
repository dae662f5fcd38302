"""cross_entropy and nll_loss: SPEC §2 options, §3 edges, PyTorch's definitions."""

from __future__ import annotations

import itertools
import math

import _reference as ref
import numpy as np
import pytest

import stablemath as sm

INF = math.inf
NAN = math.nan


def _np(backend, x):
    return backend.to_numpy(x)


# --- the NumPy reference is PyTorch's definition ------------------------------------


@pytest.mark.parametrize(
    ("reduction", "smoothing", "weighted", "soft"),
    list(itertools.product(["mean", "sum", "none"], [0.0, 0.2], [False, True], [False, True])),
)
def test_reference_matches_torch(reduction, smoothing, weighted, soft):
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 3)) * 3
    w = rng.random(5) if weighted else None
    if soft:
        t = ref.softmax(np.moveaxis(rng.standard_normal((4, 5, 3)), 1, -1))
        t = np.moveaxis(t, -1, 1)
    else:
        t = rng.integers(0, 5, (4, 3))
        t[0, 0] = -100
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    want = f.cross_entropy(
        torch.from_numpy(x),
        torch.from_numpy(t),
        weight=None if w is None else torch.from_numpy(w),
        **kw,
    ).numpy()
    got = ref.np_cross_entropy(x, t, axis=1, weight=w, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --- parity with the definitions, every backend ---------------------------------------

OPTIONS = list(
    itertools.product(["mean", "sum", "none"], [0.0, 0.1], [False, True], [None, 2], [0.0, 1e-3])
)


# float32 logits take the torch-CPU fast path (stablemath/_fastpaths.py) where it applies
DTYPES = pytest.mark.parametrize("dtype", ["float64", "float32"])
RTOL = {"float64": 1e-12, "float32": 1e-6}


@DTYPES
@pytest.mark.parametrize(("reduction", "smoothing", "weighted", "ignore", "z"), OPTIONS)
def test_hard_targets_class_axis_1(backend, reduction, smoothing, weighted, ignore, z, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 4, 2, 2)) * 5).astype(dtype).astype(np.float64)
    t = rng.integers(0, 4, (3, 2, 2))
    if ignore is not None:
        t[0, 0, 0] = ignore  # ignore_index that is also a valid class
        t[1, 1, 1] = ignore
    ii = -100 if ignore is None else ignore
    w = rng.random(4) + 0.1 if weighted else None
    kw = {"reduction": reduction, "label_smoothing": smoothing, "ignore_index": ii, "z_loss": z}
    got = sm.cross_entropy(
        backend.asarray(x, dtype=dtype),
        backend.asarray(t),
        axis=1,
        weight=None if w is None else backend.asarray(w, dtype=dtype),
        **kw,
    )
    want = ref.np_cross_entropy(x, t, axis=1, weight=w, **kw)
    np.testing.assert_allclose(_np(backend, got), want, rtol=RTOL[dtype], atol=1e-15)


@pytest.mark.parametrize(
    ("smoothing", "weighted"), list(itertools.product([0.0, 0.3], [False, True]))
)
def test_soft_targets(backend, smoothing, weighted):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5)) * 4
    q = ref.softmax(rng.standard_normal((6, 5)))
    w = rng.random(5) if weighted else None
    for reduction in ("mean", "sum", "none"):
        got = sm.cross_entropy(
            backend.asarray(x),
            backend.asarray(q),
            weight=None if w is None else backend.asarray(w),
            reduction=reduction,
            label_smoothing=smoothing,
        )
        want = ref.np_cross_entropy(x, q, weight=w, reduction=reduction, label_smoothing=smoothing)
        np.testing.assert_allclose(_np(backend, got), want, rtol=1e-12)


def test_hard_equals_onehot_soft(backend):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4)) * 10
    t = rng.integers(0, 4, 5)
    onehot = np.eye(4)[t]
    a = sm.cross_entropy(backend.asarray(x), backend.asarray(t), reduction="none")
    b = sm.cross_entropy(backend.asarray(x), backend.asarray(onehot), reduction="none")
    np.testing.assert_allclose(_np(backend, a), _np(backend, b), rtol=1e-14)


def test_where_mask_counts_as_ignored(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3))
    t = rng.integers(0, 3, 6)
    mask = np.array([True, False, True, True, False, True])
    got = sm.cross_entropy(backend.asarray(x), backend.asarray(t), where=backend.asarray(mask))
    t_ignored = np.where(mask, t, -100)
    want = sm.cross_entropy(backend.asarray(x), backend.asarray(t_ignored))
    np.testing.assert_allclose(_np(backend, got), _np(backend, want), rtol=1e-15)
    np.testing.assert_allclose(
        _np(backend, got), ref.np_cross_entropy(x, t, where=mask), rtol=1e-12
    )
    # a masked-out sample may hold any target value, even one out of range
    t_bad = np.where(mask, t, 99)
    got_bad = sm.cross_entropy(
        backend.asarray(x), backend.asarray(t_bad), where=backend.asarray(mask)
    )
    np.testing.assert_allclose(_np(backend, got_bad), _np(backend, got), rtol=1e-15)


def test_temperature_and_softcap(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 6)) * 40
    t = rng.integers(0, 6, 4)
    got = sm.cross_entropy(
        backend.asarray(x), backend.asarray(t), temperature=2.5, softcap=30.0, reduction="none"
    )
    capped = 30.0 * np.tanh(x / 30.0) / 2.5
    np.testing.assert_allclose(_np(backend, got), ref.cross_entropy(capped, t), rtol=1e-13)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_temperature_and_z_loss_under_jit(backend, reduction):
    """float32 logits at a temperature that is not a power of two, with the z-loss,
    under ``jax.jit`` for JAX (eager elsewhere). XLA on the CPU rounds ``x / T``
    through the reciprocal in the row maximum and by a division elsewhere; the generic
    kernel divided before the shift, and the z-loss of the first row came out 46.07
    for 44.44 under jit."""
    x = np.array([[0.5, -3.0, 40.0, 2.0, -60.0], [1.0, 2.0, 3.0, -1.0, 0.0]], np.float32)
    t = np.array([2, 0])
    kw = {"temperature": 0.6, "z_loss": 1e-2, "reduction": reduction}

    def loss(a, b):
        return sm.cross_entropy(a, b, **kw)

    if backend.name == "jax":
        import jax

        loss = jax.jit(loss)
    got = _np(backend, loss(backend.asarray(x), backend.asarray(t)))
    want = ref.np_cross_entropy(x.astype(np.float64) / 0.6, t, z_loss=1e-2, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_nll_loss(backend):
    rng = np.random.default_rng(6)
    lp = np.log(ref.softmax(rng.standard_normal((5, 4))))
    t = rng.integers(0, 4, 5)
    t[2] = -100
    w = rng.random(4)
    for reduction in ("mean", "sum", "none"):
        got = sm.nll_loss(
            backend.asarray(lp), backend.asarray(t), weight=backend.asarray(w), reduction=reduction
        )
        kept = t != -100
        per = np.where(kept, -w[np.where(kept, t, 0)] * lp[np.arange(5), np.where(kept, t, 0)], 0)
        want = {"none": per, "sum": per.sum(), "mean": per.sum() / w[t[kept]].sum()}[reduction]
        np.testing.assert_allclose(_np(backend, got), want, rtol=1e-14)
    # nll_loss(log_softmax(x)) == cross_entropy(x)
    x = rng.standard_normal((5, 4))
    a = sm.nll_loss(sm.log_softmax(backend.asarray(x)), backend.asarray(t))
    b = sm.cross_entropy(backend.asarray(x), backend.asarray(t))
    np.testing.assert_allclose(_np(backend, a), _np(backend, b), rtol=1e-14)


# --- SPEC §3.3 cross-entropy column --------------------------------------------------

CE_EDGES = [
    # (row, target, expected loss)
    ([2.0, 1.0, 0.1], 0, None),  # finite: mpmath
    ([0.0, -INF, 1.0], 2, math.log1p(math.exp(-1.0))),
    ([0.0, -INF, 1.0], 1, INF),
    ([-INF, -INF, -INF], 1, INF),
    ([INF, 1.0, INF], 0, math.log(2.0)),
    ([INF, 1.0, INF], 1, INF),
    ([1.0, NAN, 2.0], 0, NAN),
]


@DTYPES
@pytest.mark.parametrize("case", range(len(CE_EDGES)))
def test_cross_entropy_edges(backend, case, dtype):
    row, t, want = CE_EDGES[case]
    if want is None:
        want = float(ref.cross_entropy(np.array([row]), np.array([t]))[0])
    x = backend.asarray(np.array([row]), dtype=dtype)
    for reduction in ("none", "sum", "mean"):
        got = sm.cross_entropy(x, backend.asarray(np.array([t])), reduction=reduction)
        got = np.reshape(_np(backend, got), -1)
        rtol = 1e-15 if dtype == "float64" else 1e-7
        np.testing.assert_allclose(got, [want], rtol=rtol, err_msg=reduction)


@pytest.mark.parametrize(("smoothing", "z"), [(0.1, 0.0), (0.0, 1e-4)])
def test_cross_entropy_pos_inf_with_smoothing_or_z_loss(backend, smoothing, z):
    x = backend.asarray(np.array([[INF, 1.0, INF]]))
    got = sm.cross_entropy(
        x, backend.asarray(np.array([0])), label_smoothing=smoothing, z_loss=z, reduction="none"
    )
    np.testing.assert_array_equal(_np(backend, got), [INF])


@DTYPES
def test_ignored_row_of_any_value_gives_zero(backend, dtype):
    x = backend.asarray(np.array([[-INF, -INF], [INF, INF], [1.0, 2.0]]), dtype=dtype)
    t = backend.asarray(np.array([-100, -100, 0]))
    got = _np(backend, sm.cross_entropy(x, t, reduction="none"))
    np.testing.assert_array_equal(got[:2], [0.0, 0.0])


def test_confident_prediction_keeps_tiny_loss(backend):
    x = backend.asarray(np.array([[100.0, 1.0, 0.0]], dtype=np.float32))
    got = float(_np(backend, sm.cross_entropy(x, backend.asarray(np.array([0])))))
    want = math.exp(-99.0) + math.exp(-100.0)  # 1.3832e-43
    if backend.flushes_float32_subnormals:
        assert got == 0.0  # SPEC §3.5: XLA on CPU flushes float32 subnormals
    else:
        # the nearest float32 subnormal (steps of 1.4e-45)
        assert abs(got - want) <= np.finfo(np.float32).smallest_subnormal
        assert got > 0
    x64 = backend.asarray(np.array([[100.0, 1.0, 0.0]]))
    got64 = float(_np(backend, sm.cross_entropy(x64, backend.asarray(np.array([0])))))
    assert got64 == pytest.approx(math.log1p(want), rel=1e-15, abs=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loss(backend, dtype):
    if not backend.has(dtype) or (backend.name == "numpy" and dtype == "bfloat16"):
        pytest.skip(f"{backend.name} has no {dtype}")
    x = np.array([[1000.0, 2.0, -3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    xb = backend.asarray(x, dtype=dtype)
    got = sm.cross_entropy(xb, backend.asarray(np.array([1, 2])), reduction="none")
    assert got.dtype == xb.dtype
    np.testing.assert_allclose(_np(backend, got), [998.0, math.log(3.0)], rtol=2**-7)


@DTYPES
def test_all_ignored_mean_is_zero(backend, dtype):
    x = backend.asarray(np.array([[1.0, 2.0], [3.0, 4.0]]), dtype=dtype)
    t = backend.asarray(np.array([-100, -100]))
    got = sm.cross_entropy(x, t)
    assert float(_np(backend, got)) == 0.0
    assert got.ndim == 0


@DTYPES
def test_zero_weight_class_contributes_zero_even_at_inf(backend, dtype):
    x = np.array([[0.0, -INF, 1.0], [2.0, 1.0, 0.0]]).astype(dtype)
    t = np.array([1, 0])
    w = np.array([1.0, 0.0, 2.0])
    for smoothing in (0.0, 0.1):
        got = _np(
            backend,
            sm.cross_entropy(
                backend.asarray(x),
                backend.asarray(t),
                weight=backend.asarray(w),
                reduction="none",
                label_smoothing=smoothing,
            ),
        )
        assert got[0] == 0.0 if smoothing == 0 else np.isfinite(got[0])
        assert np.all(np.isfinite(got))
