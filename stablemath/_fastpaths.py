"""Backend fast paths: softmax, log_softmax, logsumexp and cross-entropy with integer
targets for NumPy arrays and PyTorch CPU tensors of at most 32 bits, and for JAX
arrays of at most 32 bits on the CPU, whose XLA calls the same row kernels
(:mod:`stablemath._xla_ffi`, which says how and why).

The generic kernels in :mod:`stablemath._kernels` are the definition; they are written
for every input (``+-inf`` maxima, masks, float64, traced arrays) and pay for it in
passes over the data: about twenty array operations for a softmax. This module covers
the common case in which those precautions are provably idle, and nothing else:

* cross-entropy with each of its options: the kernel takes class weights,
  ``ignore_index``, label smoothing, a ``temperature``, the ``z_loss`` and a
  ``softcap`` (NumPy, torch and JAX; for JAX, XLA caps the logits in float32 before
  the FFI call, as the generic kernels do without ``jax_enable_x64``). With the
  last two it used to take the generic path: 4096x1000 float32, median of 9, NumPy
  48 ms -> 2.0 with ``z_loss=1e-4`` and 56 -> 2.0 with ``temperature=2``, torch 56 ->
  1.7 and 67 -> 1.7 (``F.cross_entropy`` without them 1.4), JAX under jit 14 -> 1.9
  and 15 -> 1.9, with ``jax.grad`` 20 -> 2.2 and 23 -> 2.2 (without them 1.7 and 2.1).
  JAX's class weights with smoothing or the z-loss joined them later (the weights
  inside the kernel): 24 -> 2.1 ms and 15 -> 1.8 under jit, 20 -> 2.4 and 21 -> 2.1
  with ``jax.grad`` (weights alone 1.8 and 2.0). A ``softcap`` went the same way
  (``softcap=30``, logits of scale 10): NumPy 86 -> 5.0 ms, torch 83 -> 4.3 and
  forward+backward 124 -> 7.7, where ``F.cross_entropy(30 * torch.tanh(x / 30), t)``
  takes 3.8-4.3 and 12 (the cap in float64 with the kernels' own vectorised tanh);
  JAX under jit (x64 off) 16 -> 3.1 ms and with ``jax.grad`` 39 -> 4.5, optax of the
  capped logits 3.6-4.8 and 5.7-6.6;
* one axis, no ``where`` mask (except cross-entropy's per-sample mask, whose False
  samples become ``ignore_index`` ones: 82 ms -> 2.3 ms for NumPy 4096x1000 float32,
  93 -> 1.9 torch, 110 -> 4.2 torch forward+backward, 18 -> 2.5 JAX under jit and 28 ->
  3.0 with its gradient, before -> after, 2-core VM), the output in the input's dtype;
* a NumPy array, or a torch tensor on the CPU that is not being traced by
  ``torch.compile`` or batched by ``torch.func.vmap`` (the checks read values), of
  float16, bfloat16 or float32;
* every slice has a finite maximum ``m`` and no NaN (checked on the way; a soft-cap
  makes every logit but NaN finite). Otherwise the function returns None and the
  facade runs the generic kernel, which gives the SPEC §3 values for ``+-inf`` and
  NaN slices.

Two implementations, one arithmetic:

* **compiled row kernels** (:mod:`stablemath._cpu_kernels`, Numba) for NumPy float32
  and float16 arrays and for torch tensors that no autodiff sees
  (:func:`~stablemath._lib._compat.numpy_view`: no ``requires_grad`` under grad mode,
  no ``torch.func`` transform, no forward-mode tangent): the memory of a float32,
  bfloat16 or float16 tensor is read in place (half precision as its bits, which the
  kernels widen and round themselves; float16 is widened to float32 by torch first on
  CPUs without float16 conversions), and the result is wrapped with
  ``torch.from_numpy``. For torch tensors the kernels run on
  torch's own OpenMP threads (:mod:`stablemath._cpu_team`). Cross-entropy takes
  tensors under autograd too: the kernel computes the loss and its gradient in one
  pass over the logits, and a ``torch.autograd.Function`` (:func:`_precomputed_grad`)
  scales that gradient in its backward;
* **torch's fused functions in float64** for the other torch CPU tensors (softmax,
  log_softmax and logsumexp under autograd, which then differentiates them: the
  gradients are the analytic ones).

Why no precaution is lost: the arithmetic runs in float64 on values that are exact
float32 (or narrower) numbers, so ``x - m`` is exact and every float64 rounding is
2**-29 of an output ulp; the error-free corrections of the generic path (TwoSum of the
shift, compensated sums) have nothing left to correct. What does matter is kept: where
the maximum dominates a row, the maximal entries are taken out of the sum and counted
(``log(k) + log1p(s / k)``), so a dominant term keeps full relative precision (SPEC
§3.5); ``-inf`` entries give
``exp(-inf) = 0`` and ``-inf`` log-probabilities with finite gradients.

The same tests run on both paths: ``STABLEMATH_DISABLE_FASTPATHS=1`` turns this module
off (the nox sessions ``tests(numpy-generic)`` and ``tests(torch-generic)``).

Why it exists (``nox -s bench``, quick set, 2-core VM, p50 time as a ratio to the
native function, float32; "generic" from a run with ``STABLEMATH_DISABLE_FASTPATHS=1``,
"float64 ufuncs" the NumPy/torch-op form these kernels replaced, quick run at b231f2f;
"kernels" the first compiled kernels, run at 682c27a; "now" the run at dba14f0, the
README's: vectorised row maximum, no SIMD division, torch tensors on torch's threads):

==================================  =======  ==============  =======  =====
op, shape, provider / native        generic  float64 ufuncs  kernels  now
==================================  =======  ==============  =======  =====
softmax 4096x1000, numpy/scipy       3.67     2.32           0.50     0.29
softmax 256x32000, numpy/scipy       5.78     1.94           0.46     0.42
log_softmax 256x32000, numpy         9.73     3.57           0.42     0.35
logsumexp 4096x1000, numpy           1.98     1.05           0.30     0.16
logsumexp 256x32000, numpy            —       0.90           0.14     0.14
cross_entropy fwd 256x32000, numpy  26.56      —             0.29     0.24
softmax 4096x1000, torch            13.0      9.91           3.50     1.43
logsumexp 256x32000, torch          12.0      4.63           1.00     0.41
cross_entropy fwd+bwd 4096x1000     21.4      3.01           2.02     0.88
==================================  =======  ==============  =======  =====

The floor of the compiled kernels is the float64 polynomial (8 lanes of AVX-512 on the
test machine, about 1.3 cycles an element); torch's own float32 softmax evaluates
``exp`` at 16 lanes.

float32 arithmetic would be faster still and is not within 2 ulp: on the reference
vectors ``torch.softmax`` and ``scipy.special.softmax`` in float32 are off by up to 58
and 57 ulp, this module's results by 0.5 (``python benchmarks/accuracy.py``).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import numpy as np

from . import _triton
from ._lib import _env
from ._lib._compat import can_inspect_values, finish, numpy_view, plain_tensor

__all__ = ["DISABLE_ENV", "cross_entropy", "log_softmax", "logsumexp", "softmax"]

DISABLE_ENV = "STABLEMATH_DISABLE_FASTPATHS"  # "1": off (read at each call)
# whether that or TRITON_INTERPRET is set, read at each call
_SWITCHED = _env.either(DISABLE_ENV, "TRITON_INTERPRET")
_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
# half precision tensors reach the kernels as their bits (numpy_view's half_bits):
# bfloat16 in uint16, float16 in int16, the element types the kernels read as such
_BFLOAT16_BITS = np.dtype(np.uint16)
_FLOAT16_BITS = np.dtype(np.int16)
_BITS = (_BFLOAT16_BITS, _FLOAT16_BITS)
_NO_WEIGHT = np.empty(0)  # the kernels' "no class weights" and "no gradient"
_NO_GRAD = np.empty((0, 0), np.float32)
_LARGEST = {np.dtype(d): float(np.finfo(d).max) for d in (np.float16, np.float32)}


_TORCH_FLOATS: tuple[Any, ...] = ()


def _torch_floats() -> tuple[Any, ...]:
    """float32, float16 and bfloat16 of torch, once torch is imported."""
    global _TORCH_FLOATS, _IS_COMPILING
    torch = sys.modules["torch"]
    _TORCH_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
    _IS_COMPILING = torch.compiler.is_compiling
    return _TORCH_FLOATS


_IS_COMPILING: Any = None  # torch.compiler.is_compiling, looked up once


def _kind(x: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or ``"jax"`` where a fast path applies to ``x``'s type
    and dtype (and for torch, device; for JAX, the device is :mod:`._xla_ffi`'s to
    decide), else None."""
    if type(x) is np.ndarray:
        return "numpy" if x.dtype in _NUMPY_DTYPES and not _env.flag(DISABLE_ENV) else None
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(x, torch.Tensor):
        jax = sys.modules.get("jax")
        if jax is None or not isinstance(x, jax.Array) or _env.flag(DISABLE_ENV):
            return None
        return "jax" if _xla().supported_dtype(x.dtype) else None
    if not x.is_cpu or x.dtype not in (_TORCH_FLOATS or _torch_floats()):
        return None
    # the compiler's check first: torch.compile need not trace the environment reads
    # (whether a value can be read under torch.func is _dispatch's to ask, for the
    # one path that reads values)
    if (_IS_COMPILING or torch.compiler.is_compiling)():
        return None
    if _SWITCHED() and (
        # the Triton kernels' own tests run them on CPU tensors
        _env.flag(DISABLE_ENV) or _triton.supports(x)
    ):
        return None
    return "torch"


