"""The mathematics of stablemath, written once against the array API standard.

Every function here takes the namespace ``xp`` as a keyword, calls only ``xp.*``
functions of the standard, and branches only on shapes, dtypes and Python options,
never on array values (so it traces under ``jax.jit`` and ``torch.compile`` and never
synchronises a GPU). Arguments arrive validated and in the dtype the arithmetic runs
in (float32 at least); the facades in ``_reductions.py`` and ``_losses.py`` do that.

The shared core is :func:`_shift` and :func:`_log_sum`. For a slice ``x`` along the
reduced axes, with ``m = max(x)`` over the live entries:

* ``z = x - m`` (the shifted logits, ``<= 0``), but ``m`` replaced by 0 where it is not
  finite, because ``(-inf) - (-inf)`` and ``inf - inf`` are NaN;
* the ``k`` entries with ``z == 0`` (the maximum, ties counted) are taken out of the
  sum, so that ``log(sum(exp(z))) = log(k) + log1p(s / k)`` with ``s`` the sum of the
  others: full relative precision when one term dominates (``logsumexp([0, -40])``);
* rows whose maximum is ``+inf`` keep ``z = 0`` at their ``+inf`` entries and ``-inf``
  elsewhere (the limit), rows whose maximum is ``-inf`` (all ``-inf`` or fully masked)
  have ``z = -inf`` everywhere, and a NaN in a live entry makes its slice NaN.

The "double where" rule is kept throughout: no branch of any ``where`` computes
``inf - inf``, ``0 * inf`` or ``log(0)``, so no NaN leaks into a gradient through the
branch that was not selected.

Gradients are those of the formulas, which are the analytic ones, with one rule given
by hand: the derivative of the shift ``(m, z)`` (:func:`_shift_jvp`,
:func:`_shift_vjp`, attached by :func:`stablemath._lib._compat.with_derivative`).
In a finite row it is what autodiff of ``x - max(x)`` gives: ``dz = dx - w . dx`` with
``w`` spread evenly over the tied maxima, ``dm = w . dx`` (at a masked entry,
``z = -inf - m``, only ``-dm``). A ``+inf`` row gets the same rule, which no
elementwise formula can express (every function of ``x`` that is finite at
``x = +inf`` has derivative 0 there): its ``z`` is constant, yet the rule makes every
gradient the limit of the finite-row one (SPEC §3), e.g. ``softmax - onehot(t)`` for
the cross-entropy. All ``-inf`` rows have ``dz = 0``.
"""

from __future__ import annotations

import math
from typing import Any

from ._lib._compat import device, with_derivative

__all__ = [
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "logsumexp_complex",
    "nll_loss",
    "softmax",
]

_INF = math.inf
# see softmax: keeps the corrections of a tiny quotient in the normal range
_QUOTIENT_SCALE = 2.0**64


def _zeros_like_scalar(a: Any, *, xp: Any) -> Any:
    """A 0-d zero of ``a``'s dtype and device (``where`` takes at most one scalar)."""
    return xp.zeros((), dtype=a.dtype, device=device(a))


def _count(mask: Any, like: Any, axes: tuple[int, ...], *, xp: Any) -> Any:
    """The number of True entries of ``mask`` over ``axes`` (kept dims), in ``like``'s
    dtype: a sum of ``where(mask, 1, 0)``, which XLA on CPU reduces 3x faster over
    long rows than a sum of the converted booleans."""
    one = xp.ones((), dtype=like.dtype, device=device(like))
    return xp.sum(xp.where(mask, one, 0.0), axis=axes, keepdims=True)


def _live_max(x: Any, live: Any, axes: tuple[int, ...], *, xp: Any) -> tuple[Any, Any]:
    """``(xm, m)``: ``x`` with the masked entries ``-inf``, and its max (kept dims)."""
    xm = x if live is None else xp.where(live, x, -_INF)
    return xm, xp.max(xm, axis=axes, keepdims=True)


