"""The Triton kernels: one program per row of a contiguous ``(rows, C)`` array.

Every kernel reads its row in the input's dtype, computes in ``CDT`` (float32 for
half precision, float64 for float32 and float64 input) and writes in the output's
dtype. A row is read in blocks of ``BLOCK`` columns; ``SINGLE`` rows (``C <= BLOCK``) are loaded once and kept in
registers, longer rows are streamed twice (statistics, then outputs), so a row of any
length works.

The row statistics are those of :mod:`stablemath._kernels`, gathered online over the
blocks: ``m`` the maximum of the live entries, ``k`` how many entries equal it (ties
counted, taken out of the sum), ``s`` the sum of ``exp(x - m)`` over the others, so that
``log(sum(exp(x - m))) = log(k) + log1p(s / k)`` keeps full relative precision when one
term dominates. When a later block raises the maximum, the old ``k`` entries join ``s``:
``s <- (s + k) * exp(m_old - m_new)``. NaN entries are counted apart (their row's outputs
are NaN) and take no part in ``m``, so a NaN never hides a ``+inf``.

Edge rows follow SPEC §3: a row whose maximum is ``-inf`` (all ``-inf`` or fully
masked) has ``k = 0`` and total 1 (softmax 0, log_softmax and logsumexp ``-inf``); a row
whose maximum is ``+inf`` keeps the limit, ``z = 0`` at its ``k`` ``+inf`` entries and
``-inf`` elsewhere (softmax ``1/k``). No branch of any ``where`` computes ``inf - inf``,
``0 * inf``, ``log(0)`` or ``x / 0``: the unused branch is evaluated too (and under
``TRITON_INTERPRET=1`` NumPy would warn about it).

Transcendentals come from libdevice on the GPU (correctly rounded to an ulp or two;
``tl.exp`` is ``ex2.approx`` of a rounded product, tens of ulp in the tails). The
interpreter has no libdevice, so there ``INTERP`` selects ``tl.exp``/``tl.log`` (NumPy)
and exact formulas for ``log1p`` and ``tanh`` built on them (Goldberg's and Kahan's).
Scalar options arrive as float64 arguments and are rounded once to ``CDT`` (the
interpreter passes Python floats, which NumPy rounds the same way).

A scalar boolean is combined with a block only through ``tl.where(scalar, block,
False)``, never ``scalar & block``: the interpreter stores a scalar comparison's
result with the operands' float dtype, and broadcasting it to a block then fails.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = [
    "INTERPRET",
    "ce_fwd_kernel",
    "logsumexp_bwd_kernel",
    "logsumexp_fwd_kernel",
    "scale_rows_kernel",
    "softmax_bwd_kernel",
    "softmax_fwd_kernel",
]

# triton.jit decides at decoration time whether kernels are interpreted; the kernels
# are told too, because libdevice exists only when they are compiled
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------- elementwise helpers


@triton.jit
def _param(v, CDT: tl.constexpr, INTERP: tl.constexpr):
    """A float64 scalar argument in the compute dtype."""
    if INTERP:
        return v
    else:
        return v.to(CDT)


@triton.jit
def _exp(x, INTERP: tl.constexpr):
    if INTERP:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _log(x, INTERP: tl.constexpr):
    if INTERP:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def _log1p(u, INTERP: tl.constexpr):
    """``log(1 + u)`` for ``u >= 0``, to full relative precision for small ``u``."""
    if INTERP:
        # Goldberg: log(w) * u / (w - 1) with w = 1 + u rounded cancels w's rounding
        w = 1.0 + u
        d = w - 1.0
        exact = d == 0.0
        return tl.where(exact, u, tl.log(tl.where(exact, 2.0, w)) * (u / tl.where(exact, 1.0, d)))
    else:
        return libdevice.log1p(u)


@triton.jit
def _tanh(u, INTERP: tl.constexpr):
    if INTERP:
        # tanh(a) = -em1 / (2 + em1), em1 = expm1(-2a) by Kahan's exp(y) - 1 = (v - 1) * y
        # / log(v): full relative precision near 0, where 1 - exp(-2a) would cancel
        a = tl.abs(u)
        y = -2.0 * a
        v = tl.exp(y)
        one = v == 1.0
        zero = v == 0.0
        lv = tl.log(tl.where(one | zero, 0.5, v))
        em1 = tl.where(one, y, tl.where(zero, -1.0, (v - 1.0) * (tl.where(zero, 0.0, y) / lv)))
        t = -em1 / (2.0 + em1)
        return tl.where(u < 0, -t, t)
    else:
        return libdevice.tanh(u)


# ------------------------------------------------------------------- row statistics


@triton.jit
def _stats_init(CDT: tl.constexpr):
    m = tl.full((), float("-inf"), CDT)
    k = tl.zeros((), CDT)
    s = tl.zeros((), CDT)
    nan = tl.zeros((), tl.int32)
    return m, k, s, nan


@triton.jit
def _stats_update(m, k, s, nan, x, INTERP: tl.constexpr):
    """Fold a block ``x`` (dead entries already ``-inf``) into ``(m, k, s, nan)``."""
    isnan = x != x
    nan += tl.sum(isnan.to(tl.int32), axis=0)
    x = tl.where(isnan, float("-inf"), x)
    m_new = tl.maximum(m, tl.max(x, axis=0))
    fin_new = tl.abs(m_new) < float("inf")
    m0 = tl.where(fin_new, m_new, 0.0)
    # the old maximal entries and sum, rescaled to the new maximum; exp(-inf) = 0 when
    # the old maximum was -inf or the new one is +inf (the finite terms vanish then)
    grow = m_new > m
    both = grow & fin_new & (m > float("-inf"))
    alpha = tl.where(both, _exp_shifted(tl.where(both, m, m0), m0, INTERP), 0.0)
    s = tl.where(grow, (s + k) * alpha, s)
    k = tl.where(grow, 0.0, k)
    top = (x == m_new) & (x > float("-inf"))
    k += tl.sum(top.to(k.dtype), axis=0)
    rest = tl.where(fin_new, (x < m_new) & (x > float("-inf")), False)
    e = tl.where(rest, _exp_shifted(tl.where(rest, x, m0), m0, INTERP), 0.0)
    s += tl.sum(e, axis=0)
    return m_new, k, s, nan


@triton.jit
def _exp_shifted(a, m0, INTERP: tl.constexpr):
    """``exp(a - m0)`` for finite ``a``, ``m0``, with the rounding error of the
    subtraction (TwoSum) added back: ``a - m0`` rounds by up to ``|a - m0|`` half-ulps,
    which ``exp`` would turn into as many ulp of relative error in the row's sum."""
    d = a - m0
    bv = d - a
    low = (a - (d - bv)) - (m0 + bv)
    e = _exp(d, INTERP)
    return e + e * low


