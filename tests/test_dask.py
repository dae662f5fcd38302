"""Dask: the functions build a lazy graph (no compute inside them), reduce across
chunks of the reduced axis, and run on a distributed cluster."""

from __future__ import annotations

import numpy as np
import pytest

import stablemath as sm

da = pytest.importorskip("dask.array")


def test_dask_stays_lazy():
    import dask

    computes = []

    def counting_scheduler(dsk, keys, **kwargs):
        computes.append(keys)
        return dask.get(dsk, keys, **kwargs)

    x_np = np.random.default_rng(0).standard_normal((6, 8))
    x = da.from_array(x_np, chunks=(3, 4))
    t = da.from_array(np.array([0, 1, 2, 3, 7, 9]), chunks=3)
    with dask.config.set(scheduler=counting_scheduler):
        results = [
            sm.softmax(x),
            sm.log_softmax(x, axis=0),
            sm.logsumexp(x, axis=None),
            sm.logsumexp(x, b=x),
            sm.cross_entropy(x, t, label_smoothing=0.1),
            sm.cross_entropy(x, sm.softmax(x), reduction="none"),
            sm.nll_loss(x, t),
        ]
        assert computes == []
        assert all(isinstance(r, da.Array) for r in results)
        np.testing.assert_allclose(results[0].compute(), sm.softmax(x_np), rtol=1e-15)
    assert len(computes) == 1


def test_distributed_local_cluster():
    distributed = pytest.importorskip("distributed")
    x_np = np.random.default_rng(1).standard_normal((8, 10)) * 20
    x_np[2] = -np.inf
    t_np = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        x = da.from_array(x_np, chunks=(4, 5))
        t = da.from_array(t_np, chunks=4)
        p, ce = client.compute([sm.softmax(x), sm.cross_entropy(x, t, reduction="none")])
        np.testing.assert_allclose(p.result(), sm.softmax(x_np), rtol=1e-15)
        np.testing.assert_allclose(
            ce.result(), sm.cross_entropy(x_np, t_np, reduction="none"), rtol=1e-15
        )
