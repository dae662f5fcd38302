"""Public facades: logsumexp, softmax, log_softmax.

Each resolves the namespace once, validates and converts its arguments, and calls the
array-API kernel in :mod:`stablemath._kernels`, where the mathematics lives.
"""

from __future__ import annotations

import math
from typing import Any

from . import _fastpaths, _kernels, _triton
from ._lib._compat import array_namespace, device, finish
from ._lib._utils import (
    check_complex,
    check_temperature,
    compute_dtype,
    dtype_kind,
    float_dtype,
    normalize_axis,
)

__all__ = ["log_softmax", "logsumexp", "softmax"]

Array = Any


def _check_mask(xp: Any, where: Any, shape: tuple[int, ...], name: str = "where") -> Any:
    """``where`` must be boolean and broadcastable to ``shape``; return it broadcast."""
    if not xp.isdtype(where.dtype, "bool"):
        msg = f"{name} must be a boolean mask, got dtype {where.dtype}"
        raise TypeError(msg)
    try:
        bshape = _broadcast_shape(where.shape, shape)
    except ValueError:
        bshape = None
    if bshape != tuple(shape):
        msg = f"{name} of shape {tuple(where.shape)} does not broadcast to the input shape {tuple(shape)}"
        raise ValueError(msg)
    return where


def _broadcast_shape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    ndim = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (ndim - len(s)) + tuple(s) for s in shapes], strict=True):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            msg = f"shapes {shapes} do not broadcast"
            raise ValueError(msg)
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _normalize(
    func: str, x: Array, axis: int | tuple[int, ...] | None, t: float, where: Any, dtype: Any
) -> Array:
    """softmax and log_softmax, where no fast path took them: validate, then run the
    Triton kernels (torch tensors on a GPU) or the array-API kernel
    ``_kernels.<func>`` in the computing dtype. ``t`` is the checked temperature."""
    xp, (x, where) = array_namespace(x, where)
    check_complex(xp, x, func)
    out_dtype = float_dtype(xp, x) if dtype is None else dtype
    if dtype_kind(xp, out_dtype) != "real":
        msg = f"{func}: dtype must be a real floating dtype, got {out_dtype}"
        raise TypeError(msg)
    if where is not None:
        where = _check_mask(xp, where, x.shape)
    axes = normalize_axis(axis, x.ndim)
    if _triton.supports(x) and xp.finfo(out_dtype).bits <= xp.finfo(x.dtype).bits:
        fast = getattr(_triton, func)(x, axis=axes, temperature=t, where=where)
        return _finish(xp, fast, out_dtype)
    in_dtype = float_dtype(xp, x)
    work = compute_dtype(xp, in_dtype, out_dtype, device=device(x))
    if x.dtype != work:
        x = xp.astype(x, work)
    if any(x.shape[a] == 0 for a in axes):
        return _finish(xp, x, out_dtype)
    # input and output of at most half the working precision: the shift is exact and
    # a plain sum is accurate enough, no compensation needed
    narrow = max(xp.finfo(in_dtype).bits, xp.finfo(out_dtype).bits)
    compensate = 2 * narrow > xp.finfo(work).bits
    kernel = getattr(_kernels, func)
    result = kernel(x, axes=axes, live=where, compensate=compensate, xp=xp, t=t)
    return _finish(xp, result, out_dtype)


def _finish(xp: Any, result: Array, out_dtype: Any) -> Array:
    return finish(result, out_dtype, xp)


