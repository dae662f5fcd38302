"""Importing stablemath (and using it on NumPy arrays) imports no other array library:
torch and JAX are imported only when their arrays are seen (STYLE: einops-style)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "jax", "jaxlib", "dask", "cupy", "triton", "array_api_strict")


def _run(code: str) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_does_not_import_torch_or_jax():
    _run(
        f"""
        import sys
        import stablemath
        assert stablemath.__file__.startswith({str(ROOT)!r}), stablemath.__file__
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        assert not loaded, f"import stablemath imported {{loaded}}"
        """
    )


def test_numpy_use_does_not_import_torch_or_jax():
    _run(
        f"""
        import sys
        import numpy as np
        import stablemath as sm
        x = np.array([[1.0, 2.0, 3.0], [0.0, -np.inf, 1.0]])
        sm.softmax(x); sm.log_softmax(x); sm.logsumexp(x, b=x)
        sm.cross_entropy(x, np.array([0, 2])); sm.nll_loss(x, np.array([0, 2]))
        sm.softmax([1.0, 2.0])
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        assert not loaded, f"using stablemath on NumPy arrays imported {{loaded}}"
        """
    )