def _shift_value(x: Any, live: Any, axes: tuple[int, ...], *, xp: Any) -> tuple[Any, Any]:
    """``(m, z)``: the max over live entries and the shifted logits (the values; their
    derivative is :func:`_shift_jvp`)."""
    xm, m = _live_max(x, live, axes, xp=xp)
    finite = xp.isfinite(m)
    m0 = xp.where(finite, m, 0.0)
    # Rows with a finite max subtract it. In a NaN row only the NaN entries do, so the
    # NaN reaches the sum while the other entries stay in range (no overflow of exp).
    # In a +inf row the +inf entries become 0 and the rest -inf; in a -inf row all -inf.
    subtract = finite | xp.isnan(xm)
    zero = _zeros_like_scalar(x, xp=xp)
    z = xp.where(subtract, xm - m0, xp.where(xm == _INF, zero, -_INF))
    return m, z


def _shift_weights(x: Any, live: Any, axes: tuple[int, ...], *, xp: Any) -> tuple[Any, Any, Any]:
    """``(r, a, w)`` of the shift's derivative: ``r`` marks the rows whose max is not
    ``-inf`` (kept dims), ``a`` the entries of those rows that are live, ``w`` is
    ``1/k`` at the ``k`` tied maxima of each row and 0 elsewhere (0 in a NaN row)."""
    xm, m = _live_max(x, live, axes, xp=xp)
    tie = xm == m
    k = _count(tie, x, axes, xp=xp)
    w = xp.where(tie, 1.0 / xp.where(k > 0, k, 1.0), 0.0)
    r = m != -_INF
    return r, r if live is None else r & live, w


def _shift_jvp(x: Any, live: Any, axes: tuple[int, ...], dx: Any, *, xp: Any) -> tuple[Any, Any]:
    """Tangents ``(dm, dz)`` of :func:`_shift_value` along ``dx``: ``dm = w . dx`` and
    ``dz = a * dx - dm`` in the rows ``r`` (a masked entry's ``z``, ``-inf - m``,
    moves with ``m`` like ``x - m`` does), ``dz = 0`` in all ``-inf`` rows."""
    r, a, w = _shift_weights(x, live, axes, xp=xp)
    dm = xp.sum(w * dx, axis=axes, keepdims=True)
    return dm, xp.where(r, xp.where(a, dx, 0.0) - dm, 0.0)


def _shift_vjp(x: Any, live: Any, axes: tuple[int, ...], gm: Any, gz: Any, *, xp: Any) -> Any:
    """Cotangent of ``x`` from those of ``(m, z)``: the transpose of :func:`_shift_jvp`,
    ``gx = a * gz + w * (gm - sum(r * gz))``."""
    r, a, w = _shift_weights(x, live, axes, xp=xp)
    total = xp.sum(xp.where(r, gz, 0.0), axis=axes, keepdims=True)
    return xp.where(a, gz, 0.0) + w * (gm - total)


_shift_with_derivative = with_derivative(_shift_value, _shift_jvp, _shift_vjp)


def _shift(x: Any, axes: tuple[int, ...], live: Any, *, xp: Any) -> tuple[Any, Any, Any]:
    """Return ``(m, m0, z)``: the max over live entries, its finite stand-in, the
    shifted logits. ``live`` is a boolean mask or None (all live)."""
    m, z = _shift_with_derivative(x, live, axes, xp=xp)
    return m, xp.where(xp.isfinite(m), m, 0.0), z


def _shift_remainder(x: Any, m0: Any, z: Any, live: Any, *, xp: Any) -> Any:
    """The rounding error of the shift, ``(x - m0) - z``, exactly (Knuth's TwoSum).

    ``x - m0`` is rounded to ``z`` with an absolute error up to ``|z| * eps / 2``, which
    ``exp`` turns into a relative error of the same size: 30 ulp at ``z = -60``. Adding
    the remainder back keeps softmax within an ulp or two of the exact value. The
    remainder is 0 wherever ``z`` or ``x`` is not finite (or the entry is masked), and
    its derivative is exactly 0, so gradients are unchanged.
    """
    ok = xp.isfinite(z) & xp.isfinite(x)
    if live is not None:
        ok = ok & live
    a = xp.where(ok, x, m0)
    s = a - m0
    bv = s - a
    return (a - (s - bv)) - (m0 + bv)


