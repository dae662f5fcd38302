"""Argument helpers shared by the public facades: axes, dtypes, scalar options.

Everything here works on shapes, dtypes and Python values only, never on array values,
so it is safe under ``jax.jit`` and ``torch.compile``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from ._compat import widest_float

__all__ = [
    "check_complex",
    "check_temperature",
    "compute_dtype",
    "float_dtype",
    "normalize_axis",
    "single_axis",
]


def normalize_axis(axis: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    """Return ``axis`` as a sorted tuple of non-negative ints.

    Raises
    ------
    ValueError
        If an axis is out of range for ``ndim`` or repeated.
    TypeError
        If ``axis`` is not an int, a tuple of ints or None.
    """
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple | list) else (axis,)
    out = []
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            msg = f"axis must be an int, a tuple of ints or None, got {axis!r}"
            raise TypeError(msg) from None
        if not -ndim <= a < ndim:
            msg = f"axis {a} is out of range for an array with ndim={ndim}"
            raise ValueError(msg)
        out.append(a % ndim)
    if len(set(out)) != len(out):
        msg = f"axis {axis!r} repeats an axis (ndim={ndim})"
        raise ValueError(msg)
    return tuple(sorted(out))


def single_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Return the one class axis of a loss as a non-negative int."""
    if isinstance(axis, tuple | list) or axis is None:
        msg = f"{name} must be a single int for a loss (the class axis), got {axis!r}"
        raise TypeError(msg)
    return normalize_axis(axis, ndim)[0]


# (type of the dtype, dtype) -> "real" | "complex" | "other". The type comes first in
# the key so that dtypes of different libraries with equal hashes are never compared
# (array-api-strict warns when its dtypes meet NumPy's).
_KINDS: dict[tuple[type, Any], str] = {}


def dtype_kind(xp: Any, dtype: Any) -> str:
    """``"real"`` (real floating), ``"complex"``, ``"integer"`` (signed or unsigned) or
    ``"other"`` (bool), cached per dtype: ``isdtype`` costs microseconds per call on
    NumPy and torch, and every call needs it."""
    key = (type(dtype), dtype)
    kind = _KINDS.get(key)
    if kind is None:
        if xp.isdtype(dtype, "real floating"):
            kind = "real"
        elif xp.isdtype(dtype, "complex floating"):
            kind = "complex"
        elif xp.isdtype(dtype, "integral"):
            kind = "integer"
        else:
            kind = "other"
        _KINDS[key] = kind
    return kind


def check_complex(xp: Any, x: Any, func: str) -> None:
    """Reject complex input for functions whose result would be meaningless on it."""
    if dtype_kind(xp, x.dtype) == "complex":
        msg = f"{func} does not accept complex input (got dtype {x.dtype}); use real logits"
        raise TypeError(msg)


def float_dtype(xp: Any, x: Any) -> Any:
    """The floating dtype ``x`` is computed as: its own, or the default floating dtype
    of its namespace for integer and boolean input."""
    if dtype_kind(xp, x.dtype) in ("real", "complex"):
        return x.dtype
    info = xp.__array_namespace_info__()
    return info.default_dtypes(device=None)["real floating"]


def compute_dtype(xp: Any, dtype: Any, out_dtype: Any = None, device: Any = None) -> Any:
    """The real floating dtype the arithmetic runs in.

    Inputs of 32 bits or fewer run in float64 where the namespace offers it on that
    device (NumPy, PyTorch, CuPy, Dask, array-api-strict, JAX with x64 enabled): the
    results are then rounded once, at the end, and stay within an ulp of the exact
    value, where float32 arithmetic alone loses several ulp in ``exp`` and in the sum.
    Elsewhere they run in float32 (half precision sums would overflow at 65504). The
    output dtype, if larger, wins.
    """
    work = dtype
    if xp.isdtype(work, "complex floating"):
        return work
    if xp.finfo(work).bits <= 32:
        work = widest_float(xp, device)
    if out_dtype is not None and xp.finfo(out_dtype).bits > xp.finfo(work).bits:
        work = out_dtype
    return work


def check_temperature(temperature: Any) -> float:
    """``temperature`` must be a positive, finite Python number."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        msg = f"temperature must be a positive finite float, got {temperature!r}"
        raise TypeError(msg) from None
    if not (math.isfinite(t) and t > 0):
        msg = f"temperature must be a positive finite float, got {temperature!r}"
        raise ValueError(msg)
    return t
