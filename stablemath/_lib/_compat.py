"""Everything that knows which array library it is talking to.

This is the one module that imports ``array_api_compat`` and the one place where a
backend is named. The math in :mod:`stablemath._kernels` only calls ``xp.*`` functions
of the array API standard; whatever the standard cannot express lives here, each with
the reason it is needed:

* resolving the namespace of the inputs (lists and Python scalars use NumPy, as SciPy
  does; arrays of two libraries in one call are an error naming both);
* deciding whether an array's *values* may be inspected (to raise on a bad target):
  not for JAX tracers, Dask's lazy arrays, or inside ``torch.compile``, where a
  ``bool(xp.any(...))`` is a graph break or impossible;
* turning NumPy's 0-d results, which NumPy hands back as ``np.float64`` scalars, into
  0-d arrays, so that every reduction returns an array of the caller's library.

No backend library is imported here: each is recognised by the module of the array's
type, so ``import stablemath`` imports neither torch nor JAX.
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "array_namespace",
    "can_inspect_values",
    "device",
    "ensure_array",
    "library_name",
]

device = array_api_compat.device


def _is_array(obj: Any) -> bool:
    return array_api_compat.is_array_api_obj(obj) and not isinstance(obj, np.generic)


def library_name(obj: Any) -> str:
    """The name of the library an array comes from (``"torch"``, ``"numpy"``, ...)."""
    if array_api_compat.is_numpy_array(obj):
        return "numpy"
    if array_api_compat.is_torch_array(obj):
        return "torch"
    if array_api_compat.is_jax_array(obj):
        return "jax"
    if array_api_compat.is_dask_array(obj):
        return "dask"
    if array_api_compat.is_cupy_array(obj):
        return "cupy"
    return type(obj).__module__.split(".")[0]


def array_namespace(*args: Any) -> tuple[Any, list[Any]]:
    """Resolve the array API namespace of ``args`` and return it with the arrays.

    ``None`` entries pass through unchanged. Lists, tuples and Python or NumPy scalars
    are converted with the namespace of the array arguments, or with NumPy when no
    argument is an array (the convention of :mod:`scipy.special`).

    Raises
    ------
    TypeError
        If the arrays come from two different libraries.
    """
    arrays = [a for a in args if a is not None and _is_array(a)]
    if arrays:
        first = arrays[0]
        for other in arrays[1:]:
            if type(other) is not type(first):
                a, b = library_name(first), library_name(other)
                if a != b:
                    msg = (
                        f"arrays from two different libraries in one call: {a} "
                        f"({type(first).__name__}) and {b} ({type(other).__name__}); "
                        "convert them to one library first"
                    )
                    raise TypeError(msg)
        xp = array_api_compat.array_namespace(*arrays)
        dev = device(first)
    else:
        xp = array_api_compat.array_namespace(np.empty(0))
        dev = None
    out = [
        a if a is None or _is_array(a) else (xp.asarray(a, device=dev) if arrays else np.asarray(a))
        for a in args
    ]
    return xp, out


def can_inspect_values(x: Any) -> bool:
    """Whether the concrete values of ``x`` can be read without tracing problems.

    ``array_api_compat.is_lazy_array`` is True for every JAX array, concrete ones too,
    so it cannot answer this; the tracer type, Dask's laziness and torch's compiler
    state do.
    """
    if array_api_compat.is_dask_array(x):
        return False
    if array_api_compat.is_jax_array(x):
        jax_core = sys.modules["jax"].core
        return not isinstance(x, jax_core.Tracer)
    if array_api_compat.is_torch_array(x):
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling():
            return False
        return x.device.type != "meta"
    return True


def ensure_array(result: Any, xp: Any) -> Any:
    """Return NumPy's scalar results as 0-d arrays; every other result unchanged."""
    if isinstance(result, np.generic):
        return np.asarray(result)
    return result