# --- NumPy arrays and plain torch CPU float32 tensors: the compiled row kernels ---------


_COMPILED: Any = None


def _compiled() -> Any:
    """:mod:`stablemath._cpu_kernels`, imported at first use: importing Numba takes
    about 0.2 s, which ``import stablemath`` should not pay."""
    global _COMPILED
    if _COMPILED is None:
        from . import _cpu_kernels

        _COMPILED = _cpu_kernels
    return _COMPILED


_XLA: Any = None


def _xla() -> Any:
    """:mod:`stablemath._xla_ffi`, the kernels as XLA FFI targets (imported at first
    use, like :func:`_compiled`)."""
    global _XLA
    if _XLA is None:
        from . import _xla_ffi

        _XLA = _xla_ffi
    return _XLA


_TEAM: Any = None
_TEAM_MODULE: Any = None


def _on_torch_threads() -> Any:
    """:func:`stablemath._cpu_team.run_rows`, which runs the kernels for torch tensors
    on torch's own OpenMP threads (imported at first use)."""
    global _TEAM
    if _TEAM is None:
        _TEAM = _team().run_rows
    return _TEAM


def _team() -> Any:
    """:mod:`stablemath._cpu_team` (imported at first use)."""
    global _TEAM_MODULE
    if _TEAM_MODULE is None:
        from . import _cpu_team

        _TEAM_MODULE = _cpu_team
    return _TEAM_MODULE