def _accurate_sum(v: Any, axes: tuple[int, ...], *, xp: Any) -> tuple[Any, Any]:
    """``sum(v, axis=axes, keepdims=True)`` as an unevaluated pair ``hi + lo``.

    A pairwise sum whose every addition is made error-free (TwoSum). A plain sum of
    ``n`` terms is off by up to ``log2(n)`` roundings, which the softmax denominator
    passes on to every probability; the pair is accurate to far below an ulp of
    ``hi``. The row is padded with zeros to a power of two once, each level adds its
    two contiguous halves, and the rounding errors travel the same tree elementwise
    (their own rounding is an ulp of an ulp): no reduction at all, which XLA fuses
    far better than one reduction of the errors per level. Measured against that
    (``_accurate_sum`` alone, median of 15, 2-core VM): JAX float32 (jit) 0.54x the
    time at 4096x1000 and 0.71x at 256x32000; eager NumPy and torch float64, which
    only reach this for float64 input, 1.1-1.8x (two more elementwise passes).
    (The derivative of each error term is exactly 0, so gradients are those of a
    plain sum.)
    """
    ndim = v.ndim
    rest = tuple(i for i in range(ndim) if i not in axes)
    keep_shape = tuple(1 if i in axes else v.shape[i] for i in range(ndim))
    v = xp.permute_dims(v, rest + axes)
    n = math.prod(v.shape[len(rest) :])
    v = xp.reshape(v, (*v.shape[: len(rest)], n))
    width = 1 << (n - 1).bit_length()
    if width > n:
        pad = xp.zeros((*v.shape[:-1], width - n), dtype=v.dtype, device=device(v))
        v = xp.concat((v, pad), axis=-1)
    err = None
    while width > 1:
        width //= 2
        a, b = v[..., :width], v[..., width:]
        v = a + b
        bv = v - a
        e = (a - (v - bv)) + (b - bv)
        err = e if err is None else (err[..., :width] + err[..., width:]) + e
    hi = xp.reshape(v, keep_shape)
    lo = xp.zeros_like(hi) if err is None else xp.reshape(err, keep_shape)
    return hi, lo


def _log_sum(z: Any, axes: tuple[int, ...], *, xp: Any, low: Any = None) -> tuple[Any, Any, Any]:
    """Return ``(e, total, log_total)`` with ``e = exp(z + low)``, ``total = sum(e)``
    and ``log_total = log(total)``, the maximal entries taken out of the sum for
    accuracy. ``low`` is the optional remainder of the shift (:func:`_shift_remainder`).

    ``total`` is 1 (not 0) in a slice that is all ``-inf``, so that ``e / total`` is 0.

    A slice with no entry at exactly 0 but a positive sum is one whose maximal entry a
    compiler shifted to a rounding error from 0 (XLA on the CPU rounds ``x / T`` one
    way in the reduction that finds the maximum and another in the shift, under jit):
    its maximal term is then in ``s``, and ``log(s)`` is the answer (``log1p(s)``, as
    for a counted maximum, gave ``log 2`` too much).
    """
    e = xp.exp(z)
    if low is not None:
        # exp(z + low) = exp(z) * (1 + low) to within low**2, far below an ulp
        e = e + e * low
    top = z == 0
    k = _count(top, z, axes, xp=xp)
    rest = xp.where(top, 0.0, e)
    if low is None:
        s = xp.sum(rest, axis=axes, keepdims=True)
    else:
        hi, lo = _accurate_sum(rest, axes, xp=xp)
        s = hi + lo
    counted = k > 0
    k1 = xp.where(counted, k, 1.0)
    # s is 0 only in an all -inf slice (total 1 there); NaN stays NaN
    s1 = xp.where(s == 0, 1.0, s)
    total = xp.where(counted, k1 + s, s1)
    return e, total, xp.where(counted, xp.log(k1) + xp.log1p(s / k1), xp.log(s1))


