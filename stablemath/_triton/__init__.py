"""Fused Triton kernels for PyTorch tensors: the GPU fast path of stablemath.

The one place that knows Triton. Importing this package imports neither torch nor
Triton; :func:`available` imports Triton (once) when asked, and the functions import
the kernels on their first call.

Dispatch contract (for the facades):

* :func:`supports` ``(x)`` is True for a float32, float16 or bfloat16 ``torch.Tensor``
  on a CUDA (or ROCm) device, or on the CPU when ``TRITON_INTERPRET=1`` is set (the
  interpreter, for tests), and only when :func:`available`. float64 is left to the
  generic path, whose error-free summation keeps float64 within 2 ulp (SPEC §3.5); the
  functions below accept float64 too (they then compute in float64), which the tests
  use for ``gradcheck``.
* :func:`available` is False when Triton cannot be imported or when the environment
  variable ``STABLEMATH_DISABLE_TRITON=1`` turns the kernels off (read at every call).
* The functions take validated arguments (the facades check them) in the *input's*
  dtype: float16/bfloat16 are read as such and computed in float32, the result is
  in the input's dtype (cast it for ``dtype=``). ``logsumexp`` has no ``b`` or
  ``return_sign`` and ``cross_entropy`` takes hard (integer) targets only: use the
  generic path for those, for complex input, and when second-order gradients are
  needed (the kernels' backwards are not differentiable; they raise).

Semantics are those of :mod:`stablemath._kernels` (SPEC §3), the edges included: in a
row with ``+inf`` logits the gradients are the limits (for cross_entropy
``w_t (softmax - onehot(t))`` plus the smoothing term, the z-loss term's infinite
gradient omitted), and a class of weight 0 contributes 0 where its ``lse - x_c`` is
``+inf``. The differences:

* float32 input is computed in float64 (as on the CPU), float16/bfloat16 in float32;
  compiled Triton kernels flush float32 subnormals to zero.
* The cross-entropy backward scales the gradient computed by the forward in place when
  the autograd graph is not retained; with ``retain_graph``/``create_graph`` (and under
  ``torch.compile``) it scales a copy.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "available",
    "cross_entropy",
    "log_softmax",
    "logsumexp",
    "softmax",
    "supports",
]

DISABLE_ENV = "STABLEMATH_DISABLE_TRITON"

# None until asked: whether `import triton` succeeds (a plain global, not lru_cache,
# so that torch.compile can trace the functions that read it)
_importable: bool | None = None


def available() -> bool:
    """Whether the Triton kernels can be used: Triton importable and not turned off by
    ``STABLEMATH_DISABLE_TRITON=1``."""
    global _importable
    if os.environ.get(DISABLE_ENV, "") == "1":
        return False
    if _importable is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _importable = False
        else:
            _importable = True
    return _importable


def supports(x: Any) -> bool:
    """Whether the kernels handle ``x``: a float32/float16/bfloat16 torch tensor on a
    CUDA device (or on the CPU under ``TRITON_INTERPRET=1``), with :func:`available`."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "") != "1":
            return False
        # kernels decorated before the variable was set are compiled, not interpreted
        kernels = sys.modules.get(__name__ + "._kernels")
        if kernels is not None and not kernels.INTERPRET:
            return False
    elif x.device.type != "cuda":
        return False
    return available()


def softmax(
    x: Any,
    /,
    *,
    axis: int | Sequence[int] | None = -1,
    temperature: float = 1.0,
    where: Any = None,
) -> Any:
    """Softmax of ``x / temperature`` along ``axis`` (int, tuple or None).

    ``where`` is a boolean tensor broadcastable to ``x``; ``False`` entries count as
    ``-inf``. Returns a tensor of ``x``'s shape and dtype; differentiable.
    """
    from ._ops import softmax as impl

    return impl(x, axis=axis, temperature=temperature, where=where)


def log_softmax(
    x: Any,
    /,
    *,
    axis: int | Sequence[int] | None = -1,
    temperature: float = 1.0,
    where: Any = None,
) -> Any:
    """Log-softmax of ``x / temperature`` along ``axis``; arguments as :func:`softmax`."""
    from ._ops import log_softmax as impl

    return impl(x, axis=axis, temperature=temperature, where=where)


def logsumexp(
    x: Any,
    /,
    *,
    axis: int | Sequence[int] | None = -1,
    keepdims: bool = False,
    where: Any = None,
) -> Any:
    """``log(sum(exp(x)))`` along ``axis``, in ``x``'s dtype; an empty axis gives
    ``-inf``. No ``b``, ``return_sign`` or complex input (generic path)."""
    from ._ops import logsumexp as impl

    return impl(x, axis=axis, keepdims=keepdims, where=where)


def cross_entropy(
    logits: Any,
    target: Any,
    /,
    *,
    axis: int = -1,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    where: Any = None,
) -> Any:
    """Cross-entropy of ``logits`` (class axis ``axis``) against integer ``target``
    (the shape of ``logits`` without ``axis``), with the options of
    :func:`stablemath.cross_entropy`. ``where`` is a per-sample boolean mask
    broadcastable to the sample shape. The loss and its gradient are computed in one
    kernel; the backward only scales the gradient. Returns the logits' dtype; no
    gradient flows to ``weight``.
    """
    from ._ops import cross_entropy as impl

    return impl(
        logits,
        target,
        axis=axis,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        temperature=temperature,
        softcap=softcap,
        z_loss=z_loss,
        where=where,
    )