@triton.jit
def _stats_final(m, k, s, nan, INTERP: tl.constexpr):
    """``(fin, m0, total, log_total, lse)`` of a row; ``lse`` NaN in a NaN row."""
    fin = tl.abs(m) < float("inf")
    m0 = tl.where(fin, m, 0.0)
    k1 = tl.where(k > 0.0, k, 1.0)
    total = k1 + s
    log_total = _log(k1, INTERP) + _log1p(s / k1, INTERP)
    lse = tl.where(fin, m0 + log_total, m)
    lse = tl.where(nan > 0, float("nan"), lse)
    return fin, m0, total, log_total, lse


@triton.jit
def _shift(x, fin, m0):
    """Shifted logits ``z`` and the exact rounding error ``low`` of ``x - m0`` (TwoSum):
    ``exp(z + low)`` keeps the relative accuracy of far-from-maximal entries."""
    z = tl.where(fin, x - m0, tl.where(x == float("inf"), 0.0, float("-inf")))
    ok = tl.where(fin, tl.abs(x) < float("inf"), False)
    a = tl.where(ok, x, m0)
    d = a - m0
    bv = d - a
    low = (a - (d - bv)) - (m0 + bv)
    return z, low


@triton.jit
def _prob(x, fin, m0, total, INTERP: tl.constexpr):
    """Softmax of the entries ``x`` of a row with statistics ``(fin, m0, total)``."""
    z, low = _shift(x, fin, m0)
    e = _exp(z, INTERP)
    e = e + e * low
    return e / total


@triton.jit
def _load_live(x_ptr, mask_ptr, offs, inb, t, HAS_MASK: tl.constexpr, CDT: tl.constexpr):
    """A block of ``x / t``; masked and out-of-row entries ``-inf``."""
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(CDT) / t
    live = inb
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + offs, mask=inb, other=0) != 0)
    return tl.where(live, x, float("-inf"))