def _lse_from_parts(m: Any, m0: Any, log_total: Any, *, xp: Any) -> Any:
    """``m + log_total`` for finite (and NaN) maxima; ``m`` itself where it is ``+inf``
    (its gradient, the limit of softmax, goes to the ``+inf`` entries); a constant
    ``-inf`` for an all ``-inf`` slice (gradient 0)."""
    regular = xp.isfinite(m) | xp.isnan(m)
    return xp.where(regular, m0 + log_total, xp.where(m > 0, m, -_INF))


def _squeeze(a: Any, axes: tuple[int, ...], keepdims: bool, *, xp: Any) -> Any:
    return a if keepdims or not axes else xp.squeeze(a, axis=axes)


def _divided(z: Any, t: float, *, xp: Any) -> Any:
    """The shifted logits ``z`` (at most 0) over the temperature ``t``. Where ``t < 1``
    a quotient beyond the dtype's range is -inf, without an overflow (NumPy would
    warn) and with z's NaN kept; -inf itself is divided, which keeps its derivative
    1 / t (a cross-entropy's target at -inf has gradient -1 / t)."""
    if t >= 1.0:
        return z / t
    over = (z < -(float(xp.finfo(z.dtype).max) * t)) & (z > -_INF)
    return xp.where(over, -_INF, xp.where(over, 0.0, z) / t)


def _scaled_shift(
    x: Any, axes: tuple[int, ...], live: Any, t: float, compensate: bool, *, xp: Any
) -> tuple[Any, Any]:
    """``(z, low)``: the shifted logits of ``x / t``, ``(x - m) / t``, and (with
    ``compensate``) the rounding error of forming them, exactly enough that
    ``z + low`` is ``(x - m) / t`` to far below an ulp (else ``low`` is None).

    The temperature divides after the shift, never before: ``x - m`` is exactly 0 at
    the maximal entries however a compiler evaluates it, while ``x / t`` is not one
    number under XLA on the CPU (rounded through the reciprocal in the reduction that
    finds the maximum, by a division elsewhere), which left no entry at 0 and made
    ``log_softmax`` ``-log 2`` at the maximum, under jit. The quotient's own rounding
    is recovered as ``z - q t`` (Dekker's product; exact, by Sterbenz, for ``q t``
    within an ulp of ``z``)."""
    _, m0, z = _shift(x, axes, live, xp=xp)
    low = _shift_remainder(x, m0, z, live, xp=xp) if compensate else None
    if t == 1.0:
        return z, low
    q = _divided(z, t, xp=xp)
    if low is None:
        return q, None
    # only where exp(q) can be nonzero (|q| <= 2048): elsewhere, and at -inf and NaN,
    # the remainder is 0, and no branch computes inf - inf or splits a huge number
    near = xp.abs(q) <= 2048.0
    qn = xp.where(near, q, 0.0)
    p, p_err = _two_product(qn, xp.asarray(t, dtype=q.dtype, device=device(q)), xp=xp)
    rem = (xp.where(near, z, 0.0) - p) - p_err
    return q, (low + rem) / t


