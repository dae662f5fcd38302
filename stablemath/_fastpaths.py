"""Backend fast paths: softmax, log_softmax and logsumexp for NumPy arrays and PyTorch
CPU tensors of at most 32 bits, in a handful of the library's own calls.

The generic kernels in :mod:`stablemath._kernels` are the definition; they are written
for every input (``+-inf`` maxima, masks, float64, traced arrays) and pay for it in
passes over the data: about twenty array operations for a softmax. This module covers
the common case in which those precautions are provably idle, and nothing else:

* one axis, no ``where`` mask, the output in the input's dtype;
* a NumPy array, or a torch tensor on the CPU that is not being traced by
  ``torch.compile`` (the checks below read values), of float16, bfloat16 or float32;
* every slice has a finite maximum ``m`` (checked, on the input dtype: one cheap
  reduction). Otherwise the function returns None and the facade runs the generic
  kernel, which gives the SPEC §3 values for ``+-inf`` and NaN slices.

Why no precaution is lost: the arithmetic runs in float64 on values that are exact
float32 (or narrower) numbers, so ``x - m`` is exact and every float64 rounding is
2**-29 of an output ulp; the error-free corrections of the generic path (TwoSum of the
shift, compensated sums) have nothing left to correct. What does matter is kept: the
maximal entries are taken out of the sum and counted (``log(k) + log1p(s / k)``), so a
dominant term keeps full relative precision (SPEC §3.5); ``-inf`` entries give
``exp(-inf) = 0`` and ``-inf`` log-probabilities with finite gradients. Gradients are
those of the same formulas (torch autograd), the analytic ones.

The same tests run on both paths: ``STABLEMATH_DISABLE_FASTPATHS=1`` turns this module
off (the nox sessions ``tests(numpy-generic)`` and ``tests(torch-generic)``).

Why it exists (``python benchmarks/run.py``, quick set, 2-core VM, p50 time as a ratio
to the native function, float32; generic = ``STABLEMATH_DISABLE_FASTPATHS=1`` in a run
beside it, 2026-12-01):

==============================  ============  ===========
op, shape, provider / native     generic       fast path
==============================  ============  ===========
softmax 4096x1000, numpy/scipy     3.67          2.56
softmax 256x32000, numpy/scipy     5.78          2.45
log_softmax 256x32000, numpy       9.73          3.03
logsumexp 4096x1000, numpy         1.98          0.87
softmax 4096x1000, torch          13.0           6.05
softmax 256x32000, torch          34.8           3.35
log_softmax 4096x1000, torch      17.4           3.91
logsumexp 256x32000, torch        12.0           5.12
cross_entropy fwd 4096x1000       23.9           3.17
cross_entropy fwd+bwd 4096x1000   21.4           3.65
==============================  ============  ===========

The floor is float64 ``exp`` (NumPy on AVX2 has no vector float64 ``exp``: 5 ns an
element, more than ``scipy.special.softmax``'s whole float32 pass) and, for torch,
float64 traffic. float32 arithmetic would be faster and is not within 2 ulp: on the
reference vectors ``torch.softmax`` and ``scipy.special.softmax`` in float32 are off by
up to 58 and 57 ulp, this module's results by 0.5 (``python benchmarks/accuracy.py``).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np

from . import _triton
from ._lib._compat import can_inspect_values, finish

__all__ = ["DISABLE_ENV", "cross_entropy", "enabled", "log_softmax", "logsumexp", "softmax"]

DISABLE_ENV = "STABLEMATH_DISABLE_FASTPATHS"
_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def enabled() -> bool:
    """False when ``STABLEMATH_DISABLE_FASTPATHS=1`` (read at each call)."""
    return os.environ.get(DISABLE_ENV, "") != "1"


def _kind(x: Any) -> str | None:
    """``"numpy"`` or ``"torch"`` where a fast path applies to ``x``'s type, dtype and
    device, else None."""
    if type(x) is np.ndarray:
        return "numpy" if x.dtype in _NUMPY_DTYPES and enabled() else None
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return None
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.device.type != "cpu":
        return None
    if not enabled() or not can_inspect_values(x):
        return None
    if os.environ.get("TRITON_INTERPRET", "") == "1" and _triton.supports(x):
        return None  # the Triton kernels' own tests run them on CPU tensors
    return "torch"


# --- NumPy ------------------------------------------------------------------------------


def _np_shift(x: np.ndarray, axis: int, t: float) -> tuple[np.ndarray, np.ndarray] | None:
    """``(m, d)``: the maximum (input dtype, kept dims) and ``d = (x - m) / t`` in
    float64, or None if some slice's maximum is not finite."""
    m = np.maximum.reduce(x, axis=axis, keepdims=True)
    if not np.isfinite(m).all():
        return None
    d = x.astype(np.float64)  # then in place: faster than a mixed-dtype subtract
    d -= m
    if t != 1.0:
        d /= t
    return m, d