def softmax(
    x: Array,
    /,
    *,
    axis: int | tuple[int, ...] | None = -1,
    temperature: float = 1.0,
    where: Array | None = None,
    dtype: Any = None,
) -> Array:
    r"""Softmax along ``axis``, finite for every NaN-free input.

    .. math::

        \operatorname{softmax}(x)_i = \frac{e^{x_i/T - m}}{\sum_j e^{x_j/T - m}},
        \qquad m = \max_j x_j / T

    computed with the maximum subtracted (so ``exp`` never overflows) and the
    maximal entries counted separately.

    Parameters
    ----------
    x : array
        Logits, of any array library (lists and scalars use NumPy). Integer and
        boolean input is promoted to the library's default floating dtype.
    axis : int, tuple of int or None, default -1
        Axis or axes to normalise over jointly; None for all axes.
    temperature : float, default 1.0
        Positive, finite. The softmax of ``x / temperature``.
    where : array of bool, optional
        Broadcastable to ``x``. ``False`` entries are excluded exactly as if they were
        ``-inf``: probability 0 and gradient 0.
    dtype : dtype, optional
        Output floating dtype (default: the input's floating dtype).

    Returns
    -------
    array
        Same shape, library and device as ``x``; each slice sums to 1.

    Notes
    -----
    Edge cases, per slice along ``axis``:

    - some entries ``-inf`` or masked: 0 there;
    - all ``-inf`` or fully masked: all 0 (not NaN), gradient 0;
    - ``k`` entries ``+inf``: ``1/k`` there, 0 elsewhere (not NaN);
    - a NaN entry: the whole slice is NaN;
    - float16 and bfloat16 are computed in float32 and returned in their dtype.

    The gradient is the analytic one, ``p * (g - sum(g * p))``, everywhere: in a slice
    with ``+inf`` entries it is that formula with ``p`` the softmax above (``1/k`` at the
    ``+inf`` entries), the limit of the gradient of finite slices, finite (SPEC §3).

    Examples
    --------
    >>> import numpy as np
    >>> import stablemath as sm
    >>> sm.softmax(np.array([1000.0, 2000.0, 3000.0]))
    array([0., 0., 1.])
    >>> sm.softmax(np.array([[0.0, 0.0], [-np.inf, -np.inf]]))
    array([[0.5, 0.5],
           [0. , 0. ]])
    """
    t = check_temperature(temperature)
    if where is None and dtype is None and type(axis) is int:
        # before the namespace: the fast paths take NumPy arrays and torch tensors only
        fast = _fastpaths.softmax(x, axis, t)
        if fast is not None:
            return fast
    return _normalize("softmax", x, axis, t, where, dtype)


def log_softmax(
    x: Array,
    /,
    *,
    axis: int | tuple[int, ...] | None = -1,
    temperature: float = 1.0,
    where: Array | None = None,
    dtype: Any = None,
) -> Array:
    r"""Logarithm of the softmax along ``axis``, accurate and NaN-free.

    .. math::

        \operatorname{log\_softmax}(x)_i = (x_i/T - m) - \log\Big(k + \sum_{j:\,x_j/T<m}
        e^{x_j/T - m}\Big), \qquad m = \max_j x_j/T

    with ``k`` the number of entries equal to the maximum and the logarithm taken as
    ``log(k) + log1p(s/k)``, so that a dominant term keeps full relative precision.

    Parameters
    ----------
    x : array
        Logits, of any array library (lists and scalars use NumPy).
    axis : int, tuple of int or None, default -1
        Axis or axes to normalise over jointly; None for all axes.
    temperature : float, default 1.0
        Positive, finite. The log-softmax of ``x / temperature``.
    where : array of bool, optional
        Broadcastable to ``x``. ``False`` entries are excluded as if ``-inf``:
        log-probability ``-inf`` there, gradient 0.
    dtype : dtype, optional
        Output floating dtype (default: the input's floating dtype).

    Returns
    -------
    array
        Same shape, library and device as ``x``; every value ``<= 0``.

    Notes
    -----
    Edge cases, per slice along ``axis``: ``-inf`` or masked entries give ``-inf``; an
    all ``-inf`` or fully masked slice gives all ``-inf`` (gradient 0); ``k`` entries
    ``+inf`` give ``-log(k)`` there and ``-inf`` elsewhere; a NaN makes the slice NaN.
    Unlike ``log(softmax(x))`` it never gives ``-inf`` for a finite logit.

    The gradient is the analytic one, ``g - p * sum(g)`` (``p`` the softmax), summed
    over the live entries; in a slice with ``+inf`` entries it is the same formula with
    ``p = 1/k`` at those entries (the limit of finite slices), and finite.

    Examples
    --------
    >>> import numpy as np
    >>> import stablemath as sm
    >>> sm.log_softmax(np.array([1000.0, 1.0, -1000.0]))
    array([    0.,  -999., -2000.])
    """
    t = check_temperature(temperature)
    if where is None and dtype is None and type(axis) is int:
        fast = _fastpaths.log_softmax(x, axis, t)
        if fast is not None:
            return fast
    return _normalize("log_softmax", x, axis, t, where, dtype)