def softmax(
    x: Any, /, *, axes: tuple[int, ...], live: Any, compensate: bool, xp: Any, t: float = 1.0
) -> Any:
    """``exp(x/t - m) / sum(exp(x/t - m))`` over ``axes``; 0 at masked entries.

    ``compensate=False`` is for inputs widened from a dtype of at most half the
    precision (float32 computed in float64): there ``x - m`` is exact and a plain sum
    is far more accurate than the output needs, so the error-free corrections of the
    shift and of the sum are skipped (half the passes over the data).
    """
    z, low = _scaled_shift(x, axes, live, t, compensate, xp=xp)
    e = xp.exp(z)
    if not compensate:
        total = xp.sum(e, axis=axes, keepdims=True)
        return e / xp.where(total == 0, 1.0, total)
    # E / Z rather than exp(x - lse): the latter loses relative accuracy on long rows.
    # E = e + e_lo (exp of the exact shift, to first order) and Z = hi + lo are both
    # carried as pairs, and the quotient is corrected by its exact residual
    # (:func:`_divide_pairs`), so each probability has the error of ``exp`` plus one
    # final rounding. Z = 0 only in an all -inf slice (E = 0).
    # The corrections of the quotient are about 2**-24 of it: for a float32
    # probability below 1e-31 they are subnormal, and a backend that flushes subnormals
    # (XLA on CPU) would drop them (58 ulp at 7e-37). So E is formed scaled by 2**64
    # (exact, E <= 1), summed so, the two numbers of the total scaled back (exact: the
    # total is at least 1), and the quotient too. One product E * low serves the sum
    # and the quotient: a second one, unscaled, for the sum made XLA run the two
    # branches as concurrent fusions, and a 1x10 softmax under jit took 7-54 us
    # instead of 4.6.
    es = e * _QUOTIENT_SCALE
    es_lo = es * low
    hi, lo = _accurate_sum(es + es_lo, axes, xp=xp)
    hi, lo = hi * (1.0 / _QUOTIENT_SCALE), lo * (1.0 / _QUOTIENT_SCALE)
    q = _divide_pairs(es, es_lo, xp.where(hi == 0, 1.0, hi), lo, xp=xp)
    return q * (1.0 / _QUOTIENT_SCALE)


