"""Public facades: cross_entropy and nll_loss.

They resolve the namespace, validate every argument (shapes and options always; target
values only on eager arrays, see :func:`stablemath._lib._compat.can_inspect_values`)
and call the kernels in :mod:`stablemath._kernels`. A hard-target cross-entropy tries
the fast paths (:mod:`stablemath._fastpaths`) right after the options are checked, even
before the namespace: they check the arrays' types, dtypes and shapes, read the target
values in one compiled pass, and hand anything else back, to be rejected here (the
facade's own target check cost a batch of one 8 us; the namespace and the shape checks
ahead of the fast paths, 2 us more).
"""

from __future__ import annotations

import math
import operator
from typing import Any

from . import _fastpaths, _kernels, _triton
from ._lib._compat import array_namespace, can_inspect_values, device, finish
from ._lib._utils import (
    check_complex,
    check_temperature,
    compute_dtype,
    float_dtype,
    single_axis,
)
from ._reductions import _check_mask

__all__ = ["cross_entropy", "nll_loss"]

Array = Any
_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        msg = f"reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        raise ValueError(msg)


def _check_ignore_index(ignore_index: Any) -> int:
    """An integer that an int64 target can hold (torch's and the kernels' type)."""
    try:
        value = operator.index(ignore_index)
    except TypeError:
        msg = f"ignore_index must be an integer, got {ignore_index!r}"
        raise TypeError(msg) from None
    if not -(2**63) <= value < 2**63:
        msg = f"ignore_index must fit in int64, got {ignore_index!r}"
        raise ValueError(msg)
    return value


def _check_target_shape(target: Any, shape: tuple[int, ...], axis: int, name: str) -> None:
    sample_shape = shape[:axis] + shape[axis + 1 :]
    if tuple(target.shape) != sample_shape:
        msg = (
            f"target of shape {tuple(target.shape)} does not match {name} of shape "
            f"{shape} without axis {axis}: expected {sample_shape}"
        )
        raise ValueError(msg)


def _check_hard_target(
    xp: Any,
    target: Any,
    shape: tuple[int, ...],
    axis: int,
    ignore_index: int,
    mask: Any,
    name: str,
) -> None:
    """Shape of an integer target; its values too when they can be read."""
    _check_target_shape(target, shape, axis, name)
    sample_shape = shape[:axis] + shape[axis + 1 :]
    num_classes = shape[axis]
    if can_inspect_values(target) and math.prod(sample_shape) > 0:
        # the common case first, in two reductions (a handful of elementwise ops and a
        # read cost torch 27 us at 1x10): every value a class index
        lo, hi = xp.min(target), xp.max(target)
        if can_inspect_values(lo) and int(lo) >= 0 and int(hi) < num_classes:
            return
        bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
        if mask is not None:
            bad = bad & mask
        # under jax.jit even a closed-over concrete target gives traced results
        if can_inspect_values(bad) and bool(xp.any(bad)):
            msg = (
                f"target values must lie in [0, {num_classes}) or equal "
                f"ignore_index={ignore_index}; got values outside it"
            )
            raise ValueError(msg)


def _check_weight_shape(weight: Any, num_classes: int) -> None:
    if weight is not None and tuple(weight.shape) != (num_classes,):
        msg = f"weight must have shape ({num_classes},) (one per class), got {tuple(weight.shape)}"
        raise ValueError(msg)


def _prepare_weight(xp: Any, weight: Any, num_classes: int, dtype: Any) -> Any:
    if weight is None:
        return None
    _check_weight_shape(weight, num_classes)
    return weight if weight.dtype == dtype else xp.astype(weight, dtype)


def _prepare_sample_mask(xp: Any, where: Any, sample_shape: tuple[int, ...]) -> Any:
    if where is None:
        return None
    where = _check_mask(xp, where, sample_shape)
    return xp.broadcast_to(where, sample_shape)