def _as_rows(x: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The slices of ``x`` along ``axis`` as the rows of a C-contiguous float32 array,
    or of half precision bits (a view when ``axis`` is the last one of a contiguous
    array of either, else one copy), and the shape of ``x`` with ``axis`` moved last."""
    shape = x.shape
    common = len(shape) == 2 and axis == 1 and x.flags.c_contiguous
    if common and (x.dtype == np.float32 or x.dtype in _BITS):
        return x, shape  # the common call: the array as it is
    if axis != x.ndim - 1:  # np.moveaxis costs 2-3 us: too much to pay for the common case
        x = np.moveaxis(x, axis, -1)
        shape = x.shape
    if x.dtype in _BITS:
        x = np.ascontiguousarray(x)
    elif x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    return (x if x.ndim == 2 else x.reshape(-1, shape[-1])), shape


def _np_normalise(
    kernel: str, x: np.ndarray, axis: int, t: float, run: Any = None
) -> np.ndarray | None:
    """softmax or log_softmax by the kernel named ``kernel``; NumPy float16 results
    are rounded once, from float64, and half precision bits give bits of the same.
    ``run`` runs the kernel over the rows (default
    :func:`stablemath._cpu_kernels.run_rows`)."""
    compiled = _COMPILED or _compiled()
    wide = x.dtype == np.float16
    rows, shape = _as_rows(x, axis)
    out = np.empty(shape, dtype=np.float64 if wide else rows.dtype)
    flat = out if out.ndim == 2 else out.reshape(rows.shape)
    if not (run or compiled.run_rows)(getattr(compiled, kernel), rows, flat, 1.0 / t):
        return None
    if axis != x.ndim - 1:
        out = np.moveaxis(out, -1, axis)
    return finish(out, x.dtype, np) if wide else out


# (partial objects: a call through one costs less than through a Python function)
_np_softmax = functools.partial(_np_normalise, "softmax_rows")
_np_log_softmax = functools.partial(_np_normalise, "log_softmax_rows")


def _np_logsumexp(x: np.ndarray, axis: int, keepdims: bool, run: Any = None) -> np.ndarray | None:
    """float32 for float32 and half precision bits (the torch path rounds it)."""
    wide = x.dtype == np.float16
    rows, shape = _as_rows(x, axis)
    out = np.empty(shape[:-1], dtype=np.float64 if wide else np.float32)
    run = run or _compiled().run_rows
    if not run(_compiled().logsumexp_rows, rows, out.reshape(-1), 1.0):
        return None
    if keepdims:
        out = np.expand_dims(out, axis)
    # a float32 result is the kernel's one rounding; float16 is rounded once from
    # float64, and may overflow to inf where the true value is beyond float16 (SPEC §3.2)
    return finish(out, x.dtype, np) if wide else out


def _np_cross_entropy(
    x: np.ndarray,
    target: np.ndarray,
    axis: int,
    weight: np.ndarray | None,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    grad_into: Any = None,
    run: Any = None,
) -> Any:
    """Hard-target cross-entropy of ``x / temperature`` (with the z-loss ``z_loss``,
    of the logits soft-capped first where ``softcap`` is not 0) from the kernel's
    per-sample losses, reduced here in float64 and rounded once. With ``grad_into`` (``shape -> float32 array``) also its
    gradient w.r.t. ``x`` for an upstream gradient of 1, computed in the same pass over
    the logits into ``grad_into(shape)``: then ``(loss, grad)``. None where the generic
    kernel decides (a row the kernel refuses, or a mean over no kept sample: SPEC §4's
    0 with a zero gradient)."""
    result_dtype = np.dtype(np.float32) if x.dtype in _BITS else x.dtype
    rows, shape = _as_rows(x, axis)
    t = np.ascontiguousarray(target, dtype=np.int64).reshape(-1)
    w = _NO_WEIGHT if weight is None else np.ascontiguousarray(weight, dtype=np.float64)
    # the targets are checked here, not by the facade: a batch of one paid 8 us there
    compiled = _COMPILED or _compiled()
    total = compiled.target_total(t, w, ignore_index, shape[-1])
    if total < 0 or (reduction == "mean" and total == 0):
        return None  # a target out of range (the generic path raises), or 0 / 0
    denominator = total if reduction == "mean" else 1.0
    grad = _NO_GRAD if grad_into is None else grad_into(shape)
    loss = np.empty(rows.shape[0])
    inv_t = 1.0 / temperature
    grad_rows = grad.reshape(-1, shape[-1])
    args = (t, w, ignore_index, smoothing, inv_t, z_loss, softcap, grad_rows, 1.0 / denominator)
    if not (run or compiled.run_rows)(compiled.cross_entropy_rows, rows, loss, *args):
        return None
    if reduction == "none":
        res = finish(loss.reshape(shape[:-1]), result_dtype, np)
    else:
        # (one sample's loss as it is: NumPy's sum of one element costs 0.6 us)
        res = _rounded(
            float(loss[0] if loss.size == 1 else loss.sum()) / denominator, result_dtype
        )
    if grad_into is None:
        return res
    return res, grad if axis == x.ndim - 1 else np.moveaxis(grad, -1, axis)


def _rounded(value: float, dtype: np.dtype) -> np.ndarray:
    """The float ``value`` rounded to ``dtype`` (float32 or float16), as a 0-d array;
    ``+-inf`` beyond its range (SPEC §3.2). Rounded directly when it cannot overflow:
    :func:`finish`'s quiet cast costs 1 us more."""
    if abs(value) <= _LARGEST[dtype]:
        return np.asarray(value, dtype)
    return finish(np.asarray(value), dtype, np)


_PRECOMPUTED: Any = None


def _precomputed_grad() -> Any:
    """``apply(x, box)`` of a ``torch.autograd.Function`` whose forward returns a
    cross-entropy computed outside torch and whose backward scales the gradient
    computed with it, ``box = (loss, grad, args)``, ``args`` the arguments of
    :func:`_torch_ce_float64` after ``x`` (``args[1]`` the class axis): the upstream
    gradient multiplies ``grad`` in place (unsqueezed at the class axis for per-sample
    losses). Under ``create_graph``, and for a second backward through a retained
    graph, the backward is instead ``torch.autograd.grad`` of
    ``_torch_ce_float64(x, *args)`` (the same loss in torch's ops), so second
    derivatives are right too."""
    global _PRECOMPUTED
    if _PRECOMPUTED is not None:
        return _PRECOMPUTED
    torch = sys.modules["torch"]

    class PrecomputedGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, box: tuple[Any, Any, tuple[Any, ...]]) -> Any:
            loss, ctx.grad, ctx.args = box
            ctx.save_for_backward(x)
            return loss

        @staticmethod
        def backward(ctx: Any, upstream: Any) -> Any:
            grad, ctx.grad = ctx.grad, None  # the buffer is handed over once
            if grad is None or torch.is_grad_enabled():
                # a second backward of a retained graph, or create_graph
                (x,) = ctx.saved_tensors
                with torch.enable_grad():
                    loss = _torch_ce_float64(x, *ctx.args)
                create = torch.is_grad_enabled()
                (gx,) = torch.autograd.grad(loss, x, upstream, create_graph=create)
                return gx, None
            if upstream.ndim:
                upstream = upstream.unsqueeze(ctx.args[1])
            elif upstream.item() == 1.0:
                # loss.backward() of the reduced loss: the buffer is the gradient as it
                # is, with no pass to multiply it by 1
                return grad, None
            # in place, and no reference kept: autograd can take the buffer as x.grad
            # (autograd rounds a float32 gradient to the dtype of half-precision logits)
            return grad.mul_(upstream), None

    # Function.apply is a Python method around torch's C one; the questions it adds (about
    # torch.func transforms and their wrapped tensors) took 1.3 us of its 3.2 at 1x10.
    # The callers have had their answers from plain_tensor, which turns away tensors
    # inside a transform and wrapped ones: they call the C method directly where torch
    # has it (torch._C._FunctionBase.apply, what Function.apply ends in).
    base = getattr(torch._C, "_FunctionBase", None)
    method = vars(base).get("apply") if base is not None else None
    if method is not None and issubclass(PrecomputedGrad, base):
        _PRECOMPUTED = method.__get__(PrecomputedGrad, PrecomputedGrad)
    else:
        _PRECOMPUTED = PrecomputedGrad.apply
    return _PRECOMPUTED


