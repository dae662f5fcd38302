"""SPEC §5: parity with the frameworks' own functions on ordinary inputs (random normal
logits, scale 1 to 30): relative 1e-12 (float64) / 1e-5 (float32), or absolute 1e-15 /
1e-6 near zero, where the frameworks lose relative precision."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backends_named

import stablemath as sm

TOL = {"float64": {"rtol": 1e-12, "atol": 1e-15}, "float32": {"rtol": 1e-5, "atol": 1e-6}}


def _logits(dtype: str, scale: float) -> np.ndarray:
    return (np.random.default_rng(7).standard_normal((6, 9)) * scale).astype(dtype)


@pytest.mark.skipif(not backends_named("torch"), reason="torch backend not selected")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_torch_reductions(dtype, scale):
    import torch

    x = torch.from_numpy(_logits(dtype, scale))
    for ours, theirs in [
        (sm.softmax(x, axis=0), torch.softmax(x, 0)),
        (sm.log_softmax(x), torch.log_softmax(x, -1)),
        (sm.logsumexp(x, axis=(0, 1)), torch.logsumexp(x, (0, 1))),
    ]:
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), **TOL[dtype])


@pytest.mark.skipif(not backends_named("jax"), reason="jax backend not selected")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_jax_nn_with_where(dtype, scale):
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(_logits(dtype, scale))
    where = jnp.asarray(np.random.default_rng(8).random((6, 9)) < 0.7).at[:, 0].set(True)
    pairs = [
        (sm.softmax(x, where=where), jax.nn.softmax(x, where=where)),
        (sm.log_softmax(x, where=where), jax.nn.log_softmax(x, where=where)),
        (sm.logsumexp(x, where=where), jax.nn.logsumexp(x, axis=-1, where=where)),
        (sm.logsumexp(x, axis=None), jax.nn.logsumexp(x)),
    ]
    for ours, theirs in pairs:
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        if ours.ndim == 2:  # compare the live entries; masked ones are 0 / -inf in both
            live = np.asarray(where)
            np.testing.assert_array_equal(ours[~live], theirs[~live])
            ours, theirs = ours[live], theirs[live]
        np.testing.assert_allclose(ours, theirs, **TOL[dtype])


@pytest.mark.skipif(not backends_named("jax"), reason="jax backend not selected")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_optax_cross_entropies(dtype, scale):
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    x = jnp.asarray(_logits(dtype, scale))
    t = jnp.asarray(np.arange(6) % 9)
    q = jnp.asarray(sm.softmax(np.random.default_rng(9).standard_normal((6, 9))), dtype=dtype)
    hard = sm.cross_entropy(x, t, reduction="none")
    np.testing.assert_allclose(
        np.asarray(hard),
        np.asarray(optax.softmax_cross_entropy_with_integer_labels(x, t)),
        **TOL[dtype],
    )
    soft = sm.cross_entropy(x, q, reduction="none")
    np.testing.assert_allclose(
        np.asarray(soft), np.asarray(optax.softmax_cross_entropy(x, q)), **TOL[dtype]
    )


@pytest.mark.skipif(not backends_named("jax"), reason="jax backend not selected")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_optax_cross_entropies_with_where(dtype, scale):
    """optax's ``where`` masks classes out of the softmax: stablemath's masked
    log_softmax picked at the label, and its cross_entropy of logits with the masked
    classes at -inf (soft labels 0 there), give the same losses."""
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    x = jnp.asarray(_logits(dtype, scale))
    t = np.arange(6) % 9
    where = np.random.default_rng(10).random((6, 9)) < 0.6
    where[np.arange(6), t] = True  # the label itself is live
    q = np.where(where, np.random.default_rng(11).random((6, 9)), 0.0)
    q = jnp.asarray(q / q.sum(-1, keepdims=True), dtype=dtype)
    w, tj = jnp.asarray(where), jnp.asarray(t)
    want_hard = optax.softmax_cross_entropy_with_integer_labels(x, tj, where=w)
    picked = -jnp.take_along_axis(sm.log_softmax(x, where=w), tj[:, None], axis=-1)[:, 0]
    masked = jnp.where(w, x, -jnp.inf)
    for got in (picked, sm.cross_entropy(masked, tj, reduction="none")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_hard), **TOL[dtype])
    want_soft = optax.softmax_cross_entropy(x, q, where=w)
    got_soft = sm.cross_entropy(masked, q, reduction="none")
    np.testing.assert_allclose(np.asarray(got_soft), np.asarray(want_soft), **TOL[dtype])


TORCH_CE_OPTIONS = [
    (weighted, ignore, reduction, smoothing, soft)
    for weighted in (False, True)
    for ignore in (-100, 2)
    for reduction in ("mean", "sum", "none")
    for smoothing in (0.0, 0.1)
    for soft in (False, True)
    if not (soft and ignore != -100)  # ignore_index applies to class indices only
]


@pytest.mark.skipif(not backends_named("torch"), reason="torch backend not selected")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize(
    ("weighted", "ignore", "reduction", "smoothing", "soft"), TORCH_CE_OPTIONS
)
def test_torch_cross_entropy_and_nll_every_option(
    dtype, scale, weighted, ignore, reduction, smoothing, soft
):
    """F.cross_entropy and F.nll_loss directly, over the product of their options, class
    axis 1 of an (N, C, d1, d2) input, on the same float32/float64 values."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(12)
    x = torch.from_numpy((rng.standard_normal((3, 5, 2, 2)) * scale).astype(dtype))
    t = rng.integers(0, 5, (3, 2, 2))
    t[0, 0, 0] = t[2, 1, 1] = ignore  # ignore_index 2 is also a valid class
    if soft:
        q = rng.random((3, 5, 2, 2))
        target = torch.from_numpy((q / q.sum(1, keepdims=True)).astype(dtype))
    else:
        target = torch.from_numpy(t)
    w = torch.from_numpy((rng.random(5) + 0.2).astype(dtype)) if weighted else None
    kw = {"weight": w, "reduction": reduction, "label_smoothing": smoothing}
    if not soft:
        kw["ignore_index"] = ignore
    got = sm.cross_entropy(x, target, axis=1, **kw)
    np.testing.assert_allclose(got.numpy(), F.cross_entropy(x, target, **kw).numpy(), **TOL[dtype])
    if not soft and smoothing == 0.0:
        del kw["label_smoothing"]
        lp = torch.log_softmax(x, 1)
        got = sm.nll_loss(lp, target, axis=1, **kw)
        np.testing.assert_allclose(got.numpy(), F.nll_loss(lp, target, **kw).numpy(), **TOL[dtype])
