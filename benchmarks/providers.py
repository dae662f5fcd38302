"""What is compared: the backends, the providers and the one registry built from them.

A *backend* knows how to turn the shared NumPy test data into its own arrays, how to make
a call finish (``jax.jit`` + ``block_until_ready``, Dask's ``compute``,
``torch.cuda.synchronize``), how to differentiate, and what a plain copy of the same
bytes costs. A *provider* is a backend plus one function per op (stablemath's, the
framework's own, or the naive formula). ``REGISTRY[op][provider]`` is a setup function
``setup(case) -> zero-arg callable``; nothing of a library is imported before a setup
for it runs, and a provider whose library is missing is skipped with a note.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

OPS = ("softmax", "log_softmax", "logsumexp", "ce_fwd", "ce_fwdbwd")
DTYPES = ("float32", "bfloat16", "float16")
TARGET_BYTES = 8  # one int64 class index per row, whatever the backend stores
SEED = 0
SCALE = 5.0  # logits ~ N(0, SCALE^2): ordinary inputs, no overflow for the naive formula


@dataclass(frozen=True)
class Case:
    """One measured point: an op on one shape and dtype, on one device."""

    op: str
    shape: tuple[int, int]
    dtype: str
    device: str = "cpu"

    @property
    def label(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}"

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def bytes_moved(self) -> int:
        """Bytes an ideal kernel reads and writes: the input once, the output once."""
        n, _ = self.shape
        logits = self.size * self.itemsize
        return {
            "softmax": 2 * logits,
            "log_softmax": 2 * logits,
            "logsumexp": logits + n * self.itemsize,
            "ce_fwd": logits + n * TARGET_BYTES + self.itemsize,
            "ce_fwdbwd": 2 * logits + n * TARGET_BYTES + self.itemsize,
        }[self.op]

    def copy_bytes(self) -> int:
        """Bytes a copy of the logits moves (read once, written once)."""
        return 2 * self.size * self.itemsize


@functools.cache
def host_data(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The same float32 logits and int64 targets for every provider of a shape."""
    rng = np.random.default_rng(SEED)
    x = (SCALE * rng.standard_normal(shape)).astype(np.float32)
    t = rng.integers(0, shape[1], size=shape[0], dtype=np.int64)
    return x, t


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- backends -------------------------------------------------------------------------
# Each function takes the imported module(s) lazily, at setup time.


# ``convert(host_array, dtype, device)``: dtype None keeps the host dtype (the targets;
# JAX without x64 stores them as int32).


def _np_convert(x: np.ndarray, dtype: str | None, device: str) -> np.ndarray:
    return x.astype(dtype or x.dtype, copy=True)


def _np_finish(fn: Callable, device: str) -> Callable:
    return fn


def _np_copy(x: np.ndarray) -> Callable[[], Any]:
    out = np.empty_like(x)
    return functools.partial(np.copyto, out, x)


def _dask_convert(x: np.ndarray, dtype: str | None, device: str) -> Any:
    import dask.array as da

    # one row-chunk per core, so the threaded scheduler has work for each
    rows = max(1, math.ceil(x.shape[0] / (os.cpu_count() or 1)))
    return da.from_array(_np_convert(x, dtype, device), chunks=(rows, *x.shape[1:]))


def _dask_finish(fn: Callable, device: str) -> Callable:
    return lambda *args: fn(*args).compute()


def _torch_convert(x: np.ndarray, dtype: str | None, device: str) -> Any:
    import torch

    out = torch.from_numpy(x.copy()).to(device=device)
    return out if dtype is None else out.to(getattr(torch, dtype))


def _torch_finish(fn: Callable, device: str) -> Callable:
    import torch

    if not device.startswith("cuda"):
        return fn

    def synced(*args: Any) -> Any:
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return synced


def _torch_grad(loss: Callable) -> Callable:
    import torch

    def value_and_grad(x: Any, t: Any) -> Any:
        x = x.detach().requires_grad_(True)
        value = loss(x, t)
        (grad,) = torch.autograd.grad(value, x)
        return value, grad

    return value_and_grad


def _torch_copy(x: Any) -> Callable[[], Any]:
    return _torch_finish(lambda: x.clone(), str(x.device))


def _torch_peak_memory(fn: Callable[[], Any], device: str) -> int | None:
    """Bytes allocated at the peak of one call, above what was resident before it."""
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _jax_device(device: str) -> Any:
    import jax

    return jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]


def _jax_convert(x: np.ndarray, dtype: str | None, device: str) -> Any:
    import jax
    import jax.numpy as jnp

    out = jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype=getattr(jnp, dtype))
    return jax.device_put(out, _jax_device(device))