def logsumexp(
    x: Array,
    /,
    *,
    axis: int | tuple[int, ...] | None = -1,
    keepdims: bool = False,
    b: Array | None = None,
    return_sign: bool = False,
    where: Array | None = None,
) -> Array | tuple[Array, Array]:
    r"""``log(sum(b * exp(x)))`` along ``axis``, without overflow or lost precision.

    .. math::

        \operatorname{logsumexp}(x) = m + \log k + \operatorname{log1p}\Big(\frac1k
        \sum_{j:\,x_j<m} e^{x_j - m}\Big), \qquad m = \max_j x_j

    where ``k`` counts the entries equal to the maximum: ``logsumexp([0, -40])`` keeps
    full relative precision. With ``b`` the maximal entries contribute their summed
    weight instead of ``k``.

    Parameters
    ----------
    x : array
        Real or complex input, of any array library (lists and scalars use NumPy).
    axis : int, tuple of int or None, default -1
        Axis or axes to reduce; None for all axes.
    keepdims : bool, default False
        Keep the reduced axes with size 1.
    b : array, optional
        Scaling factors broadcastable with ``x`` (the result has the broadcast shape).
        May be negative or zero; entries with ``b == 0`` take no part at all.
    return_sign : bool, default False
        Return ``(log|s|, sign(s))`` for the sum ``s``. Without it, a negative sum
        gives NaN (its logarithm is undefined). For complex input the sign is the
        complex phase ``s / |s|``.
    where : array of bool, optional
        Broadcastable to ``x``; ``False`` entries are excluded as if ``-inf``
        (gradient 0 there).

    Returns
    -------
    array or (array, array)
        A 0-d array when every axis is reduced, never a Python float.

    Notes
    -----
    Edge cases, per slice: ``-inf`` or masked entries are ignored; an all ``-inf``,
    fully masked or empty slice gives ``-inf`` (gradient 0, sign 0); ``+inf`` entries
    give ``+inf`` (gradient ``1/k`` at each of the ``k`` ``+inf`` entries, the limit of
    the softmax); a NaN gives NaN. Half precision is computed in float32. Complex
    input gives a complex result whose imaginary part lies in ``(-pi, pi]``, as in
    :func:`scipy.special.logsumexp`.

    Examples
    --------
    >>> import numpy as np
    >>> import stablemath as sm
    >>> sm.logsumexp(np.array([1000.0, 1000.0]))
    array(1000.69314718)
    >>> sm.logsumexp(np.array([1.0, 2.0]), b=np.array([1.0, -1.0]), return_sign=True)
    (array(1.54132485), array(-1.))
    """
    if b is None and where is None and not return_sign and type(axis) is int:
        # before the namespace: the fast paths take NumPy arrays and torch tensors only
        fast = _fastpaths.logsumexp(x, axis, keepdims)
        if fast is not None:
            return fast
    xp, (x, b, where) = array_namespace(x, b, where)
    if b is None and not return_sign and _triton.supports(x):
        if where is not None:
            where = _check_mask(xp, where, tuple(x.shape))
        axes = normalize_axis(axis, x.ndim)
        return _triton.logsumexp(x, axis=axes, keepdims=keepdims, where=where)
    dt = float_dtype(xp, x)
    work = compute_dtype(xp, dt, device=device(x))
    if x.dtype != work:
        x = xp.astype(x, work)
    shape = tuple(x.shape)
    if b is not None:
        if xp.isdtype(b.dtype, "bool") or not xp.isdtype(b.dtype, "numeric"):
            msg = f"b must be a numeric array, got dtype {b.dtype}"
            raise TypeError(msg)
        shape = _broadcast_shape(shape, tuple(b.shape))
        x, b = xp.broadcast_to(x, shape), xp.broadcast_to(b, shape)
        if b.dtype != x.dtype and not xp.isdtype(x.dtype, "complex floating"):
            b = xp.astype(b, x.dtype)
    if where is not None:
        where = _check_mask(xp, where, shape)
    axes = normalize_axis(axis, len(shape))
    complex_input = xp.isdtype(x.dtype, "complex floating")
    out_dtype = dt
    if complex_input and return_sign:
        out_dtype = xp.real(xp.empty(0, dtype=dt, device=device(x))).dtype

    if any(shape[a] == 0 for a in axes):
        out_shape = tuple(
            (1 if keepdims else None) if i in axes else n for i, n in enumerate(shape)
        )
        out_shape = tuple(n for n in out_shape if n is not None)
        res = xp.full(out_shape, -math.inf, dtype=out_dtype, device=device(x))
        if return_sign:
            return res, xp.zeros(out_shape, dtype=dt, device=device(x))
        return res

    kernel = _kernels.logsumexp_complex if complex_input else _kernels.logsumexp
    out = kernel(x, axes=axes, keepdims=keepdims, live=where, b=b, return_sign=return_sign, xp=xp)
    if return_sign:
        res, sign = out
        sign_dtype = dt if complex_input else out_dtype
        return _finish(xp, res, out_dtype), _finish(xp, sign, sign_dtype)
    return _finish(xp, out, out_dtype)
