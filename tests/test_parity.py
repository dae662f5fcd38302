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