# -------------------------------------------------------- softmax, log_softmax, lse


@triton.jit
def _softmax_out(x, fin, m0, total, log_total, nan, LOG: tl.constexpr, INTERP: tl.constexpr):
    z, low = _shift(x, fin, m0)
    if LOG:
        y = (z - log_total) + low
    else:
        e = _exp(z, INTERP)
        e = e + e * low
        # E / Z, not exp(x - lse): the latter loses relative accuracy on long rows
        y = e / total
    return tl.where(nan > 0, float("nan"), y)


@triton.jit
def softmax_fwd_kernel(
    x_ptr,
    mask_ptr,
    y_ptr,
    lse_ptr,
    C,
    T: tl.float64,
    HAS_MASK: tl.constexpr,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
    CDT: tl.constexpr,
    INTERP: tl.constexpr,
):
    """softmax (or log_softmax, ``LOG``) of ``x / T`` per row, and the row's
    logsumexp (float, for the backward: ``+-inf`` marks the rows of zero gradient)."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * C
    y_ptr += row * C
    mask_ptr += row * C
    t = _param(T, CDT, INTERP)
    cols = tl.arange(0, BLOCK)
    m, k, s, nan = _stats_init(CDT)
    if SINGLE:
        inb = cols < C
        x = _load_live(x_ptr, mask_ptr, cols, inb, t, HAS_MASK, CDT)
        m, k, s, nan = _stats_update(m, k, s, nan, x, INTERP)
    else:
        for start in range(0, C, BLOCK):
            offs = start + cols
            xb = _load_live(x_ptr, mask_ptr, offs, offs < C, t, HAS_MASK, CDT)
            m, k, s, nan = _stats_update(m, k, s, nan, xb, INTERP)
    fin, m0, total, log_total, lse = _stats_final(m, k, s, nan, INTERP)
    tl.store(lse_ptr + row, lse)
    if SINGLE:
        y = _softmax_out(x, fin, m0, total, log_total, nan, LOG, INTERP)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=inb)
    else:
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb_b = offs < C
            xb = _load_live(x_ptr, mask_ptr, offs, inb_b, t, HAS_MASK, CDT)
            y = _softmax_out(xb, fin, m0, total, log_total, nan, LOG, INTERP)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb_b)


@triton.jit
def _softmax_grad(y, g, live, red, zero_row, inv_t, LOG: tl.constexpr, INTERP: tl.constexpr):
    if LOG:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        # d log_softmax_i / d x_j = [j live] delta_ij - p_j (masked i included)
        dx = tl.where(live, g, 0.0) - _exp(y, INTERP) * red
    else:
        dx = y * (g - red)
    return tl.where(zero_row, 0.0, dx * inv_t)


@triton.jit
def softmax_bwd_kernel(
    y_ptr,
    g_ptr,
    mask_ptr,
    lse_ptr,
    dx_ptr,
    C,
    T: tl.float64,
    HAS_MASK: tl.constexpr,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
    CDT: tl.constexpr,
    INTERP: tl.constexpr,
):
    """``dx = y * (g - sum(g * y)) / T`` (softmax) or ``(g - exp(y) * sum(g)) / T``
    (log_softmax, 0 at masked entries); 0 in rows whose logsumexp is ``-inf`` (all
    ``-inf`` or fully masked). A ``+inf`` row gets the same formula, with ``y`` (or
    ``exp(y)``) ``1/k`` at its ``k`` ``+inf`` entries: the limit, as on the generic path."""
    row = tl.program_id(0).to(tl.int64)
    y_ptr += row * C
    g_ptr += row * C
    dx_ptr += row * C
    mask_ptr += row * C
    inv_t = 1.0 / _param(T, CDT, INTERP)
    lse = tl.load(lse_ptr + row)
    zero_row = lse == float("-inf")
    cols = tl.arange(0, BLOCK)
    red = tl.zeros((), CDT)
    if SINGLE:
        inb = cols < C
        y = tl.load(y_ptr + cols, mask=inb, other=0.0).to(CDT)
        g = tl.load(g_ptr + cols, mask=inb, other=0.0).to(CDT)
        if LOG:
            red += tl.sum(g, axis=0)
        else:
            red += tl.sum(g * y, axis=0)
        live = inb
        if HAS_MASK:
            live = live & (tl.load(mask_ptr + cols, mask=inb, other=0) != 0)
        dx = _softmax_grad(y, g, live, red, zero_row, inv_t, LOG, INTERP)
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=inb)
    else:
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb_b = offs < C
            g = tl.load(g_ptr + offs, mask=inb_b, other=0.0).to(CDT)
            if LOG:
                red += tl.sum(g, axis=0)
            else:
                y = tl.load(y_ptr + offs, mask=inb_b, other=0.0).to(CDT)
                red += tl.sum(g * y, axis=0)
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb_b = offs < C
            y = tl.load(y_ptr + offs, mask=inb_b, other=0.0).to(CDT)
            g = tl.load(g_ptr + offs, mask=inb_b, other=0.0).to(CDT)
            live = inb_b
            if HAS_MASK:
                live = live & (tl.load(mask_ptr + offs, mask=inb_b, other=0) != 0)
            dx = _softmax_grad(y, g, live, red, zero_row, inv_t, LOG, INTERP)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb_b)


@triton.jit
def logsumexp_fwd_kernel(
    x_ptr,
    mask_ptr,
    out_ptr,
    m_ptr,
    total_ptr,
    C,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
    CDT: tl.constexpr,
    INTERP: tl.constexpr,
):
    """logsumexp per row, plus the row's ``m`` (NaN in a NaN row) and total
    ``k + s`` for the backward."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * C
    mask_ptr += row * C
    cols = tl.arange(0, BLOCK)
    m, k, s, nan = _stats_init(CDT)
    if SINGLE:
        x = _load_live(x_ptr, mask_ptr, cols, cols < C, 1.0, HAS_MASK, CDT)
        m, k, s, nan = _stats_update(m, k, s, nan, x, INTERP)
    else:
        for start in range(0, C, BLOCK):
            offs = start + cols
            xb = _load_live(x_ptr, mask_ptr, offs, offs < C, 1.0, HAS_MASK, CDT)
            m, k, s, nan = _stats_update(m, k, s, nan, xb, INTERP)
    _, _, total, _, lse = _stats_final(m, k, s, nan, INTERP)
    tl.store(out_ptr + row, lse.to(out_ptr.dtype.element_ty))
    tl.store(m_ptr + row, tl.where(nan > 0, float("nan"), m))
    tl.store(total_ptr + row, total)


