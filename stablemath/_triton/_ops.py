"""PyTorch custom ops around the Triton kernels, and the functions that call them.

Each op works on a contiguous ``(rows, C)`` view (the wrappers at the bottom move the
reduced axes last, flatten them and make the rows contiguous; inputs are never
written). Each op is a ``torch.library.custom_op`` with a fake (meta) implementation
and an autograd formula, so it runs under autograd and ``torch.compile(fullgraph=True)``
as one opaque node. Nothing here reads a tensor's values on the host.

This module imports torch and Triton; :mod:`stablemath._triton` imports it lazily.
"""

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from . import _kernels as K

__all__ = ["cross_entropy", "log_softmax", "logsumexp", "softmax"]

Tensor = torch.Tensor

# Rows of up to MAX_SINGLE columns are held in registers in one block (read once);
# longer rows are streamed in LOOP_BLOCK-column blocks (read twice). Module attributes,
# so the tests can shrink them to exercise the streaming path on small rows.
MAX_SINGLE = 8192
LOOP_BLOCK = 4096


def _cdt(dtype: torch.dtype) -> tuple[Any, torch.dtype]:
    """The compute dtype (Triton's and torch's) of an input dtype.

    float32 inputs are computed in float64, as on the CPU: ``x - m`` is then exact and
    float64 ``exp`` and sums leave a single rounding to float32, within SPEC §3.5's
    2 ulp; float32 arithmetic measured 2.2-3.3 ulp through the facades (interpreter).
    Memory traffic is unchanged (rows are read and written in float32); the cost is
    float64 arithmetic, cheap on data-centre GPUs (H100: a fraction of the time of the
    memory traffic), slow on consumer GPUs. Half precision stays in float32 (SPEC §3.4).
    """
    if dtype in (torch.float64, torch.float32):
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def _block(num_cols: int) -> tuple[int, bool]:
    if num_cols <= MAX_SINGLE:
        return max(triton.next_power_of_2(num_cols), 16), True
    return LOOP_BLOCK, False


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _device_guard(x: Tensor) -> Any:
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _interpreter_casts() -> Any:
    """Under TRITON_INTERPRET=1 the kernels run as NumPy code, whose rounding of a
    float64 result beyond the float32 range to ``+-inf`` (the right answer, SPEC §3.2)
    warns "overflow encountered in cast"; compiled kernels do not warn."""
    if not K.INTERPRET:
        return contextlib.nullcontext()
    import numpy as np

    return np.errstate(over="ignore")


def _launch(kernel: Any, x: Tensor, rows: int, *args: Any, block: int, **consts: Any) -> None:
    # FP contraction off: the TwoSum remainders need plain IEEE additions, and the
    # compiled kernels then round like the interpreter that the CI tests run
    with _device_guard(x), _interpreter_casts():
        kernel[(rows,)](
            *args,
            BLOCK=block,
            INTERP=K.INTERPRET,
            num_warps=_warps(block),
            enable_fp_fusion=False,
            **consts,
        )


def _no_double_backward(ctx: Any, *grads: Any) -> Any:
    msg = (
        "second-order gradients through stablemath's Triton kernels are not supported; "
        "set STABLEMATH_DISABLE_TRITON=1 to use the generic path"
    )
    raise NotImplementedError(msg)


def _no_double_backward_setup(ctx: Any, inputs: Any, output: Any) -> None:
    return None


# ------------------------------------------------------------- softmax, log_softmax


@torch.library.custom_op("stablemath::softmax_fwd", mutates_args=())
def _softmax_fwd(
    x: Tensor, mask: Tensor | None, temperature: float, log: bool
) -> tuple[Tensor, Tensor]:
    rows, num_cols = x.shape
    cdt, tcdt = _cdt(x.dtype)
    y = torch.empty_like(x)
    lse = torch.empty(rows, dtype=tcdt, device=x.device)
    if rows:
        block, single = _block(num_cols)
        _launch(
            K.softmax_fwd_kernel,
            x,
            rows,
            x,
            x if mask is None else mask,
            y,
            lse,
            num_cols,
            temperature,
            block=block,
            HAS_MASK=mask is not None,
            LOG=log,
            SINGLE=single,
            CDT=cdt,
        )
    return y, lse


@_softmax_fwd.register_fake
def _(x: Tensor, mask: Tensor | None, temperature: float, log: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=_cdt(x.dtype)[1])