def _split(a: Any, *, xp: Any) -> tuple[Any, Any]:
    """Veltkamp's split ``a = a_hi + a_lo`` into halves of the significand, exactly
    (no overflow for the ``|a| <= 2**900`` it is used on)."""
    digits = 1 - round(math.log2(float(xp.finfo(a.dtype).eps)))  # 24, 53
    c = (2.0 ** -(-digits // 2) + 1.0) * a
    a_hi = c - (c - a)
    return a_hi, a - a_hi


def _two_product(a: Any, b: Any, *, xp: Any) -> tuple[Any, Any]:
    """``(p, e)`` with ``p = fl(a * b)`` and ``p + e = a * b`` exactly (Dekker's
    product; the standard has no ``fma``)."""
    p = a * b
    a_hi, a_lo = _split(a, xp=xp)
    b_hi, b_lo = _split(b, xp=xp)
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _divide_pairs(a: Any, a_lo: Any, b: Any, b_lo: Any, *, xp: Any) -> Any:
    """``(a + a_lo) / (b + b_lo)`` for ``|a_lo| << |a|``, ``|b_lo| << |b|``, to within
    one rounding, where ``b`` has one value per slice (kept dims).

    The reciprocal of the slice's pair is formed once per slice as ``r + r_lo``
    (``r = 1 / b`` refined by its exact residual ``1 - b r``), so that every element
    costs multiplications only: ``a r`` exactly (Dekker's product) plus the small
    terms ``a r_lo + a_lo r``, rounded once. Every correction has derivative 0 up to
    rounding, so the gradient is the quotient rule's."""
    r = 1.0 / b
    p, p_err = _two_product(b, r, xp=xp)
    # 1 - p is exact (Sterbenz: p is within a rounding of 1)
    r_lo = (((1.0 - p) - p_err) - b_lo * r) * r
    q, q_err = _two_product(a, r, xp=xp)
    return q + ((q_err + a * r_lo) + a_lo * r)


def log_softmax(
    x: Any, /, *, axes: tuple[int, ...], live: Any, compensate: bool, xp: Any, t: float = 1.0
) -> Any:
    """``(x/t - m) - log(sum(exp(x/t - m)))`` over ``axes``; ``-inf`` at masked
    entries. ``compensate`` as in :func:`softmax`."""
    z, low = _scaled_shift(x, axes, live, t, compensate, xp=xp)
    if not compensate:
        _, _, log_total = _log_sum(z, axes, xp=xp)
        return z - log_total
    _, _, log_total = _log_sum(z, axes, xp=xp, low=low)
    return (z - log_total) + low


def _log_abs(v: Any, *, xp: Any) -> Any:
    """``log|v|`` with ``-inf`` at 0, computed without a ``log(0)`` in either branch."""
    a = xp.abs(v)
    zero = a == 0
    return xp.where(zero, -_INF, xp.log(xp.where(zero, 1.0, a)))


def logsumexp(
    x: Any,
    /,
    *,
    axes: tuple[int, ...],
    keepdims: bool,
    live: Any,
    b: Any,
    return_sign: bool,
    xp: Any,
) -> Any:
    """``log(sum(b * exp(x)))`` over ``axes`` for real ``x``; see the facade."""
    if b is not None:
        nonzero = b != 0
        live = nonzero if live is None else live & nonzero
    m, m0, z = _shift(x, axes, live, xp=xp)
    if b is None:
        _, total, log_total = _log_sum(z, axes, xp=xp)
        res = _lse_from_parts(m, m0, log_total, xp=xp)
        sign = xp.sign(xp.where(m == -_INF, 0.0, total)) if return_sign else None
    else:
        e = xp.exp(z)
        top = z == 0
        bl = b if live is None else xp.where(live, b, 0.0)
        # net weight of the maximal entries, and the weighted sum of the others
        big = xp.sum(xp.where(top, bl, 0.0), axis=axes, keepdims=True)
        s = xp.sum(xp.where(top, 0.0, bl * e), axis=axes, keepdims=True)
        has_big = big != 0
        big1 = xp.where(has_big, big, 1.0)
        r = s / big1
        # total = big * (1 + r) where big != 0, else total = s (= r)
        t = xp.where(has_big, 1.0 + r, r)
        dominant = has_big & (r > -1.0)
        log_t = xp.where(dominant, xp.log1p(xp.where(dominant, r, 0.0)), _log_abs(t, xp=xp))
        res = _lse_from_parts(m, m0, _log_abs(big1, xp=xp) + log_t, xp=xp)
        sign = xp.sign(big1) * xp.sign(t)
        if not return_sign:
            # the logarithm of a negative sum is undefined
            res = xp.where(sign < 0, xp.nan, res)
    res = _squeeze(res, axes, keepdims, xp=xp)
    if return_sign:
        return res, _squeeze(sign, axes, keepdims, xp=xp)
    return res


def logsumexp_complex(
    x: Any,
    /,
    *,
    axes: tuple[int, ...],
    keepdims: bool,
    live: Any,
    b: Any,
    return_sign: bool,
    xp: Any,
) -> Any:
    """``log(sum(b * exp(x)))`` for complex ``x``: shifted by the largest real part,
    principal logarithm (imaginary part in ``(-pi, pi]``)."""
    if b is not None:
        nonzero = b != 0
        live = nonzero if live is None else live & nonzero
    re = xp.real(x)
    if live is not None:
        re = xp.where(live, re, -_INF)
    m = xp.max(re, axis=axes, keepdims=True)
    m0 = xp.where(xp.isfinite(m), m, 0.0)
    e = xp.exp(x - xp.astype(m0, x.dtype))
    if b is not None:
        e = e * b
    if live is not None:
        e = xp.where(live, e, _zeros_like_scalar(x, xp=xp))
    total = xp.sum(e, axis=axes, keepdims=True)
    mag = xp.abs(total)
    if return_sign:
        sign = total / xp.astype(xp.where(mag == 0, 1.0, mag), total.dtype)
        res = m0 + _log_abs(mag, xp=xp)
        return _squeeze(res, axes, keepdims, xp=xp), _squeeze(sign, axes, keepdims, xp=xp)
    zero = mag == 0
    safe = xp.where(zero, xp.ones((), dtype=total.dtype, device=device(x)), total)
    res = xp.where(zero, -_INF, xp.astype(m0, x.dtype) + xp.log(safe))
    return _squeeze(res, axes, keepdims, xp=xp)


def _class_onehot(target: Any, num_classes: int, axis: int, ndim: int, *, xp: Any) -> Any:
    """Boolean one-hot of integer ``target`` along ``axis`` (a comparison with
    ``arange``: works on every backend, including Dask, with no gather)."""
    shape = [1] * ndim
    shape[axis] = num_classes
    classes = xp.reshape(
        xp.arange(num_classes, dtype=target.dtype, device=device(target)), tuple(shape)
    )
    return xp.expand_dims(target, axis=axis) == classes


def _class_weights(weight: Any, axis: int, ndim: int, *, xp: Any) -> Any:
    shape = [1] * ndim
    shape[axis] = weight.shape[0]
    return xp.reshape(weight, tuple(shape))


def _pick(a: Any, onehot: Any, axis: int, *, xp: Any) -> Any:
    """``a[..., t, ...]`` along ``axis`` through the one-hot mask (0 where none)."""
    return xp.sum(xp.where(onehot, a, 0.0), axis=axis)


def _reduce(loss: Any, kept: Any, denom_weight: Any, reduction: str, *, xp: Any) -> Any:
    """Zero the samples that are not kept, then reduce. ``"mean"`` divides by the sum
    of ``denom_weight`` over kept samples (PyTorch's rule); 0 when nothing is kept."""
    loss = xp.where(kept, loss, 0.0)
    if reduction == "none":
        return loss
    total = xp.sum(loss)
    if reduction == "sum":
        return total
    denom = xp.sum(xp.where(kept, denom_weight, 0.0))
    # all samples ignored: 0 with zero gradient (PyTorch gives NaN)
    return total / xp.where(denom == 0, 1.0, denom)


def cross_entropy(
    x: Any,
    target: Any,
    /,
    *,
    axis: int,
    soft: bool,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    temperature: float,
    softcap: float | None,
    z_loss: float,
    sample_mask: Any,
    xp: Any,
) -> Any:
    """Cross-entropy of ``softmax(x)`` along ``axis`` against ``target``.

    Per sample (hard target ``t``, class weights ``w``, ``C`` classes, smoothing ``e``)::

        nll  = (m - x[t]) + log(k) + log1p(s / k)          # = logsumexp(x) - x[t]
        loss = (1 - e) * w[t] * nll + (e / C) * sum_c w[c] * (logsumexp(x) - x[c])
               + z_loss * logsumexp(x)**2

    ``nll`` is formed from the shifted logits, never as the difference of two nearly
    equal numbers, so a confident prediction keeps its tiny loss. Soft targets ``q``
    (after smoothing ``q * (1 - e) + e / C``) give ``sum_c w[c] q[c] (logsumexp(x) - x[c])``.
    """
    ndim = x.ndim
    if softcap is not None:
        x = softcap * xp.tanh(x / softcap)
    axes = (axis,)
    num_classes = x.shape[axis]
    m, m0, z = _shift(x, axes, None, xp=xp)
    if temperature != 1.0:
        # shifted first, then divided (as in _scaled_shift): x / T is not one number under
        # XLA on the CPU, and the shift of a maximal entry was then no longer 0: the
        # z-loss of a row [0.5, -3, 40, 2, -60] at T = 0.6 came out 46.07 for 44.44
        # under jit
        z = _divided(z, temperature, xp=xp)
        x, m, m0 = x / temperature, m / temperature, m0 / temperature
    _, _, log_total = _log_sum(z, axes, xp=xp)
    w = None if weight is None else _class_weights(weight, axis, ndim, xp=xp)

    if soft:
        q = target
        if label_smoothing > 0:
            q = q * (1.0 - label_smoothing) + label_smoothing / num_classes
        wq = q if w is None else q * w
        # -log p[c] is +inf where z = -inf; such classes with zero target weight add 0
        nlp = xp.where(wq == 0, 0.0, log_total - z)
        loss = xp.sum(wq * nlp, axis=axis)
        kept = sample_mask
        denom_weight = xp.ones(loss.shape, dtype=loss.dtype, device=device(loss))
        bad = None
    else:
        onehot = _class_onehot(target, num_classes, axis, ndim, xp=xp)
        # shifted target logit z[t] = x[t] - m (in a +inf row 0 or -inf, with the
        # limit derivative of z); in an all -inf row x[t] itself, so that the loss is
        # +inf with gradient -1 at the target
        z_t = xp.where(
            m == -_INF,
            xp.expand_dims(_pick(x, onehot, axis, xp=xp), axis=axis),
            xp.expand_dims(_pick(z, onehot, axis, xp=xp), axis=axis),
        )
        nll = xp.squeeze(log_total - z_t, axis=axis)
        kept = target != ignore_index
        if sample_mask is not None:
            kept = kept & sample_mask
        # ignore_index may be a valid class: weights are picked for kept samples only
        w_t = 1.0 if w is None else _pick(w, onehot, axis, xp=xp)
        # a class of weight 0 contributes 0, even where its -log p is +inf (0 * inf)
        loss = nll if w is None else w_t * xp.where(w_t == 0, 0.0, nll)
        if label_smoothing > 0:
            loss = (1.0 - label_smoothing) * loss
            nlp = log_total - z
            if w is not None:
                nlp = w * xp.where(w == 0, 0.0, nlp)
            smooth = xp.sum(nlp, axis=axis)
            loss = loss + (label_smoothing / num_classes) * smooth
        denom_weight = (
            xp.ones(loss.shape, dtype=loss.dtype, device=device(loss)) if w is None else w_t
        )
        bad = kept & ((target < 0) | (target >= num_classes))

    if z_loss > 0:
        # z_loss * lse**2; +inf in a +inf row, where its gradient (2 z lse p) would be
        # infinite: there it is a constant, and the gradient keeps its finite limit;
        # +inf and constant in an all -inf row too (lse = -inf: a forward-mode
        # derivative 2 z lse dlse was -inf * 0 = NaN there)
        regular = xp.squeeze(xp.isfinite(m), axis=axis)
        lse = xp.squeeze(_lse_from_parts(m, m0, log_total, xp=xp), axis=axis)
        lse = xp.where(regular, lse, 0.0)
        loss = loss + xp.where(regular, z_loss * lse * lse, _INF)
    if bad is not None:
        # only reached on traced or lazy arrays (eager ones raise first): a target
        # outside [0, C) makes that sample NaN, never a plausible number
        loss = xp.where(bad, xp.nan, loss)
        kept = kept | bad
    if kept is None:
        kept = xp.ones(loss.shape, dtype=xp.bool, device=device(loss))
    return _reduce(loss, kept, denom_weight, reduction, xp=xp)


def nll_loss(
    log_probs: Any,
    target: Any,
    /,
    *,
    axis: int,
    weight: Any,
    ignore_index: int,
    reduction: str,
    sample_mask: Any,
    xp: Any,
) -> Any:
    """``-w[t] * log_probs[t]`` per sample, reduced like :func:`cross_entropy`."""
    ndim = log_probs.ndim
    onehot = _class_onehot(target, log_probs.shape[axis], axis, ndim, xp=xp)
    w_t = (
        xp.ones(target.shape, dtype=log_probs.dtype, device=device(log_probs))
        if weight is None
        else _pick(_class_weights(weight, axis, ndim, xp=xp), onehot, axis, xp=xp)
    )
    loss = -w_t * _pick(log_probs, onehot, axis, xp=xp)
    kept = target != ignore_index
    if sample_mask is not None:
        kept = kept & sample_mask
    bad = kept & ((target < 0) | (target >= log_probs.shape[axis]))
    loss = xp.where(bad, xp.nan, loss)
    return _reduce(loss, kept | bad, w_t, reduction, xp=xp)