@triton.jit
def logsumexp_bwd_kernel(
    x_ptr,
    mask_ptr,
    g_ptr,
    m_ptr,
    total_ptr,
    dx_ptr,
    C,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    CDT: tl.constexpr,
    INTERP: tl.constexpr,
):
    """``dx = g * softmax(x)``: ``1/k`` at the ``+inf`` entries of a ``+inf`` row, 0 in
    an all ``-inf`` row, NaN in a NaN row."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * C
    mask_ptr += row * C
    dx_ptr += row * C
    g = tl.load(g_ptr + row).to(CDT)
    m = tl.load(m_ptr + row)
    total = tl.load(total_ptr + row)
    fin = tl.abs(m) < float("inf")
    m0 = tl.where(fin, m, 0.0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        offs = start + cols
        inb = offs < C
        x = _load_live(x_ptr, mask_ptr, offs, inb, 1.0, HAS_MASK, CDT)
        p = _prob(x, fin, m0, total, INTERP)
        dx = tl.where(m != m, float("nan"), g * p)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)


# ------------------------------------------------------------------- cross-entropy


@triton.jit
def _ce_load(
    x_ptr, offs, inb, t, cap, HAS_CAP: tl.constexpr, CDT: tl.constexpr, INTERP: tl.constexpr
):
    """A block of logits after soft-capping and temperature (``-inf`` out of the row)
    and, for the gradient's chain rule, ``tanh(x / cap)``."""
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(CDT)
    th = x
    if HAS_CAP:
        th = _tanh(x / cap, INTERP)
        x = cap * th
    x = tl.where(inb, x / t, float("-inf"))
    return x, th


@triton.jit
def _inf_part(pos, neg):
    """``sum(w_c * inf)`` over the classes whose ``w_c * (lse - z_c)`` is infinite,
    from the counts of positive and negative weights among them (0 weights add 0)."""
    r = tl.where(pos > 0, float("inf"), 0.0)
    r = tl.where(neg > 0, float("-inf"), r)
    return tl.where((pos > 0) & (neg > 0), float("nan"), r)