def cross_entropy(
    logits: Array,
    target: Array,
    /,
    *,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    where: Array | None = None,
) -> Array:
    r"""Cross-entropy between ``softmax(logits)`` and ``target``, NaN-free.

    Per sample, with class axis ``axis``, ``C`` classes, hard target ``t``, class
    weights ``w`` (1 by default) and smoothing ``e``:

    .. math::

        \ell = (1-e)\, w_t\,(\operatorname{lse}(x) - x_t)
               + \frac{e}{C}\sum_c w_c\,(\operatorname{lse}(x) - x_c)
               + \lambda_z \operatorname{lse}(x)^2

    where ``x`` are the logits after soft-capping (``softcap * tanh(x / softcap)``) and
    division by ``temperature``, and ``lse(x) - x_t`` is formed as
    ``(max - x_t) + log(k) + log1p(s / k)``, so that a confident prediction keeps its
    tiny loss (``[100, 1, 0]``, target 0: ``1.383e-43``, stored in float32 as the nearest
    subnormal ``1.387e-43``, where the frameworks return 0). Soft targets ``q``
    (probabilities, the shape of ``logits``; smoothed to ``q (1 - e) + e / C``) give
    :math:`\sum_c w_c q_c (\operatorname{lse}(x) - x_c)`. The definitions are PyTorch's (:func:`torch.nn.functional.cross_entropy`).

    Parameters
    ----------
    logits : array
        Unnormalised log-probabilities, class axis ``axis``.
    target : array
        Integer class indices with the shape of ``logits`` without ``axis`` (hard
        targets), or floating probabilities with the shape of ``logits`` (soft).
    axis : int, default -1
        The class axis, anywhere (``axis=1`` for ``(N, C, d1, d2)``).
    weight : array, optional
        Per-class weights of shape ``(C,)``.
    ignore_index : int, default -100
        Hard-target value whose samples contribute nothing (it may be a valid class).
    reduction : {"mean", "sum", "none"}, default "mean"
        ``"mean"`` divides by the sum of ``weight[t]`` over kept samples (hard
        targets) or by the number of kept samples (soft targets); 0 if none is kept.
    label_smoothing : float in [0, 1], default 0
        PyTorch's label smoothing.
    temperature : float, default 1.0
        Positive, finite; the logits are divided by it (after soft-capping).
    softcap : float, optional
        Positive; logits become ``softcap * tanh(logits / softcap)`` first.
    z_loss : float, default 0
        Coefficient (``>= 0``) of the auxiliary ``logsumexp(logits)**2`` term, added to
        each kept sample's loss before the reduction (unweighted by ``weight``).
    where : array of bool, optional
        Per-sample mask broadcastable to the sample shape; ``False`` samples count
        exactly as ignored ones.

    Returns
    -------
    array
        The per-sample losses (``"none"``) or a 0-d array, in the logits' dtype.

    Raises
    ------
    ValueError
        Bad ``reduction``, ``label_smoothing``, ``z_loss``, ``temperature`` or
        ``softcap``; an ``ignore_index`` beyond int64; ``target`` or ``weight`` of the
        wrong shape; on eager arrays, a
        hard target outside ``[0, C)`` that is not ``ignore_index`` or a negative soft
        target. Under ``jax.jit``/``torch.compile`` and on Dask arrays these values
        are not inspected: such a sample's loss is NaN instead.
    TypeError
        Complex logits; arrays of two libraries; an ``ignore_index`` that is not an
        integer.

    Notes
    -----
    Edge cases per sample: ``-inf`` logits other than the target are ignored (their
    gradient is 0); ``x_t = -inf`` gives ``+inf`` (gradient ``-1`` at the target);
    an all ``-inf`` row gives ``+inf`` with gradient ``-onehot(t)``; ``k`` logits
    ``+inf`` give ``log k`` if ``x_t = +inf`` and ``+inf`` otherwise (always ``+inf``
    with ``label_smoothing`` or ``z_loss`` above 0); NaN logits give NaN. Ignored and
    masked samples give 0 and gradient 0; if all are ignored, ``"mean"`` gives 0
    (PyTorch gives NaN). The gradient is ``w_t (softmax - onehot(t))`` (plus the
    smoothing and z-loss terms); in rows with ``+inf`` logits it is the limit of that
    formula, with the softmax ``1/k`` at the ``k`` ``+inf`` entries (the z-loss term,
    whose gradient is infinite there, adds nothing), finite (SPEC §3).

    Examples
    --------
    >>> import numpy as np
    >>> import stablemath as sm
    >>> logits = np.array([[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]])
    >>> sm.cross_entropy(logits, np.array([0, 2, 1]), reduction="none")
    array([4.17030016e-01, 2.00000000e+03, 1.40760596e+00])
    >>> float(sm.cross_entropy(np.array([[100.0, 1.0, 0.0]], dtype=np.float32), np.array([0])))
    1.387...e-43
    """
    _check_reduction(reduction)
    ignore_index = _check_ignore_index(ignore_index)
    smoothing, z = float(label_smoothing), float(z_loss)
    if not 0.0 <= smoothing <= 1.0:
        msg = f"label_smoothing must lie in [0, 1], got {label_smoothing!r}"
        raise ValueError(msg)
    if not (math.isfinite(z) and z >= 0):
        msg = f"z_loss must be a finite number >= 0, got {z_loss!r}"
        raise ValueError(msg)
    cap = None if softcap is None else float(softcap)
    if cap is not None and not (math.isfinite(cap) and cap > 0):
        msg = f"softcap must be None or a positive finite float, got {softcap!r}"
        raise ValueError(msg)
    t = check_temperature(temperature)
    if type(axis) is int:
        # the fast paths first, before even the namespace (a batch of one paid 2 us for
        # it and the shapes): they check the arrays' types, dtypes and shapes and the
        # target values themselves, and give None for anything the generic path must
        # decide or reject
        fast = _fastpaths.cross_entropy(
            logits, target, axis, weight, ignore_index, reduction, smoothing, where, t, z, cap
        )
        if fast is not None:
            return fast
    xp, (logits, target, weight, where) = array_namespace(logits, target, weight, where)
    check_complex(xp, logits, "cross_entropy")
    shape = tuple(logits.shape)
    ax = single_axis(axis, len(shape))
    if shape[ax] == 0:
        msg = f"the class axis {axis} of logits (shape {shape}) is empty"
        raise ValueError(msg)
    out_dtype = float_dtype(xp, logits)
    work = compute_dtype(xp, out_dtype, device=device(logits))
    sample_shape = shape[:ax] + shape[ax + 1 :]
    mask = _prepare_sample_mask(xp, where, sample_shape)

    soft = xp.isdtype(target.dtype, "real floating")
    if soft:
        if tuple(target.shape) != shape:
            msg = (
                f"a floating (soft) target must have the shape of logits {shape}, "
                f"got {tuple(target.shape)}"
            )
            raise ValueError(msg)
        negative = target < 0
        if can_inspect_values(negative) and bool(xp.any(negative)):
            msg = "soft target probabilities must be >= 0; got negative values"
            raise ValueError(msg)
        if target.dtype != work:
            target = xp.astype(target, work)
    elif xp.isdtype(target.dtype, "integral"):
        _check_hard_target(xp, target, shape, ax, ignore_index, mask, "logits")
    else:
        msg = f"target must hold integer class indices or floating probabilities, got dtype {target.dtype}"
        raise TypeError(msg)
    if not soft and _triton.supports(logits):
        weight = _prepare_weight(xp, weight, shape[ax], xp.float32)
        return _triton.cross_entropy(
            logits,
            target,
            axis=ax,
            weight=weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=smoothing,
            temperature=t,
            softcap=cap,
            z_loss=z,
            where=mask,
        )
    weight = _prepare_weight(xp, weight, shape[ax], work)
    if logits.dtype != work:
        logits = xp.astype(logits, work)

    loss = _kernels.cross_entropy(
        logits,
        target,
        axis=ax,
        soft=soft,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=smoothing,
        temperature=t,
        softcap=cap,
        z_loss=z,
        sample_mask=mask,
        xp=xp,
    )
    return finish(loss, out_dtype, xp)


