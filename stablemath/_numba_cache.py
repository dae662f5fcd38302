"""Numba's disk cache for the compiled functions that the kernel modules make inside
other functions (one per kernel, dtype or kind).

Numba keys its cache entry of such a function (a closure) by the values it captures,
pickled. A pickled Numba function or cfunc carries an identifier that Numba draws at
random in each process, so every closure that captured one (a kernel, another
closure) missed the cache in every new process: it was compiled again, with the
kernels it calls, and its entry was written to the cache again. With a filled cache,
the first calls of ``benchmarks/first_call.py`` took 4.5 s in all on torch and 21.9 s
on JAX (a cross-entropy 7.8 s), and the cache grew by 1.8 MB and 6.4 MB a process;
now 0.5 s and 0.9 s, and it does not grow.

:func:`njit` and :func:`cfunc` here compile with a cache keyed instead by what the
captured values are: a function by its module, name and, recursively, its own
captured values; a type by its name; a number, string or tuple by its value; and,
since that names code rather than holding it, the modification stamps of the
modules that hold the kernels. A captured value of any other kind leaves the
function with Numba's own key. The compiled code may not depend on anything else of
the process (an address: :func:`stablemath._xla_ffi._handler` looks its task and its
row runner up by symbol name).
"""

from __future__ import annotations

import hashlib
import os
import types
from typing import Any

import numba
from numba.core.caching import FunctionCache
from numba.core.ccallback import CFunc
from numba.core.dispatcher import Dispatcher
from numba.core.sigutils import normalize_signature

# the files whose code the keyed functions call (a change to any of them is a new key)
_MODULES = ("_cpu_kernels.py", "_cpu_team.py", "_xla_ffi.py", "_numba_cache.py")


def _stamps() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    parts = []
    for name in _MODULES:
        st = os.stat(os.path.join(here, name))
        parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
    return ";".join(parts)


_STAMPS = _stamps()


def identity(value: Any) -> str | None:
    """A description of ``value`` that is the same in every process, as far as the
    compiled code can depend on it; None where there is none."""
    if isinstance(value, Dispatcher):
        return _function_identity(value.py_func, _options(value.targetoptions))
    if isinstance(value, CFunc):
        return _function_identity(value._pyfunc, "cfunc")
    if isinstance(value, types.FunctionType):
        return _function_identity(value, "python")
    if isinstance(value, type):
        return f"type {value.__module__}.{value.__qualname__}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, tuple):
        parts = [identity(v) for v in value]
        return None if None in parts else f"({', '.join(parts)})"  # type: ignore[arg-type]
    return None


def _options(options: dict[str, Any]) -> str:
    """Numba's options of a function, sets sorted (their order changes with the process's
    string hashes)."""
    items = sorted(options.items())
    return repr([(k, sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in items])


def _function_identity(func: Any, kind: str) -> str | None:
    cells = [identity(cell.cell_contents) for cell in func.__closure__ or ()]
    if None in cells:
        return None
    code = func.__code__
    where = f"{func.__module__}.{func.__qualname__}:{code.co_firstlineno}"
    return f"{kind} {where}[{', '.join(cells)}]"  # type: ignore[arg-type]


class _KeyedCache(FunctionCache):
    """Numba's cache of one function, its entries keyed by :func:`identity` of the
    function instead of by its captured values pickled."""

    def __init__(self, py_func: Any, key: str) -> None:
        super().__init__(py_func)
        self._key = key

    def _index_key(self, sig: Any, codegen: Any) -> Any:
        code = hashlib.sha256(self._py_func.__code__.co_code).hexdigest()
        key = hashlib.sha256(f"{self._key}|{_STAMPS}".encode()).hexdigest()
        return (sig, codegen.magic_tuple(), (code, key))


def _cache_for(func: Any) -> FunctionCache:
    key = _function_identity(func, "compiled")
    return FunctionCache(func) if key is None else _KeyedCache(func, key)


def njit(**options: Any) -> Any:
    """``numba.njit(cache=True, **options)`` for a function made inside another."""

    def decorate(func: Any) -> Any:
        dispatcher = numba.njit(**options)(func)
        dispatcher._cache = _cache_for(func)  # what enable_caching would set, keyed
        return dispatcher

    return decorate


def cfunc(sig: Any, **options: Any) -> Any:
    """``numba.cfunc(sig, cache=True, **options)`` for a function made inside another."""

    def decorate(func: Any) -> Any:
        compiled = CFunc(func, normalize_signature(sig), locals={}, options=options)
        compiled._cache = _cache_for(func)
        compiled.compile()
        return compiled

    return decorate
