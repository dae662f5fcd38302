"""JAX arrays sharded over several (host) devices stay sharded through stablemath."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import backends_named

pytestmark = pytest.mark.skipif(not backends_named("jax"), reason="jax backend not selected")

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import stablemath as sm

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rows = NamedSharding(mesh, P("batch", None))
    x64 = np.random.default_rng(0).standard_normal((8, 6)) * 30
    x64[3] = -np.inf
    t_np = np.arange(8) % 6
    t = jax.device_put(t_np, NamedSharding(mesh, P("batch")))
    # float32 is what the CPU fast path (stablemath/_xla_ffi.py) would take
    for x_np, rtol in [(x64, 1e-13), (x64.astype(np.float32), 1e-6)]:
        x = jax.device_put(x_np, rows)
        for name, f, ref in [
            ("softmax", sm.softmax, sm.softmax(x_np)),
            ("log_softmax", sm.log_softmax, sm.log_softmax(x_np)),
            ("logsumexp", sm.logsumexp, sm.logsumexp(x_np)),
            ("cross_entropy", lambda x, t: sm.cross_entropy(x, t, reduction="none"),
             sm.cross_entropy(x_np, t_np, reduction="none")),
        ]:
            for g in (f, jax.jit(f)):  # eager and traced
                y = g(x, t) if name == "cross_entropy" else g(x)
                np.testing.assert_allclose(np.asarray(y), ref, rtol=rtol, atol=1e-30)
                assert len(y.sharding.device_set) == 4, (name, y.sharding)
                assert not y.sharding.is_fully_replicated, (name, y.sharding)
    print("ok")
    """
)


def test_sharded_outputs_stay_sharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