def nll_loss(
    log_probs: Array,
    target: Array,
    /,
    *,
    axis: int = -1,
    weight: Array | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Array:
    r"""Negative log-likelihood of integer targets under given log-probabilities.

    .. math::

        \ell_i = -w_{t_i}\,\texttt{log\_probs}[i, t_i]

    reduced as in :func:`cross_entropy` (``"mean"`` divides by the sum of ``w[t]``
    over the samples that are not ignored; 0 if all are). It is PyTorch's
    :func:`torch.nn.functional.nll_loss`, with the class axis anywhere;
    ``nll_loss(log_softmax(x), t)`` equals ``cross_entropy(x, t)``.

    Parameters
    ----------
    log_probs : array
        Log-probabilities, class axis ``axis``.
    target : array
        Integer class indices, the shape of ``log_probs`` without ``axis``.
    axis : int, default -1
        The class axis.
    weight : array, optional
        Per-class weights of shape ``(C,)``.
    ignore_index : int, default -100
        Target value whose samples contribute nothing.
    reduction : {"mean", "sum", "none"}, default "mean"

    Returns
    -------
    array
        Per-sample losses or a 0-d array, in the input's dtype.

    Raises
    ------
    ValueError
        Bad ``reduction``; an ``ignore_index`` beyond int64; ``target`` or ``weight``
        of the wrong shape; on eager arrays, a target outside ``[0, C)`` that is not
        ``ignore_index``.
    TypeError
        Complex or mixed-library input; a target that is not integer; an
        ``ignore_index`` that is not an integer.

    Notes
    -----
    A ``-inf`` log-probability at the target gives ``+inf``; NaN propagates. Target
    values are checked on eager arrays; under tracing and on Dask arrays a target
    outside ``[0, C)`` gives NaN for that sample.

    Examples
    --------
    >>> import numpy as np
    >>> import stablemath as sm
    >>> lp = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    >>> sm.nll_loss(lp, np.array([0, 2]), reduction="none")
    array([0.69314718, 0.22314355])
    """
    xp, (log_probs, target, weight) = array_namespace(log_probs, target, weight)
    check_complex(xp, log_probs, "nll_loss")
    _check_reduction(reduction)
    ignore_index = _check_ignore_index(ignore_index)
    shape = tuple(log_probs.shape)
    ax = single_axis(axis, len(shape))
    if not xp.isdtype(target.dtype, "integral"):
        msg = f"nll_loss target must hold integer class indices, got dtype {target.dtype}"
        raise TypeError(msg)
    _check_hard_target(xp, target, shape, ax, ignore_index, None, "log_probs")
    out_dtype = float_dtype(xp, log_probs)
    work = compute_dtype(xp, out_dtype, device=device(log_probs))
    if log_probs.dtype != work:
        log_probs = xp.astype(log_probs, work)
    weight = _prepare_weight(xp, weight, shape[ax], work)
    loss = _kernels.nll_loss(
        log_probs,
        target,
        axis=ax,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        sample_mask=None,
        xp=xp,
    )
    return finish(loss, out_dtype, xp)