def _jax_finish(fn: Callable, device: str) -> Callable:
    import jax

    jitted = jax.jit(fn)
    return lambda *args: jax.block_until_ready(jitted(*args))


def _jax_grad(loss: Callable) -> Callable:
    import jax

    return jax.value_and_grad(loss, argnums=0)


def _jax_copy(x: Any) -> Callable[[], Any]:
    copy = _jax_finish(lambda a: a + 0, "cpu")
    return lambda: copy(x)


def _cupy_convert(x: np.ndarray, dtype: str | None, device: str) -> Any:
    import cupy

    return cupy.asarray(_np_convert(x, dtype, device))


def _cupy_finish(fn: Callable, device: str) -> Callable:
    import cupy

    def synced(*args: Any) -> Any:
        out = fn(*args)
        cupy.cuda.get_current_stream().synchronize()
        return out

    return synced


def _cupy_copy(x: Any) -> Callable[[], Any]:
    import cupy

    out = cupy.empty_like(x)
    return _cupy_finish(lambda: cupy.copyto(out, x), "cuda")


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # what must be importable
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    convert: Callable[[np.ndarray, str | None, str], Any]  # (host array, dtype, device)
    finish: Callable[[Callable, str], Callable]  # make a call complete before it returns
    copy: Callable[[Any], Callable[[], Any]]  # the copy baseline on an array
    grad: Callable[[Callable], Callable] | None = None  # loss(x, t) -> (value, dL/dx)
    peak_memory: Callable[[Callable[[], Any], str], int | None] | None = None


# NumPy has float16, but its arithmetic is emulated on CPU: not a meaningful comparison.
BACKENDS = {
    "numpy": Backend("numpy", "numpy", ("float32",), ("cpu",), _np_convert, _np_finish, _np_copy),
    "dask": Backend(
        "dask", "dask.array", ("float32",), ("cpu",), _dask_convert, _dask_finish, _np_copy
    ),
    "torch": Backend(
        "torch",
        "torch",
        DTYPES,
        ("cpu", "cuda"),
        _torch_convert,
        _torch_finish,
        _torch_copy,
        grad=_torch_grad,
        peak_memory=_torch_peak_memory,
    ),
    "jax": Backend(
        "jax", "jax", DTYPES, ("cpu", "cuda"), _jax_convert, _jax_finish, _jax_copy, _jax_grad
    ),
    "cupy": Backend(
        "cupy", "cupy", ("float32", "float16"), ("cuda",), _cupy_convert, _cupy_finish, _cupy_copy
    ),
}

# Backends whose copy baseline is NumPy's (their data lives in host memory).
COPY_BACKEND = {"dask": "numpy"}


# --- the op functions: (x, t) -> result, t used by the losses only ---------------------


def _sm_ops() -> dict[str, Callable]:
    import stablemath as sm

    return {
        "softmax": lambda x, t: sm.softmax(x),
        "log_softmax": lambda x, t: sm.log_softmax(x),
        "logsumexp": lambda x, t: sm.logsumexp(x),
        "ce_fwd": lambda x, t: sm.cross_entropy(x, t),
    }


def _scipy_ops() -> dict[str, Callable]:
    from scipy import special

    def ce(x: np.ndarray, t: np.ndarray) -> Any:
        logp = special.log_softmax(x, axis=-1)
        return -np.take_along_axis(logp, t[:, None], axis=-1).mean()

    return {
        "softmax": lambda x, t: special.softmax(x, axis=-1),
        "log_softmax": lambda x, t: special.log_softmax(x, axis=-1),
        "logsumexp": lambda x, t: special.logsumexp(x, axis=-1),
        "ce_fwd": ce,
    }


def _naive_ops() -> dict[str, Callable]:
    def softmax(x: np.ndarray, t: Any = None) -> np.ndarray:
        e = np.exp(x)
        return e / e.sum(axis=-1, keepdims=True)

    def ce(x: np.ndarray, t: np.ndarray) -> Any:
        p = softmax(x)
        return -np.log(p[np.arange(x.shape[0]), t]).mean()

    return {
        "softmax": softmax,
        "log_softmax": lambda x, t: np.log(softmax(x)),
        "logsumexp": lambda x, t: np.log(np.exp(x).sum(axis=-1)),
        "ce_fwd": ce,
    }


def _torch_ops() -> dict[str, Callable]:
    import torch
    import torch.nn.functional as F

    return {
        "softmax": lambda x, t: torch.softmax(x, dim=-1),
        "log_softmax": lambda x, t: torch.log_softmax(x, dim=-1),
        "logsumexp": lambda x, t: torch.logsumexp(x, dim=-1),
        "ce_fwd": lambda x, t: F.cross_entropy(x, t),
    }