def _np_log_total(d: np.ndarray, axis: int, *, overwrite: bool = False) -> np.ndarray:
    """``log(sum(exp(d)))`` as ``log(k) + log1p(s / k)``: ``k`` entries have ``d == 0``
    (the maxima), ``s`` sums the others. ``overwrite`` lets ``exp`` reuse ``d``."""
    top = d == 0
    e = np.exp(d, out=d if overwrite else None)
    np.putmask(e, top, 0.0)
    s = np.add.reduce(e, axis=axis, keepdims=True)
    k = np.count_nonzero(top, axis=axis, keepdims=True)
    return np.log(k) + np.log1p(s / k)


def _np_softmax(x: np.ndarray, axis: int, t: float) -> np.ndarray | None:
    shifted = _np_shift(x, axis, t)
    if shifted is None:
        return None
    _, e = shifted
    np.exp(e, out=e)
    e /= np.add.reduce(e, axis=axis, keepdims=True)  # >= 1: the maximum contributes exp(0)
    return e.astype(x.dtype)  # in [0, 1]: no overflow to silence


def _np_log_softmax(x: np.ndarray, axis: int, t: float) -> np.ndarray | None:
    shifted = _np_shift(x, axis, t)
    if shifted is None:
        return None
    _, d = shifted
    d -= _np_log_total(d, axis)
    return finish(d, x.dtype, np)


def _np_logsumexp(x: np.ndarray, axis: int, keepdims: bool) -> np.ndarray | None:
    shifted = _np_shift(x, axis, 1.0)
    if shifted is None:
        return None
    m, d = shifted
    res = m.astype(np.float64) + _np_log_total(d, axis, overwrite=True)
    if not keepdims:
        res = np.squeeze(res, axis=axis)
    return finish(res, x.dtype, np)


# --- PyTorch (CPU) ------------------------------------------------------------------------


def _torch_max(x: Any, axis: int) -> Any:
    """The slice maxima (kept dims, input dtype), or None if one is not finite."""
    torch = sys.modules["torch"]
    m = torch.amax(x, dim=axis, keepdim=True)
    # one reduction and one read instead of isfinite/all: a float64 sum of float32
    # maxima is finite exactly when they all are
    if not math.isfinite(torch.sum(m, dtype=torch.float64).item()):
        return None
    return m


def _torch_shift(x: Any, axis: int, t: float) -> tuple[Any, Any] | None:
    m = _torch_max(x, axis)
    if m is None:
        return None
    d = x - m.double()  # promoted to float64, exact
    if t != 1.0:
        d = d / t
    return m, d


def _torch_log_total(d: Any, axis: int) -> Any:
    torch = sys.modules["torch"]
    rest = d != 0
    s = torch.sum(torch.where(rest, torch.exp(d), 0.0), dim=axis, keepdim=True)
    k = (d.shape[axis] - torch.count_nonzero(rest, dim=axis)).unsqueeze(axis).double()
    return torch.log(k) + torch.log1p(s / k)


def _torch_softmax(x: Any, axis: int, t: float) -> Any:
    torch = sys.modules["torch"]
    if x.numel() and _torch_max(x, axis) is None:
        return None
    # torch's fused softmax in float64: exact shift, float64 exp and sum, one rounding
    # to the output dtype; it is right wherever the maximum is finite
    if t == 1.0:
        p = torch.softmax(x, dim=axis, dtype=torch.float64)
    else:
        p = torch.softmax(x.double() / t, dim=axis)
    return p.to(x.dtype)