# --- PyTorch (CPU) ------------------------------------------------------------------------


_ELEMENTS: dict[Any, Any] = {}


def _torch_elements() -> dict[Any, Any]:
    """The kernels' element type of each torch dtype whose memory they read as it is
    (float16 only where the CPU converts it)."""
    torch = sys.modules["torch"]
    _ELEMENTS[torch.float32] = np.float32
    _ELEMENTS[torch.bfloat16] = np.uint16
    if _compiled().FLOAT16_CONVERSIONS:
        _ELEMENTS[torch.float16] = np.int16
    return _ELEMENTS


_NOT_SMALL = object()  # "not for _torch_small": the other torch paths decide


def _torch_small(func: str, x: Any, axis: int, arg: Any) -> Any:
    """``func`` (softmax, log_softmax, logsumexp) of a small C-contiguous torch tensor
    along its last axis, by the kernel on the calling thread, which reads the memory
    at its address (:func:`stablemath._cpu_team.at_address`); the result in a NumPy
    array wrapped by ``torch.from_numpy``, as on the other paths. None for a slice
    that is for the generic kernel; :data:`_NOT_SMALL` for any other tensor.

    This is the path of a 1x10 call, where every check costs. The NumPy view of the
    input (``Tensor.numpy()`` and :func:`~stablemath._lib._compat.numpy_view`'s
    checks, 1.3 us) was the largest part of the call overhead; here the same checks
    (:func:`~stablemath._lib._compat.plain_tensor`, its torch functions looked up
    once) and ``data_ptr`` take 0.5. Call overhead over the native function, 1x10
    float32, ``benchmarks/run.py --providers sm-torch,torch --shapes 1x10 --dtypes
    float32``, two runs each, before -> after (with the facades' fast-path call
    moved out of ``_normalize`` and the two environment reads made one): softmax
    +4.5-4.7 us -> +2.2-2.3, log_softmax +5.0-5.5 -> +2.5-2.6, logsumexp -0.6-1.0 ->
    -2.0-2.2 (``torch.softmax`` itself 1.2 us).

    A plain ``torch.Tensor`` comes here before :func:`_kind` is asked (see
    :func:`_dispatch`), and asks the questions of ``_kind`` that matter here itself:
    the compiler, the switches, the device; the dtype is the question of :data:`_AT`,
    which also remembers the dtypes that have no kernel. Call overhead, 1x10 float32,
    ``benchmarks/run.py --ops softmax,log_softmax,logsumexp,ce_fwd,ce_fwdbwd
    --providers sm-torch,torch --shapes 1x10 --dtypes float32``, three runs each,
    interleaved with a tree of the commit before, before -> after: softmax +2.8-3.0 us
    -> +2.4-2.5, log_softmax +3.1-3.7 -> +2.9-3.1, logsumexp -3.5-3.8 -> -3.9-4.6.
    """
    # (_kind's questions, the compiler's first: the dispatch asked only the type)
    if _IS_COMPILING() or _SWITCHED() or not x.is_cpu:
        return _NOT_SMALL
    shape = x.shape
    ndim = len(shape)
    if not ndim or (axis != -1 and axis != ndim - 1):
        return _NOT_SMALL
    dtype = x.dtype
    run = _AT.get((func, dtype), _UNSEEN)
    if run is _UNSEEN:
        run = _at_address(func, dtype)
    if run is None:
        return _NOT_SMALL
    n = shape[-1]
    size = x.numel()
    if not n or size >= _SMALL or not x.is_contiguous() or not plain_tensor(x):
        return _NOT_SMALL
    rows = size // n
    if func == "logsumexp":
        out = np.empty(rows, np.float32)
        if not run(x.data_ptr(), rows, n, out, 1.0):
            return None
        return _as_tensor(out.reshape(shape[:-1] + (1,) * arg), dtype)
    out = np.empty((rows, n), _ELEMENTS[dtype])
    if not run(x.data_ptr(), rows, n, out, 1.0 / arg):
        return None
    # (float32, the common case, without _as_tensor's questions)
    res = _TORCH_FROM_NUMPY(out) if dtype is _FLOAT32 else _as_tensor(out, dtype)
    return res if ndim == 2 else res.view(shape)