def _jax_ops() -> dict[str, Callable]:
    import jax
    import optax

    return {
        "softmax": lambda x, t: jax.nn.softmax(x, axis=-1),
        "log_softmax": lambda x, t: jax.nn.log_softmax(x, axis=-1),
        "logsumexp": lambda x, t: jax.nn.logsumexp(x, axis=-1),
        "ce_fwd": lambda x, t: optax.softmax_cross_entropy_with_integer_labels(x, t).mean(),
    }


def _cupyx_ops() -> dict[str, Callable]:
    from cupyx.scipy import special

    return {
        "softmax": lambda x, t: special.softmax(x, axis=-1),
        "log_softmax": lambda x, t: special.log_softmax(x, axis=-1),
        "logsumexp": lambda x, t: special.logsumexp(x, axis=-1),
    }


FWD_OPS = ("softmax", "log_softmax", "logsumexp", "ce_fwd")


@dataclass(frozen=True)
class Provider:
    name: str
    backend: str
    ops: Callable[[], dict[str, Callable]]  # imports its library when called
    requires: tuple[str, ...] = ()  # importable modules beyond the backend's
    native: str | None = None  # the framework's own provider on the same backend
    op_names: tuple[str, ...] = FWD_OPS  # the keys ``ops()`` returns, known without imports

    def supports(self, op: str) -> bool:
        if op == "ce_fwdbwd":
            return BACKENDS[self.backend].grad is not None and "ce_fwd" in self.op_names
        return op in self.op_names

    def missing(self) -> list[str]:
        return [m for m in (BACKENDS[self.backend].module, *self.requires) if not installed(m)]


PROVIDERS = {
    p.name: p
    for p in [
        Provider("sm-numpy", "numpy", _sm_ops, ("stablemath",), native="scipy"),
        Provider("scipy", "numpy", _scipy_ops, ("scipy",)),
        Provider("naive", "numpy", _naive_ops, native="scipy"),
        Provider("sm-dask", "dask", _sm_ops, ("stablemath",)),
        Provider("sm-torch", "torch", _sm_ops, ("stablemath",), native="torch"),
        Provider("torch", "torch", _torch_ops),
        Provider("sm-jax", "jax", _sm_ops, ("stablemath",), native="jax"),
        Provider("jax", "jax", _jax_ops, ("optax",)),
        Provider("sm-cupy", "cupy", _sm_ops, ("stablemath",), native="cupyx"),
        Provider("cupyx", "cupy", _cupyx_ops, ("cupyx",), op_names=FWD_OPS[:3]),
    ]
}


def available(provider: Provider, case: Case) -> bool:
    """Whether the provider runs this case at all (op, dtype, device), libraries aside."""
    backend = BACKENDS[provider.backend]
    return (
        provider.supports(case.op)
        and case.dtype in backend.dtypes
        and case.device.split(":")[0] in backend.devices
    )


def _setup(provider: Provider, case: Case) -> Callable[[], Any]:
    """The zero-arg callable that runs ``case`` with ``provider``, to completion."""
    backend = BACKENDS[provider.backend]
    ops = provider.ops()
    if case.op == "ce_fwdbwd":
        assert backend.grad is not None
        fn = backend.grad(ops["ce_fwd"])
    else:
        fn = ops[case.op]
    fn = backend.finish(fn, case.device)
    x_host, t_host = host_data(case.shape)
    x = backend.convert(x_host, case.dtype, case.device)
    t = backend.convert(t_host, None, case.device) if case.op.startswith("ce") else None
    return functools.partial(fn, x, t)


def setup_copy(backend_name: str, case: Case) -> Callable[[], Any]:
    """The copy baseline for the data of ``case`` on a backend."""
    backend = BACKENDS[backend_name]
    x_host, _ = host_data(case.shape)
    return backend.copy(backend.convert(x_host, case.dtype, case.device))


def copy_backend(provider: str) -> str:
    """The backend whose copy is the baseline for a provider's bandwidth."""
    backend = PROVIDERS[provider].backend
    return COPY_BACKEND.get(backend, backend)


def peak_memory(provider: str, fn: Callable[[], Any], device: str) -> int | None:
    """Peak device memory of one call where the backend can tell, else None."""
    probe = BACKENDS[PROVIDERS[provider].backend].peak_memory
    return probe(fn, device) if probe else None


# The registry: op -> provider -> setup(case) -> zero-arg callable.
REGISTRY: dict[str, dict[str, Callable[[Case], Callable[[], Any]]]] = {
    op: {
        name: functools.partial(_setup, provider)
        for name, provider in PROVIDERS.items()
        if provider.supports(op)
    }
    for op in OPS
}
