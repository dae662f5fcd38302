"""The backend matrix: an ``xp`` fixture over the array libraries chosen by the
environment variable STABLEMATH_BACKEND (comma-separated; default: every installed
one). nox sets it to one backend per session."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

ALL_BACKENDS = ("numpy", "array_api_strict", "torch", "jax", "dask", "cupy")
# The device the arrays of torch and JAX are created on: "cpu" (default) or "cuda";
# CuPy is always on the GPU. Set by STABLEMATH_DEVICE or `pytest --device cuda`.
DEVICE = os.environ.get("STABLEMATH_DEVICE", "cpu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=None,
        help="device for torch and JAX arrays: cpu (default) or cuda (or STABLEMATH_DEVICE)",
    )


def pytest_configure(config: pytest.Config) -> None:
    global DEVICE
    DEVICE = config.getoption("--device") or DEVICE


@dataclass(frozen=True)
class Backend:
    """One array library: how to make its arrays and read them back."""

    name: str
    module: Any

    def asarray(self, a: Any, dtype: str | None = None) -> Any:
        a = np.asarray(a)
        if self.name == "torch":
            t = self.module.from_numpy(np.array(a, copy=True)).to(DEVICE)
            return t if dtype is None else t.to(getattr(self.module, dtype))
        if self.name == "jax":
            import jax
            import jax.numpy as jnp

            platform = "gpu" if DEVICE == "cuda" else DEVICE
            x = jnp.asarray(a, dtype=None if dtype is None else getattr(jnp, dtype))
            return jax.device_put(x, jax.devices(platform)[0])
        if self.name == "cupy":
            return self.module.asarray(a if dtype is None else a.astype(dtype))
        if self.name == "dask":
            # chunked along every axis, the reduced ones included
            a = a if dtype is None else a.astype(dtype)
            return self.module.from_array(a, chunks=tuple(max(1, (n + 1) // 2) for n in a.shape))
        if self.name == "array_api_strict":
            x = self.module.asarray(a)
            return x if dtype is None else self.module.astype(x, getattr(self.module, dtype))
        return a if dtype is None else a.astype(dtype)

    def dtype(self, name: str) -> Any:
        mod = self.module
        if self.name in ("dask", "cupy"):
            mod = np
        if self.name == "jax":
            import jax.numpy as jnp

            mod = jnp
        if not hasattr(mod, name):
            pytest.skip(f"{self.name} has no {name}")
        return getattr(mod, name)

    def has(self, name: str) -> bool:
        mod = self.module
        if self.name in ("dask", "cupy"):
            mod = np
        if self.name == "jax":
            import jax.numpy as jnp

            mod = jnp
        return hasattr(mod, name)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.name == "torch":
            x = x.detach()
            if x.dtype in (self.module.bfloat16, self.module.float16):
                x = x.float()
            return x.cpu().numpy()
        if self.name == "array_api_strict":
            return np.asarray(x._array)
        if self.name == "dask":
            return np.asarray(x.compute())
        if self.name == "cupy":
            return self.module.asnumpy(x)
        return np.asarray(x, dtype=np.float64 if "bfloat16" in str(x.dtype) else None)

    @property
    def checks_values(self) -> bool:
        """Whether target values are validated (eager arrays); lazy Dask arrays are not,
        and a bad sample's loss is NaN instead (SPEC §4)."""
        return self.name != "dask"

    @property
    def flushes_float32_subnormals(self) -> bool:
        """XLA on CPU flushes float32 subnormals to zero (SPEC §3.5)."""
        return self.name == "jax"

    def is_native(self, x: Any) -> bool:
        """Whether ``x`` is an array of this library (not converted)."""
        if self.name == "numpy":
            return isinstance(x, np.ndarray)
        if self.name == "torch":
            return isinstance(x, self.module.Tensor)
        if self.name == "jax":
            import jax

            return isinstance(x, jax.Array)
        if self.name == "dask":
            return isinstance(x, self.module.Array)
        if self.name == "cupy":
            return isinstance(x, self.module.ndarray)
        from array_api_strict._array_object import Array

        return isinstance(x, Array)


def _selected() -> list[str]:
    env = os.environ.get("STABLEMATH_BACKEND", "")
    names = [n.strip() for n in env.split(",") if n.strip()]
    if not names:
        names = [n for n in ALL_BACKENDS if importlib.util.find_spec(n) is not None]
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        msg = f"STABLEMATH_BACKEND names unknown backends {unknown}; known: {ALL_BACKENDS}"
        raise pytest.UsageError(msg)
    return names


_MODULES = {"dask": "dask.array"}


def _load(name: str) -> Backend:
    try:
        module = importlib.import_module(_MODULES.get(name, name))
    except ImportError as exc:  # a requested backend must not be skipped silently
        msg = f"STABLEMATH_BACKEND asks for {name}, which is not importable: {exc}"
        raise pytest.UsageError(msg) from exc
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    return Backend(name, module)


BACKENDS = [_load(n) for n in _selected()]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param


def backends_named(*names: str) -> list[Backend]:
    return [b for b in BACKENDS if b.name in names]


def spy_kernels(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> list[str]:
    """Record, in the list returned, the name of each generic kernel of ``names``
    (functions of ``stablemath._kernels``) at each of its calls."""
    from stablemath import _kernels

    calls: list[str] = []
    for name in names:
        real = getattr(_kernels, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_kernels, name, spy)
    return calls