_REDUCE: dict[str, int] = {}  # reduction -> _cpu_team.NONE, SUM, MEAN


def _torch_small_cross_entropy(
    x: Any,
    target: Any,
    axis: int,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    temperature: float,
    z_loss: float,
    softcap: float | None,
) -> Any:
    """Cross-entropy without class weights or mask of a small C-contiguous torch
    tensor along its last axis, with C-contiguous int64 targets, read at their
    addresses as in :func:`_torch_small`: targets checked, kernel and reduction in one
    call (:func:`stablemath._cpu_team.at_address`). Under autograd the kernel's
    gradient is attached as on the larger path (:func:`_precomputed_grad`). None
    where the generic path decides; :data:`_NOT_SMALL` for any other input.

    The path of a 1x10 call. Overhead over ``F.cross_entropy`` at 1x10 float32
    (``benchmarks/run.py --providers sm-torch,torch --shapes 1x10 --dtypes float32``,
    two runs each, before -> after): forward +9.6-10.0 us -> +3.3-3.4, forward and
    backward +19.7-19.9 -> +7.9-8.0. What is left is mostly the checks (2 us) and,
    under autograd, the autograd.Function: its C ``apply`` (1.9 us alone, see
    :func:`_precomputed_grad`) and the engine's call of its Python backward. With the
    C ``apply`` instead of ``Function.apply`` (3.2 us), forward and backward +8.3-9.0
    -> +4.6-4.9 us (``--ops ce_fwd,ce_fwdbwd --shapes 1x10,64x1000``, two runs each,
    interleaved with a worktree of the commit before).

    Asked before :func:`_kind`, as :func:`_torch_small` is, and with the arguments of
    the second derivative's loss handed to the autograd.Function as a tuple instead of
    a closure (whose cells every call paid for, autograd or not): forward +3.2-3.4 us
    -> +2.2-2.9 (the runs of :func:`_torch_small`'s figures); forward and backward
    +9.0-12.1 -> +8.8-12.9, where the autograd engine's own 35-40 us of the call moved
    more than that between runs.
    """
    # (_kind's questions, the compiler's first: the router asked only the type)
    if _IS_COMPILING() or _SWITCHED() or not x.is_cpu:
        return _NOT_SMALL
    shape = x.shape
    ndim = len(shape)
    if not ndim or (axis != -1 and axis != ndim - 1):
        return _NOT_SMALL
    dtype = x.dtype
    run = _AT.get(("cross_entropy", dtype), _UNSEEN)
    if run is _UNSEEN:
        run = _at_address("cross_entropy", dtype)
    if run is None or type(target) is not _TENSOR or target.dtype is not _INT64:
        return _NOT_SMALL
    n = shape[-1]
    size = x.numel()
    if not n or size >= _SMALL_CROSS_ENTROPY or not x.is_contiguous():
        return _NOT_SMALL
    if not target.is_cpu:
        return _NOT_SMALL
    rows = size // n
    # the shape: (a slice of a torch.Size and its comparison cost 0.3 us)
    if target.dim() != ndim - 1 or (
        target.numel() != rows if ndim <= 2 else target.shape != shape[:-1]
    ):
        return _NOT_SMALL
    if not target.is_contiguous() or not plain_tensor(x, target, attaches_grad=True):
        return _NOT_SMALL
    grad = x.requires_grad and _GRAD_MODE()
    if grad:  # (as on the larger path: torch's memory where it is not small)
        g = (_np_float32_empty if size < _SMALL_GRAD else _torch_float32_empty)((rows, n))
    else:
        g = _NO_GRAD
    loss = np.empty(rows)
    reduce = _REDUCE[reduction]
    inv_t = 1.0 / temperature
    cap = 0.0 if softcap is None else softcap
    value = run(
        x.data_ptr(),
        rows,
        n,
        target.data_ptr(),
        _NO_WEIGHT,
        ignore_index,
        smoothing,
        inv_t,
        z_loss,
        cap,
        loss,
        g,
        reduce,
    )
    if value != value:
        return None
    if reduction == "none":
        res = _TORCH_FROM_NUMPY(finish(loss.reshape(tuple(shape[:-1])), _F32, np))
    else:
        fits = abs(value) <= _FLOAT32_MAX  # (_rounded's own question, without its lookup)
        res = _TORCH_FROM_NUMPY(np.asarray(value, np.float32) if fits else _rounded(value, _F32))
    if dtype is not _FLOAT32:
        res = res.to(dtype)
    if not grad:
        return res
    again = (target, axis, None, ignore_index, reduction, smoothing, temperature, z_loss, cap)
    g = _TORCH_FROM_NUMPY(g)
    return (_PRECOMPUTED or _precomputed_grad())(
        x, (res, g if ndim == 2 else g.view(shape), again)
    )