@torch.library.custom_op("stablemath::softmax_bwd", mutates_args=())
def _softmax_bwd(
    y: Tensor, g: Tensor, mask: Tensor | None, lse: Tensor, temperature: float, log: bool
) -> Tensor:
    rows, num_cols = y.shape
    cdt, _ = _cdt(y.dtype)
    dx = torch.empty_like(y)
    if rows:
        block, single = _block(num_cols)
        _launch(
            K.softmax_bwd_kernel,
            y,
            rows,
            y,
            g,
            y if mask is None else mask,
            lse,
            dx,
            num_cols,
            temperature,
            block=block,
            HAS_MASK=mask is not None,
            LOG=log,
            SINGLE=single,
            CDT=cdt,
        )
    return dx


@_softmax_bwd.register_fake
def _(
    y: Tensor, g: Tensor, mask: Tensor | None, lse: Tensor, temperature: float, log: bool
) -> Tensor:
    return torch.empty_like(y)


def _softmax_setup(ctx: Any, inputs: Any, output: Any) -> None:
    _, mask, temperature, log = inputs
    y, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(y, lse, mask)
    ctx.temperature = temperature
    ctx.log = log


def _softmax_backward(ctx: Any, gy: Tensor, glse: Any) -> Any:
    y, lse, mask = ctx.saved_tensors
    g = gy.to(y.dtype).contiguous()
    dx = torch.ops.stablemath.softmax_bwd(y, g, mask, lse, ctx.temperature, ctx.log)
    return dx, None, None, None


_softmax_fwd.register_autograd(_softmax_backward, setup_context=_softmax_setup)
_softmax_bwd.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)


# ---------------------------------------------------------------------- logsumexp