@triton.jit
def _ce_grad(
    x,
    th,
    offs,
    inb,
    ts,
    fin,
    pinf,
    m0,
    total,
    coef,
    keep_wt,
    ls_c,
    w_ptr,
    inv_t,
    HAS_W: tl.constexpr,
    HAS_CAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    INTERP: tl.constexpr,
):
    """d loss / d logits for one block of a kept row (NaN rows handled by the caller)."""
    p = _prob(x, fin, m0, total, INTERP)
    # all -inf row: only the target's own term x[t] moves (the generic path's gradient)
    live_row = fin | pinf
    g = tl.where(live_row, p * coef, 0.0) - tl.where(offs == ts, keep_wt, 0.0)
    if SMOOTH:
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(x.dtype)
        else:
            w = tl.where(inb, 1.0, 0.0).to(x.dtype)
        g = g - tl.where(live_row, ls_c * w, 0.0)
    if HAS_CAP:
        g = g * (1.0 - th * th)
    return g * inv_t


@triton.jit
def ce_fwd_kernel(
    x_ptr,
    t_ptr,
    w_ptr,
    smask_ptr,
    loss_ptr,
    dw_ptr,
    g_ptr,
    C,
    ignore_index,
    T: tl.float64,
    CAP: tl.float64,
    KEEP: tl.float64,
    LS_C: tl.float64,
    ZL: tl.float64,
    HAS_W: tl.constexpr,
    HAS_SMASK: tl.constexpr,
    HAS_CAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    ZLOSS: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    CDT: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Per-row cross-entropy with a hard target, and (``GRAD``) its gradient.

    ``KEEP = 1 - label_smoothing``, ``LS_C = label_smoothing / C``, ``ZL = z_loss``.
    Writes the row's loss (0 when ignored or masked, NaN for a target outside
    ``[0, C)``), its weight in the ``"mean"`` denominator, and ``d loss / d logits``.
    """
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * C
    g_ptr += row * C
    t = _param(T, CDT, INTERP)
    inv_t = 1.0 / t
    cap = _param(CAP, CDT, INTERP)
    keep = _param(KEEP, CDT, INTERP)
    ls_c = _param(LS_C, CDT, INTERP)
    zl = _param(ZL, CDT, INTERP)
    cols = tl.arange(0, BLOCK)

    tgt = tl.load(t_ptr + row).to(tl.int64)
    kept = tgt != ignore_index
    if HAS_SMASK:
        kept = kept & (tl.load(smask_ptr + row) != 0)
    valid = kept & (tgt >= 0) & (tgt < C)
    bad = kept & ~valid
    ts = tl.where(valid, tgt, 0)
    if HAS_W:
        w_t = tl.load(w_ptr + ts).to(CDT)
        dw = tl.where(valid, w_t, 0.0)
    else:
        w_t = tl.full((), 1.0, CDT)
        dw = tl.where(kept, 1.0, 0.0).to(CDT)
    loss = tl.zeros((), CDT)

    if valid:
        m, k, s, nan = _stats_init(CDT)
        # smoothing: A = sum w_c (x_c - mf) over finite c, mf their running maximum
        mf = tl.full((), float("-inf"), CDT)
        acc = tl.zeros((), CDT)
        w_fin = tl.zeros((), CDT)
        w_pinf = tl.zeros((), CDT)
        w_all = tl.zeros((), CDT)
        ninf_pos = tl.zeros((), tl.int32)
        ninf_neg = tl.zeros((), tl.int32)
        fin_pos = tl.zeros((), tl.int32)
        fin_neg = tl.zeros((), tl.int32)
        for start in range(0, C, BLOCK):
            offs = start + cols
            inb = offs < C
            x, th = _ce_load(x_ptr, offs, inb, t, cap, HAS_CAP, CDT, INTERP)
            m, k, s, nan = _stats_update(m, k, s, nan, x, INTERP)
            if SMOOTH:
                if HAS_W:
                    w = tl.load(w_ptr + offs, mask=inb, other=0.0).to(CDT)
                else:
                    w = tl.where(inb, 1.0, 0.0).to(CDT)
                finite = tl.abs(x) < float("inf")
                mf_new = tl.maximum(mf, tl.max(tl.where(finite, x, float("-inf")), axis=0))
                have_new = mf_new > float("-inf")
                mf_new0 = tl.where(have_new, mf_new, 0.0)
                mf_old0 = tl.where(mf > float("-inf"), mf, mf_new0)
                acc += w_fin * (mf_old0 - mf_new0)
                d = tl.where(finite, x, mf_new0) - mf_new0
                acc += tl.sum(tl.where(finite & (w != 0.0), w * d, 0.0), axis=0)
                w_fin += tl.sum(tl.where(finite, w, 0.0), axis=0)
                w_pinf += tl.sum(tl.where(x == float("inf"), w, 0.0), axis=0)
                w_all += tl.sum(w, axis=0)
                ninf = x == float("-inf")
                ninf_pos += tl.sum((ninf & (w > 0.0)).to(tl.int32), axis=0)
                ninf_neg += tl.sum((ninf & (w < 0.0)).to(tl.int32), axis=0)
                fin_pos += tl.sum((finite & (w > 0.0)).to(tl.int32), axis=0)
                fin_neg += tl.sum((finite & (w < 0.0)).to(tl.int32), axis=0)
                mf = mf_new
        fin, m0, total, log_total, lse = _stats_final(m, k, s, nan, INTERP)
        pinf = m == float("inf")

        x_t, _ = _ce_load(x_ptr, ts, True, t, cap, HAS_CAP, CDT, INTERP)
        # x[t] - m, the limit in a +inf row, x[t] itself (-inf) in an all -inf row
        z_t = tl.where(
            fin,
            x_t - m0,
            tl.where(pinf, tl.where(x_t == float("inf"), 0.0, float("-inf")), x_t),
        )
        nll = log_total - z_t
        # a zero weight silences the sample even where its nll is +inf (0 * inf); so
        # does label_smoothing = 1 (keep = 0)
        loss = w_t * tl.where(w_t == 0.0, 0.0, nll)
        coef = keep * w_t
        keep_wt = keep * w_t
        if SMOOTH:
            loss = keep * tl.where(keep_wt == 0.0, 0.0, loss)
            pos = ninf_pos + tl.where(pinf, fin_pos, 0)
            neg = ninf_neg + tl.where(pinf, fin_neg, 0)
            smooth = tl.where(fin, w_fin * log_total - acc, 0.0)
            smooth += tl.where(pinf, w_pinf * log_total, 0.0)
            smooth += _inf_part(pos, neg)
            loss += ls_c * smooth
            coef += ls_c * w_all
        if ZLOSS:
            loss += zl * lse * lse
            # the finite limit in a +inf row: the z-loss term's gradient is left out
            coef += tl.where(fin, 2.0 * zl * lse, 0.0)
        loss = tl.where(nan > 0, float("nan"), loss)

        if GRAD:
            for start in range(0, C, BLOCK):
                offs = start + cols
                inb = offs < C
                x, th = _ce_load(x_ptr, offs, inb, t, cap, HAS_CAP, CDT, INTERP)
                g = _ce_grad(
                    x,
                    th,
                    offs,
                    inb,
                    ts,
                    fin,
                    pinf,
                    m0,
                    total,
                    coef,
                    keep_wt,
                    ls_c,
                    w_ptr,
                    inv_t,
                    HAS_W,
                    HAS_CAP,
                    SMOOTH,
                    INTERP,
                )
                g = tl.where(nan > 0, float("nan"), g)
                tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=inb)
    else:
        if GRAD:
            for start in range(0, C, BLOCK):
                offs = start + cols
                tl.store(g_ptr + offs, tl.zeros((BLOCK,), g_ptr.dtype.element_ty), mask=offs < C)

    # a target outside [0, C) under tracing: NaN, never a plausible number (SPEC §4)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + row, loss)
    tl.store(dw_ptr + row, dw)


@triton.jit
def scale_rows_kernel(g_ptr, scale_ptr, out_ptr, C, BLOCK: tl.constexpr):
    """``out[r, :] = g[r, :] * scale[r]`` (``out`` may be ``g``)."""
    row = tl.program_id(0).to(tl.int64)
    g_ptr += row * C
    out_ptr += row * C
    sc = tl.load(scale_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        offs = start + cols
        inb = offs < C
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(sc.dtype)
        tl.store(out_ptr + offs, (g * sc).to(out_ptr.dtype.element_ty), mask=inb)