_F32 = np.dtype(np.float32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_AT: dict[tuple[str, Any], Any] = {}
_UNSEEN = object()
_FLOAT32: Any = None
_TORCH_FROM_NUMPY: Any = None
_INT64: Any = None
_GRAD_MODE: Any = None
_TENSOR: Any = None
_SMALL = _SMALL_CROSS_ENTROPY = 0  # _cpu_team's, once it is imported


def _at_address(func: str, dtype: Any) -> Any:
    """:func:`stablemath._cpu_team.at_address` of ``func``'s kernel for tensors of
    ``dtype``, or None where the kernels do not read that dtype's memory."""
    global _FLOAT32, _TORCH_FROM_NUMPY, _INT64, _GRAD_MODE, _TENSOR, _SMALL, _SMALL_CROSS_ENTROPY
    torch = sys.modules["torch"]
    _FLOAT32, _TORCH_FROM_NUMPY = torch.float32, torch.from_numpy
    _INT64, _GRAD_MODE, _TENSOR = torch.int64, torch.is_grad_enabled, torch.Tensor
    _torch_floats()  # (and _IS_COMPILING)
    team = _team()
    _SMALL, _SMALL_CROSS_ENTROPY = team.SMALL, team.SMALL_CROSS_ENTROPY
    _REDUCE.update(none=team.NONE, sum=team.SUM, mean=team.MEAN)
    element = (_ELEMENTS or _torch_elements()).get(dtype)
    if element is None:
        _AT[func, dtype] = None  # (asked once)
        return None
    run = _AT[func, dtype] = team.at_address(getattr(_compiled(), func + "_rows"), element)
    return run


def _torch_view(x: Any) -> np.ndarray | None:
    """The memory of a float32 or half precision tensor that no autodiff or transform
    sees (:func:`~stablemath._lib._compat.numpy_view`), for the compiled kernels, or
    None (torch's ops then run). Half precision comes as its bits: the kernels read
    bfloat16 and float16 themselves, widening each element (exact) and rounding
    softmax and log_softmax to its dtype from float32, the result torch's ``.to`` of a
    float32 result gives (SPEC §3.4: float32 arithmetic inside, or better); where the
    CPU has no float16 conversions a float16 tensor is widened by torch first, with
    the same result."""
    view = numpy_view(x, half_bits=True)
    if view is None or view.dtype != _FLOAT16_BITS or not _widened_by_torch(x):
        return view
    return numpy_view(x.float())


def _widened_by_torch(x: Any) -> bool:
    """A float16 tensor where the kernels cannot convert float16 themselves."""
    return x.dtype == sys.modules["torch"].float16 and not _compiled().FLOAT16_CONVERSIONS


def _as_tensor(res: np.ndarray, dtype: Any) -> Any:
    """A kernel's result as a torch tensor of ``dtype``: half precision bits
    reinterpreted, float32 rounded where ``dtype`` is narrower."""
    torch = sys.modules["torch"]
    if res.dtype in _BITS:
        return torch.from_numpy(res.view(np.int16)).view(dtype)
    out = torch.from_numpy(res)
    return out if out.dtype == dtype else out.to(dtype)


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


_SMALL_GRAD = 1 << 14  # elements of a gradient buffer that NumPy allocates


def _np_float32_empty(shape: tuple[int, ...]) -> np.ndarray:
    return np.empty(shape, np.float32)


def _torch_float32_empty(shape: tuple[int, ...]) -> np.ndarray:
    return sys.modules["torch"].empty(shape).numpy()


def _torch_cross_entropy(
    x: Any,
    target: Any,
    axis: int,
    weight: Any,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> Any:
    torch = sys.modules["torch"]
    if not target.is_cpu or (weight is not None and not weight.is_cpu):
        return None  # the generic path tells (torch raises)
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return None  # torch's loss has no gradient for the weights; the generic one has
    t = numpy_view(target)  # None inside a torch.func transform: no values to read
    if t is None:
        return None
    w = None if weight is None else numpy_view(weight)  # None for bfloat16 weights
    # half precision logits are widened to float32 (exact) for the kernel; the loss
    # and the gradient are rounded to their dtype at the end (SPEC §3.4)
    if weight is None or w is not None:
        args = (t, axis, w, ignore_index, reduction, smoothing, temperature, z_loss, softcap)
        # the kernel reads half precision bits itself, except float16 where it cannot
        # (then widened by torch, recorded by autograd, which makes numpy_view refuse)
        wide = x.float() if _widened_by_torch(x) else x
        view = numpy_view(wide, half_bits=True)  # None under autograd
        if view is not None:
            res = _np_cross_entropy(view, *args, run=_on_torch_threads())
            return None if res is None else _as_tensor(res, x.dtype)
        view = numpy_view(wide, attaches_grad=True, half_bits=True)
        if view is not None:
            # the gradient in torch's memory: a NumPy buffer of 16 MB handed to torch
            # and freed there was paged in afresh at every call (4900 page faults a
            # call, fwd+bwd 4096x1000 in 22 ms instead of 12 ms); a small one from
            # NumPy (torch.empty and .numpy() cost 1.8 us, np.empty 0.2)
            small = view.size < _SMALL_GRAD
            empty = _np_float32_empty if small else _torch_float32_empty
            both = _np_cross_entropy(view, *args, grad_into=empty, run=_on_torch_threads())
            if both is None:
                return None
            loss, grad = (torch.from_numpy(a) for a in both)
            if loss.dtype is not x.dtype:  # (.to of the same dtype costs 0.8 us)
                loss = loss.to(x.dtype)
            again = (
                target,
                axis,
                weight,
                ignore_index,
                reduction,
                smoothing,
                temperature,
                z_loss,
                softcap,
            )
            return (_PRECOMPUTED or _precomputed_grad())(x, (loss, grad, again))
    # the targets are checked here, not by the facade (see _np_cross_entropy)
    t = np.ascontiguousarray(t, dtype=np.int64).reshape(-1)  # the kernel takes one axis
    if _compiled().target_total(t, _NO_WEIGHT, ignore_index, x.shape[axis]) < 0:
        return None
    loss = _torch_ce_float64(
        x, target, axis, weight, ignore_index, reduction, smoothing, temperature, z_loss, softcap
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


def _torch_ce_float64(
    x: Any,
    target: Any,
    axis: int,
    weight: Any,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float = 0.0,
) -> Any:
    """``torch.nn.functional.cross_entropy`` of ``x / temperature`` in float64, plus
    the z-loss ``z_loss * logsumexp**2`` of each sample that is not ignored (whose sum
    a mean divides by the same total weight); ``x`` soft-capped first, ``softcap *
    tanh(x / softcap)``, where ``softcap`` is not 0."""
    torch = sys.modules["torch"]
    if x.ndim > 1 and axis != 1:
        x = torch.movedim(x, axis, 1)  # torch's class axis
    x64 = x.double()
    if softcap:
        x64 = softcap * torch.tanh(x64 / softcap)
    if temperature != 1.0:
        x64 = x64 / temperature
    target = target.long()
    w64 = None if weight is None else weight.double()
    loss = torch.nn.functional.cross_entropy(
        x64,
        target,
        weight=w64,
        ignore_index=ignore_index,
        reduction="none" if z_loss else reduction,
        label_smoothing=smoothing,
    )
    if z_loss:
        kept = target != ignore_index
        lse = torch.logsumexp(x64, dim=1 if x.ndim > 1 else 0)
        loss = loss + torch.where(kept, z_loss * lse * lse, 0.0)
        if reduction == "sum":
            loss = torch.sum(loss)
        elif reduction == "mean":
            picked = (
                1.0 if w64 is None else w64[target.clamp(0, x.shape[-1 if x.ndim == 1 else 1] - 1)]
            )
            loss = torch.sum(loss) / torch.sum(torch.where(kept, picked, 0.0))
    return loss.to(x.dtype)


# --- dispatch -------------------------------------------------------------------------------


def _slice_axis(shape: tuple[int, ...], axis: int) -> int | None:
    """``axis`` as an index into ``shape``, or None where it is out of range or the axis
    is empty: the facade then raises, or gives the empty result."""
    ndim = len(shape)
    if not -ndim <= axis < ndim or shape[axis] == 0:
        return None
    return axis % ndim


def _dispatch(func: str, numpy_impl: Any, torch_ops: Any, x: Any, axis: int, *args: Any) -> Any:
    """``numpy_impl(x, axis % x.ndim, *args)`` for a NumPy array or the memory of a
    torch tensor (:func:`_torch_view`, the result wrapped as a tensor), else
    ``torch_ops`` for a torch tensor whose values can be read, and the XLA FFI call of
    ``func`` (:mod:`stablemath._xla_ffi`) for a JAX array; None where no fast path
    applies (:func:`_slice_axis`), or where the generic kernel must decide.

    A plain torch tensor goes to :func:`_torch_small` before :func:`_kind` is asked.
    One function for the three normalisers: on a 1x10 tensor each Python call costs
    0.1-0.3 us, and the layers of calls were most of the call overhead. With them
    gone, the namespace resolved only after the fast paths, and the environment read
    cheaply (:mod:`stablemath._lib._env`), a 1x10 float32 ``softmax`` costs 3.9 us
    more than ``torch.softmax`` where it cost 8.6 more (thread time, interleaved, the
    median of 41 rounds of 1000 calls), and ``logsumexp`` 1.5 us less than
    ``torch.logsumexp``."""
    # a plain tensor goes to the small path first, which asks _kind's questions itself
    # (a tensor of another type, such as a Parameter, once _kind has answered)
    if type(x) is _TENSOR:
        res = _torch_small(func, x, axis, *args)
        if res is not _NOT_SMALL:
            return res
    kind = _kind(x)
    if kind is None:
        return None
    if kind == "jax":
        axis = _slice_axis(x.shape, axis)
        if axis is None or x.size == 0:
            return None
        if func == "logsumexp":
            return _xla().logsumexp(x, axis, *args)
        return _xla().normalise(func, x, axis, *args)
    if kind == "torch" and type(x) is not _TENSOR:
        res = _torch_small(func, x, axis, *args)
        if res is not _NOT_SMALL:
            return res
    view = x if kind == "numpy" else _torch_view(x)
    shape = x.shape if view is None else view.shape  # (a NumPy shape costs less)
    axis = _slice_axis(shape, axis)
    if axis is None:
        return None
    if view is x:
        return numpy_impl(x, axis, *args)
    if view is None:
        # torch's ops read a value or two (.item()): not for a tensor torch.func.vmap
        # batches, which the generic kernel takes
        return torch_ops(x, axis, *args) if can_inspect_values(x) else None
    res = numpy_impl(view, axis, *args, _TEAM or _on_torch_threads())
    return None if res is None else _as_tensor(res, x.dtype)


# softmax(x, axis, temperature), log_softmax(x, axis, temperature) and
# logsumexp(x, axis, keepdims): the result along ``axis`` (an int, possibly negative or
# out of range), or None where no fast path applies. Partial objects of _dispatch: a
# call through one costs 0.1 us less than through a function that calls it.
softmax = functools.partial(_dispatch, "softmax", _np_softmax, _torch_softmax)
log_softmax = functools.partial(_dispatch, "log_softmax", _np_log_softmax, _torch_log_softmax)
logsumexp = functools.partial(_dispatch, "logsumexp", _np_logsumexp, _torch_logsumexp)


def _masked_target(kind: str, where: Any, target: Any, ignore_index: int) -> Any:
    """``target`` with ``ignore_index`` where the boolean ``where`` (of the same
    library, broadcastable to the target's shape) is False; None for any other mask,
    which the generic path checks (and rejects)."""
    shape = tuple(target.shape)
    if kind == "numpy":
        if type(where) is not np.ndarray or where.dtype != np.bool_:
            return None
        if not _broadcasts_to(where.shape, shape):
            return None
        # (int64 first: ignore_index need not fit the target's own integer dtype)
        return np.where(where, target.astype(np.int64, copy=False), ignore_index)
    if kind == "jax":
        jax = sys.modules["jax"]
        if not isinstance(where, jax.Array) or where.dtype != np.bool_:
            return None
        if not _broadcasts_to(where.shape, shape):
            return None
        # in the target's own dtype (a cast could wrap a target out of range into one)
        info = np.iinfo(target.dtype)
        if not info.min <= ignore_index <= info.max:
            return None
        return jax.numpy.where(where, target, ignore_index)
    torch = sys.modules["torch"]
    if not isinstance(where, torch.Tensor) or where.dtype is not torch.bool:
        return None
    if not where.is_cpu or not _broadcasts_to(where.shape, shape):
        return None
    return torch.where(where, target.long(), ignore_index)


def _broadcasts_to(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``to`` (and not beyond it)."""
    try:
        return np.broadcast_shapes(tuple(shape), to) == to
    except ValueError:
        return False


def cross_entropy(
    x: Any,
    target: Any,
    axis: int,
    weight: Any,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    where: Any,
    temperature: float,
    z_loss: float,
    softcap: float | None,
) -> Any:
    """Cross-entropy with integer targets and the options torch has, a ``temperature``,
    the ``z_loss`` and a ``softcap``: the compiled
    kernel for NumPy arrays and float32 tensors outside autodiff, torch's
    ``cross_entropy`` in float64 for other torch CPU tensors, the kernel as an XLA FFI
    call for JAX arrays (:func:`stablemath._xla_ffi.cross_entropy`); None where the generic
    kernel must decide (see above), and for anything it must reject: here ``axis`` is
    the int the caller gave, and the target's type, integer dtype and shape, the
    weight's type and shape and the mask's type, dtype and shape are checked (the
    values, by the kernels). A per-sample mask ``where`` makes its ``False`` samples'
    targets ``ignore_index`` (SPEC: they count exactly as ignored ones)."""
    # a plain tensor goes to the small path first, which asks _kind's questions itself
    # (a tensor of another type, such as a Parameter, once _kind has answered)
    small = weight is None and where is None
    if small and type(x) is _TENSOR:
        res = _torch_small_cross_entropy(
            x, target, axis, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap
        )
        if res is not _NOT_SMALL:
            return res
    kind = _kind(x)
    if kind is None:
        return None
    if small and kind == "torch" and type(x) is not _TENSOR:
        res = _torch_small_cross_entropy(
            x, target, axis, ignore_index, reduction, label_smoothing, temperature, z_loss, softcap
        )
        if res is not _NOT_SMALL:
            return res
    if kind == "numpy":
        arrays = type(target) is np.ndarray and (weight is None or type(weight) is np.ndarray)
        integers = arrays and target.dtype.kind in "iu"
    elif kind == "jax":
        jax = sys.modules["jax"]
        arrays = isinstance(target, jax.Array) and (
            weight is None or (isinstance(weight, jax.Array) and weight.dtype.kind == "f")
        )
        integers = arrays and target.dtype.kind in "iu"
    else:
        tensor = sys.modules["torch"].Tensor
        arrays = isinstance(target, tensor) and (weight is None or isinstance(weight, tensor))
        integers = arrays and not (target.is_floating_point() or target.is_complex())
        integers = integers and target.dtype is not sys.modules["torch"].bool
    if not integers:
        return None  # soft targets, another library's arrays, lists: the generic path
    shape = tuple(x.shape)  # (slicing a torch.Size costs 0.15 us, a tuple's less)
    axis = _slice_axis(shape, axis)
    if axis is None or tuple(target.shape) != shape[:axis] + shape[axis + 1 :]:
        return None
    if weight is not None and tuple(weight.shape) != shape[axis : axis + 1]:
        return None
    if where is not None:
        target = _masked_target(kind, where, target, ignore_index)
        if target is None:
            return None
    if kind == "jax":
        if x.size == 0:  # (no rows: nothing for XLA to call the kernel on)
            return None
        return _xla().cross_entropy(
            x,
            target,
            axis,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
            temperature,
            z_loss,
            softcap,
        )
    impl = _np_cross_entropy if kind == "numpy" else _torch_cross_entropy
    cap = 0.0 if softcap is None else softcap
    return impl(
        x, target, axis, weight, ignore_index, reduction, label_smoothing, temperature, z_loss, cap
    )