# Below this magnitude a float64 result of torch's fused kernels may be off by more
# than a tenth of a float32 ulp: their log(sum) has an absolute error of ~1e-16, which
# matters only where the result itself is that small (a dominant term, SPEC §3.5).
_TINY = 2.0**-20


def _torch_log_softmax(x: Any, axis: int, t: float) -> Any:
    torch = sys.modules["torch"]
    out = torch.log_softmax(x if t == 1.0 else x.double() / t, dim=axis, dtype=torch.float64)
    # one global maximum tells both: NaN (a slice with a NaN or a non-finite maximum,
    # for the generic kernel), or above -_TINY (some slice with a dominant term)
    top = torch.amax(out).item() if out.numel() else -math.inf
    if math.isnan(top):
        return None
    if top > -_TINY:
        shifted = _torch_shift(x, axis, t)
        if shifted is None:
            return None
        _, d = shifted
        out = d - _torch_log_total(d, axis)
    return out.to(x.dtype)


def _torch_logsumexp(x: Any, axis: int, keepdims: bool) -> Any:
    torch = sys.modules["torch"]
    res = torch.logsumexp(x.double(), dim=axis, keepdim=keepdims)
    if res.numel():
        # non-finite results go to the generic kernel (torch's gradient of an all -inf
        # slice is NaN); tiny ones to the exact formula
        low, high = torch.aminmax(torch.abs(res))
        if not math.isfinite(high.item()):
            return None
        if low.item() < _TINY:
            shifted = _torch_shift(x, axis, 1.0)
            if shifted is None:
                return None
            m, d = shifted
            res = m.double() + _torch_log_total(d, axis)
            if not keepdims:
                res = res.squeeze(axis)
    return res.to(x.dtype)


def _torch_cross_entropy(
    x: Any,
    target: Any,
    axis: int,
    weight: Any,
    ignore_index: int,
    reduction: str,
    smoothing: float,
) -> Any:
    torch = sys.modules["torch"]
    if x.ndim > 1 and axis != 1:
        x = torch.movedim(x, axis, 1)  # torch's class axis
    loss = torch.nn.functional.cross_entropy(
        x.double(),
        target.long(),
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=smoothing,
    )
    # torch's float64 loss is right to far below a float32 ulp where it is finite and
    # not tiny. Otherwise (an infinite or masked target logit, a +inf logit, all samples
    # ignored, or a confident prediction whose loss is below _TINY, SPEC §3.5) the
    # generic kernel decides.
    if loss.numel():
        if not math.isfinite(torch.sum(loss).item()):
            return None
        kept_min = loss if reduction != "none" else torch.where(target != ignore_index, loss, 1.0)
        if torch.amin(kept_min).item() < _TINY:
            return None
    return loss.to(x.dtype)


# --- dispatch -------------------------------------------------------------------------------


def _dispatch(numpy_impl: Any, torch_impl: Any, x: Any, *args: Any) -> Any:
    kind = _kind(x)
    if kind == "numpy":
        return numpy_impl(x, *args)
    if kind == "torch":
        return torch_impl(x, *args)
    return None


def softmax(x: Any, axis: int, temperature: float) -> Any:
    """``softmax(x / temperature)`` along ``axis``, or None where no fast path applies."""
    return _dispatch(_np_softmax, _torch_softmax, x, axis, temperature)


def log_softmax(x: Any, axis: int, temperature: float) -> Any:
    """``log_softmax(x / temperature)`` along ``axis``, or None."""
    return _dispatch(_np_log_softmax, _torch_log_softmax, x, axis, temperature)


def logsumexp(x: Any, axis: int, keepdims: bool) -> Any:
    """``logsumexp(x)`` along ``axis``, or None."""
    return _dispatch(_np_logsumexp, _torch_logsumexp, x, axis, keepdims)


def cross_entropy(
    x: Any,
    target: Any,
    *,
    axis: int,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> Any:
    """PyTorch CPU only: ``torch.nn.functional.cross_entropy`` computed in float64 on
    integer targets, or None where the generic kernel must decide (see above)."""
    if _kind(x) != "torch":
        return None
    return _torch_cross_entropy(x, target, axis, weight, ignore_index, reduction, label_smoothing)