@torch.library.custom_op("stablemath::logsumexp_fwd", mutates_args=())
def _logsumexp_fwd(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    rows, num_cols = x.shape
    cdt, tcdt = _cdt(x.dtype)
    out = torch.empty(rows, dtype=x.dtype, device=x.device)
    m = torch.empty(rows, dtype=tcdt, device=x.device)
    total = torch.empty(rows, dtype=tcdt, device=x.device)
    if rows:
        block, single = _block(num_cols)
        _launch(
            K.logsumexp_fwd_kernel,
            x,
            rows,
            x,
            x if mask is None else mask,
            out,
            m,
            total,
            num_cols,
            block=block,
            HAS_MASK=mask is not None,
            SINGLE=single,
            CDT=cdt,
        )
    return out, m, total


@_logsumexp_fwd.register_fake
def _(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    rows = x.shape[0]
    tcdt = _cdt(x.dtype)[1]
    return x.new_empty(rows), x.new_empty(rows, dtype=tcdt), x.new_empty(rows, dtype=tcdt)


@torch.library.custom_op("stablemath::logsumexp_bwd", mutates_args=())
def _logsumexp_bwd(x: Tensor, mask: Tensor | None, g: Tensor, m: Tensor, total: Tensor) -> Tensor:
    rows, num_cols = x.shape
    cdt, _ = _cdt(x.dtype)
    dx = torch.empty_like(x)
    if rows:
        block, _ = _block(num_cols)
        _launch(
            K.logsumexp_bwd_kernel,
            x,
            rows,
            x,
            x if mask is None else mask,
            g,
            m,
            total,
            dx,
            num_cols,
            block=block,
            HAS_MASK=mask is not None,
            CDT=cdt,
        )
    return dx


@_logsumexp_bwd.register_fake
def _(x: Tensor, mask: Tensor | None, g: Tensor, m: Tensor, total: Tensor) -> Tensor:
    return torch.empty_like(x)


def _logsumexp_setup(ctx: Any, inputs: Any, output: Any) -> None:
    x, mask = inputs
    _, m, total = output
    ctx.mark_non_differentiable(m, total)
    ctx.save_for_backward(x, mask, m, total)


def _logsumexp_backward(ctx: Any, gout: Tensor, gm: Any, gtotal: Any) -> Any:
    x, mask, m, total = ctx.saved_tensors
    g = gout.to(m.dtype).contiguous()
    return torch.ops.stablemath.logsumexp_bwd(x, mask, g, m, total), None


_logsumexp_fwd.register_autograd(_logsumexp_backward, setup_context=_logsumexp_setup)
_logsumexp_bwd.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)


# -------------------------------------------------------------------- cross-entropy


@torch.library.custom_op("stablemath::cross_entropy_fwd", mutates_args=())
def _ce_fwd(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    mask: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
    grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    rows, num_cols = x.shape
    cdt, tcdt = _cdt(x.dtype)
    loss = torch.empty(rows, dtype=tcdt, device=x.device)
    dw = torch.empty(rows, dtype=tcdt, device=x.device)
    g = torch.empty((rows if grad else 0, num_cols), dtype=x.dtype, device=x.device)
    if rows:
        block = min(max(triton.next_power_of_2(num_cols), 16), LOOP_BLOCK)
        _launch(
            K.ce_fwd_kernel,
            x,
            rows,
            x,
            target,
            x if weight is None else weight,
            x if mask is None else mask,
            loss,
            dw,
            g if grad else x,
            num_cols,
            ignore_index,
            temperature,
            1.0 if softcap is None else softcap,
            1.0 - label_smoothing,
            label_smoothing / num_cols,
            z_loss,
            block=block,
            HAS_W=weight is not None,
            HAS_SMASK=mask is not None,
            HAS_CAP=softcap is not None,
            SMOOTH=label_smoothing > 0,
            ZLOSS=z_loss > 0,
            GRAD=grad,
            CDT=cdt,
        )
    return loss, dw, g


@_ce_fwd.register_fake
def _(
    x: Tensor,
    target: Tensor,
    weight: Tensor | None,
    mask: Tensor | None,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
    grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    rows, num_cols = x.shape
    tcdt = _cdt(x.dtype)[1]
    return (
        x.new_empty(rows, dtype=tcdt),
        x.new_empty(rows, dtype=tcdt),
        x.new_empty((rows if grad else 0, num_cols)),
    )


@torch.library.custom_op("stablemath::scale_rows", mutates_args=())
def _scale_rows(g: Tensor, scale: Tensor) -> Tensor:
    out = torch.empty_like(g)
    _scale_rows_into(g, scale, out)
    return out


@_scale_rows.register_fake
def _(g: Tensor, scale: Tensor) -> Tensor:
    return torch.empty_like(g)


def _scale_rows_into(g: Tensor, scale: Tensor, out: Tensor) -> None:
    rows, num_cols = g.shape
    if rows:
        block = min(max(triton.next_power_of_2(num_cols), 16), LOOP_BLOCK)
        _launch(K.scale_rows_kernel, g, rows, g, scale, out, num_cols, block=block)


def _eager(t: Tensor) -> bool:
    """A plain tensor, not a fake or functional one being traced by torch.compile."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _graph_is_kept() -> bool:
    """Whether the running backward keeps its graph (``retain_graph``/``create_graph``):
    then the saved gradient may be needed again and must not be scaled in place."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


def _ce_setup(ctx: Any, inputs: Any, output: Any) -> None:
    _, dw, g = output
    ctx.mark_non_differentiable(dw, g)
    ctx.save_for_backward(g)


def _ce_backward(ctx: Any, gloss: Tensor, gdw: Any, gg: Any) -> Any:
    (g,) = ctx.saved_tensors
    scale = gloss.to(torch.float64 if g.dtype == torch.float64 else torch.float32).contiguous()
    if _eager(g) and not _graph_is_kept():
        # the buffer is this op's own and is not needed again: scale it in place, so
        # the backward allocates nothing beyond the gradient it returns
        _scale_rows_into(g, scale, g)
        dx = g
    else:
        dx = torch.ops.stablemath.scale_rows(g, scale)
    return dx, None, None, None, None, None, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)
_scale_rows.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)


# ------------------------------------------------------------- the wrapped functions


def _axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            msg = f"axis {a} is out of range for an array with ndim={ndim}"
            raise ValueError(msg)
        out.append(a % ndim)
    if len(set(out)) != len(out):
        msg = f"axis {axis!r} repeats an axis (ndim={ndim})"
        raise ValueError(msg)
    return tuple(sorted(out))


def _rows_view(a: Tensor, perm: list[int], num_rows: int, num_cols: int) -> Tensor:
    """``a`` with the reduced axes moved last, as a contiguous ``(rows, C)`` tensor."""
    return a.permute(perm).reshape(num_rows, num_cols).contiguous()


def _check_float(x: Tensor, func: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        msg = f"stablemath._triton.{func} takes a floating torch.Tensor, got {type(x).__name__}"
        msg += f" of dtype {getattr(x, 'dtype', None)}"
        raise TypeError(msg)


def _mask_rows(
    where: Tensor | None, shape: Sequence[int], perm: list[int], rows: int, cols: int
) -> Tensor | None:
    if where is None:
        return None
    mask = torch.broadcast_to(where.to(torch.bool), tuple(shape))
    return _rows_view(mask, perm, rows, cols).view(torch.uint8)


def _softmax_like(
    x: Tensor,
    axis: int | Sequence[int] | None,
    temperature: float,
    where: Tensor | None,
    log: bool,
    func: str,
) -> Tensor:
    _check_float(x, func)
    axes = _axes(axis, x.ndim)
    rest = [i for i in range(x.ndim) if i not in axes]
    perm = rest + list(axes)
    num_cols = math.prod([x.shape[a] for a in axes])
    num_rows = math.prod([x.shape[i] for i in rest])
    if num_cols == 0 or num_rows == 0:
        return x.clone()
    x2 = _rows_view(x, perm, num_rows, num_cols)
    mask = _mask_rows(where, x.shape, perm, num_rows, num_cols)
    y, _ = torch.ops.stablemath.softmax_fwd(x2, mask, float(temperature), log)
    inverse = [0] * x.ndim
    for i, p in enumerate(perm):
        inverse[p] = i
    return y.reshape([x.shape[p] for p in perm]).permute(inverse)


def softmax(
    x: Tensor,
    /,
    *,
    axis: int | Sequence[int] | None = -1,
    temperature: float = 1.0,
    where: Tensor | None = None,
) -> Tensor:
    """Softmax of ``x / temperature`` along ``axis`` (see :mod:`stablemath._triton`)."""
    return _softmax_like(x, axis, temperature, where, False, "softmax")


def log_softmax(
    x: Tensor,
    /,
    *,
    axis: int | Sequence[int] | None = -1,
    temperature: float = 1.0,
    where: Tensor | None = None,
) -> Tensor:
    """Log-softmax of ``x / temperature`` along ``axis``."""
    return _softmax_like(x, axis, temperature, where, True, "log_softmax")


def logsumexp(
    x: Tensor,
    /,
    *,
    axis: int | Sequence[int] | None = -1,
    keepdims: bool = False,
    where: Tensor | None = None,
) -> Tensor:
    """``log(sum(exp(x)))`` along ``axis`` (no ``b``, no ``return_sign``)."""
    _check_float(x, "logsumexp")
    axes = _axes(axis, x.ndim)
    rest = [i for i in range(x.ndim) if i not in axes]
    perm = rest + list(axes)
    num_cols = math.prod([x.shape[a] for a in axes])
    num_rows = math.prod([x.shape[i] for i in rest])
    out_shape = [1 if i in axes else n for i, n in enumerate(x.shape)]
    if not keepdims:
        out_shape = [x.shape[i] for i in rest]
    if num_cols == 0:
        return torch.full(out_shape, -math.inf, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return x.new_empty(out_shape)
    x2 = _rows_view(x, perm, num_rows, num_cols)
    mask = _mask_rows(where, x.shape, perm, num_rows, num_cols)
    out, _, _ = torch.ops.stablemath.logsumexp_fwd(x2, mask)
    return out.reshape(out_shape)


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    /,
    *,
    axis: int = -1,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    where: Tensor | None = None,
) -> Tensor:
    """Cross-entropy with integer class targets, loss and gradient in one kernel."""
    _check_float(logits, "cross_entropy")
    if reduction not in ("mean", "sum", "none"):
        msg = f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}"
        raise ValueError(msg)
    (ax,) = _axes(axis, logits.ndim)
    num_cols = logits.shape[ax]
    sample_shape = logits.shape[:ax] + logits.shape[ax + 1 :]
    num_rows = math.prod(sample_shape)
    perm = [i for i in range(logits.ndim) if i != ax] + [ax]
    x2 = _rows_view(logits, perm, num_rows, num_cols)
    t1 = target.reshape(num_rows).contiguous()
    mask = None
    if where is not None:
        mask = torch.broadcast_to(where.to(torch.bool), sample_shape)
        mask = mask.reshape(num_rows).contiguous().view(torch.uint8)
    tcdt = _cdt(logits.dtype)[1]
    w = None if weight is None else weight.detach().to(tcdt).contiguous()
    grad = torch.is_grad_enabled() and logits.requires_grad
    loss, dw, _ = torch.ops.stablemath.cross_entropy_fwd(
        x2,
        t1,
        w,
        mask,
        int(ignore_index),
        float(temperature),
        None if softcap is None else float(softcap),
        float(label_smoothing),
        float(z_loss),
        grad,
    )
    if reduction == "none":
        out = loss.reshape(sample_shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        # all samples ignored: 0 with zero gradient (PyTorch gives NaN)
        denom = dw.sum()
        out = loss.sum() / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.to(logits.dtype)
