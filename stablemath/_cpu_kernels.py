"""Compiled CPU row kernels (Numba) behind the fast paths of :mod:`stablemath._fastpaths`.

Each kernel takes a C-contiguous ``(rows, n)`` float32 array (or uint16 holding
bfloat16 bits, int16 holding float16 bits: see "elements" below) whose rows are the
slices along the reduced axis, and handles the rows ``[r0, r1)``, so that
:func:`run_rows` can split the rows over threads (the kernels release the GIL). A row
with a NaN or a maximum ``m`` that is not finite stops the kernel, which returns False:
such rows are for the generic kernel.

The arithmetic is the fast path's: ``d = (x - m) * inv_t`` in float64, exact for
``inv_t = 1`` because ``x`` and ``m`` are float32 numbers; ``exp(d)`` from a float64
polynomial (:func:`_exp_nonpos`, relative error below 2e-10, 0.003 of a float32
ulp); sums in float64; one rounding to the output dtype at the end. The total
``log(sum(exp(d)))`` is the logarithm of the sum where that sum is clear of 1 (see
:func:`_clear`); in a row where the maximum dominates, the entries equal to it are
counted rather than summed, and the total is ``log(k) + log1p(s / k)``, so that a
dominant term keeps full relative precision (SPEC §3.5). ``-inf`` entries give ``exp = 0`` (below float32's range) and ``-inf``
log-probabilities.

Why compiled loops: the NumPy form of the same arithmetic (float64 temporaries, a
float64 ``exp`` that NumPy does not vectorise on AVX2) took 2.0 to 2.3 times the time of
``scipy.special.softmax``; these loops read each float32 element once or twice from
cache, evaluate ``exp`` in SIMD registers and write the result once. Figures are in the
docstring of :mod:`stablemath._fastpaths`.

The kernels are compiled at their first use and cached on disk (Numba's ``cache=True``:
``__pycache__`` beside this file, or ``NUMBA_CACHE_DIR``), as are the functions that
run them on torch's threads (:mod:`stablemath._cpu_team`) and as XLA calls
(:mod:`stablemath._xla_ffi`); those made inside other functions are keyed by
:mod:`stablemath._numba_cache`, or no later process would find them. First calls of
softmax, log_softmax, logsumexp and cross-entropy (and its gradient on torch and JAX)
on 512x1000 and 1x10 float32 arrays
(``python benchmarks/first_call.py``), in all, after an install and in a later
process: NumPy 8.0 s and 0.4 s, torch 17.0 s and 0.4 s, JAX 16.5 s and 0.8 s (before
the keyed cache a later process took 4.5 s on torch and 21.9 s on JAX; before the JAX
handlers called their row runner by symbol, 38.1 s after an install, see
:func:`stablemath._xla_ffi._rows_runner`). bfloat16 and float16 rows are kernels of
their own, compiled at their first use too.

Numba checks a cached function against its own source file only; the keyed ones also
against this file, :mod:`stablemath._cpu_team` and :mod:`stablemath._xla_ffi`. The
module-level compiled functions of those two hold a copy of the kernels they call, so
after an edit of this file (in a development checkout; an install writes every file
anew) their cache files (``*.nbi``, ``*.nbc``) must be deleted, or they keep running
the old kernels.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import _numba_cache as keyed

__all__ = [
    "FLOAT16_CONVERSIONS",
    "cross_entropy_rows",
    "log_softmax_rows",
    "logsumexp_rows",
    "run_rows",
    "softmax_rows",
    "target_total",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# exp(d) for d below this is under 1e-307: 0 in every output dtype, and nothing next
# to the maximum's exp(0) = 1 in a sum. It keeps 2**k a normal float64.
_FLOOR = -708.0

# Floating-point flags. The exp and the shift are evaluated as written (contraction
# into FMAs only improves them); the loops that sum may reorder the sum (reassoc), which
# lets LLVM keep several SIMD partial sums: the float64 sum of n <= 2**20 terms of
# at most 1 each is then still far below a float32 ulp from exact.
_EXACT = {"contract"}
_SUM = {"contract", "reassoc"}
# The sum of exp(x - m) over a row of n entries is 1 + r: 1 for the maximum, r >= 0 for
# the rest. log(1 + r) computed as log(sum) has an absolute error of at most about
# n 2**-53 (each of the sum's n additions rounds by at most 2**-53 of a partial sum
# that is at most the sum, below 2 where r is small), which is a relative error of
# n 2**-53 / r of a total near r: a dominant term would lose its precision (SPEC
# §3.5). So log(sum) is taken only where the sum is at least _clear(n) = 1 + max(n,
# 64) 2**-24, a relative error below 2**-29 (1/32 of a float32 ulp) even in that
# worst case; the rare row below it pays a second pass that counts the maximal
# entries instead of summing them, log(k) + log1p(s / k), whose error is relative to
# s. One summing pass with no counting took 0.85 of the time of the counting one
# (log_softmax and logsumexp, one thread, 16x1000 to 64x32000 float32, in cache).
_CLEAR_STEP = 2.0**-24


@numba.njit(cache=True, error_model="numpy")
def _clear(n: int) -> float:
    """The least sum of ``exp(d)`` over a row of ``n`` entries whose logarithm is
    taken as the total (see above)."""
    return 1.0 + max(n, 64) * _CLEAR_STEP


@intrinsic
def _float64_from_bits(typingctx: Any, bits: Any) -> Any:
    """The float64 whose IEEE bits are the int64 ``bits``."""
    sig = types.float64(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


# exp(r) = 1 + r * g(r) on |r| <= ln2 / 2, g of degree 6 fitted to expm1(r) / r at
# Chebyshev nodes in 40-digit arithmetic (mpmath.chebyfit): |error| <= 8.5e-11, that is
# 1.2e-10 relative, 0.002 of a float32 ulp; exp(0) = 1 exactly.
_G = (
    1.9899273958649360158e-4,
    1.3941108433972674608e-3,
    8.3332984837548860262e-3,
    4.1666352896775156786e-2,
    1.6666666718997508523e-1,
    5.0000000471177576744e-1,
)
_G6, _G5, _G4, _G3, _G2, _G1 = _G


@intrinsic
def _bits_of_float64(typingctx: Any, value: Any) -> Any:
    """The IEEE bits of the float64 ``value``, as an int64."""
    sig = types.int64(types.float64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(64))

    return sig, codegen


@intrinsic
def _wide_vectors(typingctx: Any) -> Any:
    """Lets LLVM vectorise the calling function's loops over the CPU's widest registers.

    LLVM's tuning for the x86 server and client cores with AVX-512 (Skylake-SP and its
    successors, Rocket Lake, Sapphire Rapids) prefers 256-bit vectors unless a function
    says otherwise with the ``"prefer-vector-width"`` attribute (clang's
    ``-mprefer-vector-width``), because 512-bit instructions can lower the clock. For
    these kernels, whose time is the float64 polynomial of :func:`_exp_nonpos`, 8 lanes
    beat 4: a pass of exp and sum over 4096x1000 float32 rows took 1.47 ms instead of
    2.86, one thread, and a whole softmax 2.78 ms instead of 3.32 (rocketlake VM,
    median of 15 interleaved calls). Numba's own switch for this
    (``NUMBA_CPU_FEATURES=...,-prefer-256-bit``) is process-wide; the attribute only
    touches the functions that call this one. Every function here with a loop calls
    it, since a function inlined into another takes the caller's attributes; the
    modules that run the kernels (:mod:`stablemath._cpu_team`, :mod:`stablemath._xla_ffi`)
    call them as functions of their own, not inlined (their assembly calls
    ``softmax_rows``, whose loops are the 512-bit ones). Elsewhere (AVX2, AArch64) the
    widest registers are already what LLVM uses, and it changes nothing. Each lane
    does the same operations; only the float64 sums (``reassoc``) are split into 8
    partial sums instead of 4, which leaves their error bound as it was (far below a
    float32 ulp, see ``_SUM``): the softmax of 4096x1000 normal float32 rows came out
    the same bits.

    llvmlite checks function attributes against a list of the keyword ones; a string
    attribute is added to the set past that check and is printed as written.
    """
    sig = types.none()

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return sig, codegen


# 1.5 * 2**52 + 1023: adding it to y (|y| < 2**51) rounds y to an integer k and leaves
# the float64 whose last mantissa bits are k + 1023, the exponent field of 2**k
_SHIFTER = 6755399441056767.0


@numba.njit(fastmath=_EXACT, cache=True, error_model="numpy")
def _exp_nonpos(d: float) -> float:
    """``exp(d)`` for float64 ``d <= 0`` (``-inf`` included), relative error < 2e-10.

    ``d = k ln2 + r`` with ``k = round(d / ln2)`` and ``|r| <= ln2 / 2``; ``exp(r)`` is
    the polynomial ``1 + r g(r)`` above; ``2**k`` is built from its exponent bits. The
    float64 error of ``r`` is below ``708 * 2**-53``, 1e-13 of the result.

    ``k`` is rounded by adding :data:`_SHIFTER`, whose bits then hold ``k + 1023``
    (shifted into the exponent field, the rest of them fall off): two operations
    instead of four for ``rint`` and the conversion to an integer: a pass of ``exp``
    and sum over float32 rows in cache takes 0.87 of the time (median of 30
    interleaved pairs, 64x1000, one thread, 0.26 ns an element before).
    """
    d = max(d, _FLOOR)
    shifted = d * _LOG2E + _SHIFTER
    kf = shifted - _SHIFTER
    r = d - kf * _LN2
    g = _G6
    g = g * r + _G5
    g = g * r + _G4
    g = g * r + _G3
    g = g * r + _G2
    g = g * r + _G1
    g = g * r + 1.0
    return (1.0 + r * g) * _float64_from_bits(_bits_of_float64(shifted) << 52)


# --- elements: float32, or half precision held as its bits ------------------------------
#
# torch's bfloat16 has no NumPy dtype; its memory is read as uint16 and the kernels widen each element on the way in, exactly (a bfloat16 is the
# top half of a float32), and round softmax and log_softmax outputs to bfloat16 on the
# way out. That spares the two passes of widening the tensor to float32 first and
# rounding the float32 result after (0.34 and 0.25 ms of the 2.1 ms of a 4096x1000
# softmax, with torch's own bfloat16 softmax at 1.6). benchmarks/run.py --providers
# sm-torch,torch --shapes 4096x1000 --dtypes bfloat16, two runs each, time as a ratio
# to torch's, before -> after: softmax 2.2 -> 0.93-1.18, log_softmax 2.9-3.1 -> 1.74-1.78,
# logsumexp 1.03-1.06 -> 0.73-0.75, cross-entropy forward 1.6-2.2 -> 1.4-1.6, forward and
# backward 1.75 -> 1.45. float16, the same runs with --dtypes float16: softmax 2.2-2.3
# -> 1.26, log_softmax 2.3-2.9 -> 1.70-1.78, logsumexp 1.06-1.09 -> 0.80, cross-entropy
# forward 1.7-1.9 -> 1.33-1.36, forward and backward 1.6 -> 1.45. The results are the
# same bits as before.
#
# float16 tensors likewise as int16, where the CPU converts float16 in hardware (F16C
# on x86-64, any AArch64): elsewhere LLVM would call helper functions that Numba does
# not link, so float16 tensors are widened by torch there instead.


def _has_float16_conversions() -> bool:
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    # the features Numba compiles for: its setting, else the host's
    features = numba.config.CPU_FEATURES
    if not features:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features().flatten()
    return "+f16c" in features.split(",")


FLOAT16_CONVERSIONS = _has_float16_conversions()


@intrinsic
def _float32_of_bfloat16(typingctx: Any, bits: Any) -> Any:
    """The float32 whose top 16 bits are ``bits`` (uint16): the bfloat16's value."""
    sig = types.float32(types.uint16)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


@intrinsic
def _bfloat16_of_float32(typingctx: Any, value: Any) -> Any:
    """``value`` rounded to bfloat16 (to nearest, ties to even), as uint16 bits. Not
    for NaN, which no kernel writes; infinities stay infinite and a value beyond
    bfloat16's range becomes one, as in torch's conversion."""
    sig = types.uint16(types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), odd)
        return builder.trunc(builder.lshr(rounded, ir.Constant(i32, 16)), ir.IntType(16))

    return sig, codegen


@intrinsic
def _float32_of_float16(typingctx: Any, bits: Any) -> Any:
    """The float32 value of the float16 whose bits are ``bits`` (int16), exact."""
    sig = types.float32(types.int16)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _float16_of_float32(typingctx: Any, value: Any) -> Any:
    """``value`` rounded to float16 (to nearest, ties to even; subnormals, overflow to
    infinity), as int16 bits."""
    sig = types.int16(types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def _real(v: Any) -> Any:
    """An input element as a float: float32 as it is, bfloat16 (uint16) and float16
    (int16) bits widened."""
    raise NotImplementedError  # compiled only, see the overload


@overload(_real, inline="always")
def _real_impl(v: Any) -> Any:
    if isinstance(v, types.Float):

        def real(v: Any) -> Any:
            return v

        return real
    if v == types.uint16:

        def real_bfloat16(v: Any) -> Any:
            return _float32_of_bfloat16(v)

        return real_bfloat16
    if v == types.int16:

        def real_float16(v: Any) -> Any:
            return _float32_of_float16(v)

        return real_float16
    return None


def _put(out: Any, j: Any, value: Any) -> None:
    """``out[j] = value``, rounded once to ``out``'s dtype (bfloat16 for uint16 and
    float16 for int16 from float32: the rounding torch's ``.to`` of a float32 result
    makes)."""
    raise NotImplementedError  # compiled only, see the overload


@overload(_put, inline="always")
def _put_impl(out: Any, j: Any, value: Any) -> Any:
    if isinstance(out.dtype, types.Float):

        def put(out: Any, j: Any, value: Any) -> None:
            out[j] = value

        return put
    if out.dtype == types.uint16:

        def put_bfloat16(out: Any, j: Any, value: Any) -> None:
            out[j] = _bfloat16_of_float32(np.float32(value))

        return put_bfloat16
    if out.dtype == types.int16:

        def put_float16(out: Any, j: Any, value: Any) -> None:
            out[j] = _float16_of_float32(np.float32(value))

        return put_float16
    return None


@numba.njit(fastmath=_EXACT, cache=True, error_model="numpy")
def _shift(v: Any, m: float, inv_t: Any) -> float:
    """``(v - m) * inv_t`` in float64, exact for ``inv_t = None`` (a unit
    temperature), which Numba compiles with no multiplication at all.

    The kernels pass None for ``inv_t == 1`` down to the loops that call this. They
    once passed the literal 1.0 there, for LLVM to drop the multiplication by it; it
    merged the two calls into one loop instead and kept the multiplication: one
    operation of the 17 of an element's ``exp`` and sum, whose pass took 0.94 of the
    time without it (8x1000 float32 in cache, one thread)."""
    d = np.float64(_real(v)) - m
    return d if inv_t is None else d * inv_t


@intrinsic
def _float32_from_bits(typingctx: Any, bits: Any) -> Any:
    """The float32 whose IEEE bits are the int32 ``bits``."""
    sig = types.float32(types.int32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


def _signed_bits(row: Any) -> Any:
    """The row's elements as signed integers of their width: float64 as int64, float32
    as int32, bfloat16 (uint16) and float16 (int16) bits as int16."""
    raise NotImplementedError  # compiled only, see the overload


# the signed integers of each element width, in bytes
_SIGNED = {8: np.int64, 4: np.int32, 2: np.int16}


@overload(_signed_bits, inline="always")
def _signed_bits_impl(row: Any) -> Any:
    signed = _SIGNED.get(row.dtype.bitwidth // 8)
    if signed is None:
        return None

    def as_signed(row: Any) -> Any:
        return row.view(signed)

    return as_signed


def _real_of_bits(b: Any, row: Any) -> Any:
    """The float value of the element of ``row``'s dtype whose bits are ``b``."""
    raise NotImplementedError  # compiled only, see the overload


@overload(_real_of_bits, inline="always")
def _real_of_bits_impl(b: Any, row: Any) -> Any:
    if row.dtype == types.float64:

        def float64_of(b: Any, row: Any) -> Any:
            return _float64_from_bits(np.int64(b))

        return float64_of
    if row.dtype == types.float32:

        def float32_of(b: Any, row: Any) -> Any:
            return _float32_from_bits(np.int32(b))

        return float32_of
    if row.dtype not in (types.uint16, types.int16):
        return None
    element = np.uint16 if row.dtype == types.uint16 else np.int16

    def half_of(b: Any, row: Any) -> Any:  # half precision bits, widened by _real
        return _real(element(b))

    return half_of


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _row_max(row: Any) -> float:
    """The row's largest entry, if the row has no NaN. For a row with a NaN: NaN, or
    the largest of the entries that are not NaN, by the NaN's sign bit; the callers
    catch a NaN through their sums of ``exp(x - m)``, which it makes NaN.

    Computed on the elements' bits, as signed integers. IEEE floats are sign and
    magnitude: the non-negative ones (and a NaN with the sign bit clear, above
    ``+inf``) are ordered as their bits; the negative ones, whose bits are negative
    integers that grow with the magnitude, in the reverse order. So the maximum is
    the maximum of the bits where that is not negative, else (every entry negative)
    the minimum: the smallest magnitude. Two integer reductions that LLVM vectorises
    with no NaN test and no dependency longer than one cycle: the pass took 0.05 ns
    an element instead of 0.18 with LLVM's ``maxnum`` on the floats (8x1000 float32
    in cache, one thread), whose vectorised reduction tests its accumulator for NaN
    at every step.
    """
    _wide_vectors()
    b = _signed_bits(row)
    hi = lo = b[0]
    for j in range(1, b.shape[0]):
        v = b[j]
        hi = max(hi, v)
        lo = min(lo, v)
    return np.float64(_real_of_bits(hi if hi >= 0 else lo, row))


@intrinsic
def _prefetch(typingctx: Any, row: Any, j: Any) -> Any:
    """``_prefetch(row, j)``: a hint to bring the cache line of ``row[j]`` in for
    reading; no fault for any address."""
    sig = types.void(row, types.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # (address, read, locality 3: keep in all caches, data cache)
        hint = [ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
        builder.call(fn, [builder.bitcast(ptr, i8p), *hint])
        return context.get_dummy_value()

    return sig, codegen


# Memory, and how the kernels overlap it with their arithmetic. A kernel reads a row
# several times (the maximum, the exponentials, the output), first from memory, and
# writes its output row once at the end. Two measures keep the memory traffic under
# the exponentials, the one pass whose time is arithmetic:
# - the next row is asked for (its first 16 KiB, _ask_for_next) at the start of each
#   row: a softmax of 4096x1000 float32 took 0.87 of the time (one thread, median of
#   40 interleaved runs); longer rows gained nothing from more;
# - the pass of the exponentials also writes zeros to the output row (or the
#   gradient's), which the last pass then overwrites: the stores that make each of its
#   cache lines the core's own (read from memory first) are made while the
#   exponentials are computed, where the last pass, with little arithmetic, waited for
#   them. A prefetch of the output row for writing, at the start of each row, did the
#   same less well; writing the exponentials themselves, rounded, cost half precision
#   rows their rounding (softmax 4096x1000 bfloat16 1.48-1.50 of torch's time instead
#   of 1.17-1.19 with zeros). ``benchmarks/run.py --ops softmax,log_softmax,ce_fwdbwd
#   --providers sm-torch,torch --shapes 4096x1000,256x32000,8x128256 --dtypes
#   float32,bfloat16,float16``, time as a ratio to torch's, three runs each,
#   interleaved with a tree that prefetched instead: softmax 4096x1000 float32
#   1.18-1.22 -> 1.04-1.08, bfloat16 1.15-1.30 -> 1.17-1.19, float16 1.09-1.11 ->
#   0.96-1.02, 256x32000 1.21-1.42 -> 1.17-1.27; log_softmax 4096x1000 float32
#   1.14-1.20 -> 0.97-0.99, bfloat16 1.34-1.36 -> 1.25-1.28, float16 1.29-1.34 ->
#   1.23-1.24, 256x32000 1.24-1.33 -> 1.05-1.12; cross-entropy forward and backward
#   256x32000 0.33-0.50 -> 0.27-0.33; 8x128256 the same. So an output must not overlap
#   its input.
_AHEAD_BYTES = 1 << 14
# Below this size of the input, which then stays in the caches between calls, the
# prefetches only cost: a softmax of 512x1000 float32 took 1.09 times the time with
# them, 8x1000 1.06 (one thread). The zeros cost nothing measurable there: 64x1000 and
# 512x1000, float32 and bfloat16, softmax, log_softmax and cross-entropy forward and
# backward had the same ratios to torch with them as without (three runs each).
_AHEAD_FROM = 1 << 22


@numba.njit(fastmath=_EXACT, cache=True, error_model="numpy")
def _ask_for_next(x: Any, i: int, r1: int) -> None:
    """Before the work on row ``i`` of ``[r0, r1)``: prefetch the first
    :data:`_AHEAD_BYTES` of ``x``'s next row, one cache line (64 bytes) at a time;
    nothing where ``x`` has fewer than :data:`_AHEAD_FROM` bytes."""
    if x.shape[0] * x.shape[1] * x.itemsize < _AHEAD_FROM or i + 1 >= r1:
        return
    row = x[i + 1]
    size = row.itemsize
    for j in range(0, min(row.shape[0], _AHEAD_BYTES // size), 64 // size):
        _prefetch(row, j)


@numba.njit(fastmath=_EXACT, cache=True, error_model="numpy")
def _scale_into(out: Any, e: Any, f: float) -> None:
    """``out[j] = e[j] * f``, one rounding to ``out``'s dtype. Not in a function with
    ``reassoc``: LLVM rewrites ``e * (1 / s)`` there as ``e / s``, and a SIMD division
    took 0.35 ns an element, a third of the softmax."""
    _wide_vectors()
    for j in range(out.shape[0]):
        _put(out, j, e[j] * f)


def _touch(o: Any, j: Any) -> None:
    """``o[j] = 0``, where ``o`` is an output row that a later pass overwrites (see
    "Memory" above); nothing for ``o = None``."""


@overload(_touch, inline="always")
def _touch_impl(o: Any, j: Any) -> Any:
    if isinstance(o, types.NoneType):

        def nothing(o: Any, j: Any) -> None:
            return None

        return nothing

    zero = o.dtype(0)

    def store(o: Any, j: Any) -> None:
        o[j] = zero

    return store


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _row_total(row: Any, m: float, inv_t: float, o: Any) -> float:
    """``log(sum(exp(d)))`` over the row: ``log(sum)`` where the sum is at least
    :func:`_clear` of the row's length, else ``log(k) + log1p(s / k)`` from
    :func:`_split_sum`. The output row ``o`` (or None) is zeroed on the way (:func:`_touch`)."""
    _wide_vectors()
    whole = 0.0
    for j in range(row.shape[0]):
        d = _shift(row[j], m, inv_t)
        _touch(o, j)
        whole += _exp_nonpos(d)
    if whole >= _clear(row.shape[0]):
        return math.log(whole)
    k, s = _split_sum(row, m, inv_t)
    return math.log(k) + math.log1p(s / k)


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _split_sum(row: Any, m: float, inv_t: float) -> tuple[int, float]:
    """The count ``k`` of the row's entries equal to the maximum (``d == 0``, whose
    ``exp`` is exactly 1) and the sum ``s`` of the others' ``exp(d)``."""
    _wide_vectors()
    s = 0.0
    k = 0
    for j in range(row.shape[0]):
        d = _shift(row[j], m, inv_t)
        top = d == 0.0
        k += top
        s += 0.0 if top else _exp_nonpos(d)
    return k, s


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _row_stats(row: Any, inv_t: float, o: Any) -> tuple[float, float]:
    """The row's maximum and :func:`_row_total` (which zeroes the output row ``o``, or
    None); the total is NaN for a row that is not for these kernels (a NaN, or a
    maximum that is not finite)."""
    _wide_vectors()
    m = _row_max(row)
    if not math.isfinite(m):
        return m, math.nan
    return m, _row_total(row, m, inv_t, o)


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _exps_into(e: Any, row: Any, m: float, inv_t: float, o: Any) -> float:
    """``e[j] = exp((row[j] - m) * inv_t)``, and their sum; the output row ``o`` is
    zeroed on the way (:func:`_touch`)."""
    _wide_vectors()
    s = 0.0
    for j in range(row.shape[0]):
        v = _exp_nonpos(_shift(row[j], m, inv_t))
        e[j] = v
        _touch(o, j)
        s += v
    return s


@numba.njit(nogil=True, fastmath=_SUM, cache=True, error_model="numpy")
def softmax_rows(x: Any, out: Any, r0: int, r1: int, inv_t: float) -> bool:
    """``out[i] = softmax(x[i] * inv_t)`` for ``r0 <= i < r1``; ``out`` float32 or
    float64. The exponentials are kept in a float64 row buffer (in cache), and each
    output is their one rounding of ``e * (1 / sum)``; the sum is at least 1, since the
    maximum contributes ``exp(0)``. False (at once) for a row with a NaN or a
    non-finite maximum, whose outputs are then undefined.

    The buffer is what the one rounding costs on long rows: at 256x32000 float32
    (``benchmarks/run.py --ops softmax,log_softmax --providers sm-torch,torch --shapes
    256x32000 --dtypes float32``, seven runs, two of them with the other ops and
    4096x1000 as well) softmax took 1.00-1.38 of torch's time (median 1.15),
    log_softmax, whose second pass reads the input again instead, 0.87-1.19 (median
    1.03). Single calls, interleaved, each after a clone of the input (which leaves
    it in the caches, as the suite's copy baseline does) or after a copy that evicts
    it (``benchmarks/input_in_cache.py --op softmax --before clone``, ``--before
    evict``, and the same for log_softmax, three runs each): softmax 1.15-1.24 and
    1.10-1.15, log_softmax 0.97-1.13 and 0.86-0.96. Keeping the exponentials in
    the float32 output row instead (rounded, then scaled in place) rounds twice: errors
    up to 1.48 ulp of scipy's float64 softmax of the same rows instead of 0.50 (64 rows
    of 10, 1000 and 32000 normal entries, scales 1 to 100), and the variant tried was
    slower as well (1.68-1.75 of torch's time at 256x32000)."""
    _wide_vectors()
    n = x.shape[1]
    e = np.empty(n, dtype=np.float64)
    for i in range(r0, r1):
        _ask_for_next(x, i, r1)
        row = x[i]
        o = out[i]
        m = _row_max(row)
        if not math.isfinite(m):
            return False
        # (None: no multiplication, see _shift)
        s = _exps_into(e, row, m, None, o) if inv_t == 1.0 else _exps_into(e, row, m, inv_t, o)
        if s != s:
            return False
        _scale_into(o, e, 1.0 / s)
    return True


@numba.njit(nogil=True, fastmath=_SUM, cache=True, error_model="numpy")
def log_softmax_rows(x: Any, out: Any, r0: int, r1: int, inv_t: float) -> bool:
    """``out[i] = log_softmax(x[i] * inv_t)``: ``d - (log(k) + log1p(s / k))``, one
    rounding. False as for :func:`softmax_rows`."""
    _wide_vectors()
    if inv_t == 1.0:  # (None: no multiplication, see _shift)
        return _log_softmax_rows(x, out, r0, r1, None)
    return _log_softmax_rows(x, out, r0, r1, inv_t)


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _log_softmax_rows(x: Any, out: Any, r0: int, r1: int, inv_t: float) -> bool:
    _wide_vectors()
    n = x.shape[1]
    for i in range(r0, r1):
        _ask_for_next(x, i, r1)
        row = x[i]
        o = out[i]
        m, total = _row_stats(row, inv_t, o)
        if total != total:
            return False
        for j in range(n):
            _put(o, j, _shift(row[j], m, inv_t) - total)
    return True


@numba.njit(nogil=True, fastmath=_SUM, cache=True, error_model="numpy")
def logsumexp_rows(x: Any, out: Any, r0: int, r1: int, inv_t: float) -> bool:
    """``out[i] = logsumexp(x[i])`` (``out`` one-dimensional; ``inv_t`` must be 1).
    False as for :func:`softmax_rows`."""
    _wide_vectors()
    for i in range(r0, r1):
        _ask_for_next(x, i, r1)
        row = x[i]
        m, total = _row_stats(row, None, None)  # (inv_t is 1; no output row)
        if total != total:
            return False
        out[i] = m + total
    return True


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _row_loss(
    row: Any, t: int, m: float, total: float, weight: Any, smoothing: float, inv_t: float
) -> float:
    """The cross-entropy of one row with target ``t`` and logits ``x * inv_t``:
    ``w[t] ((m - x[t]) inv_t + total)``, with smoothing ``eps``: ``(1 - eps)`` times
    that plus ``eps / C sum_c w[c] ((m - x[c]) inv_t + total)``. NaN for a row the
    generic kernel must decide (a ``-inf`` logit at the target, or anywhere with
    smoothing)."""
    _wide_vectors()
    n = row.shape[0]
    weighted = weight.shape[0] > 0
    xt = np.float64(_real(row[t]))
    if xt == -math.inf:
        return math.nan
    w = weight[t] if weighted else 1.0
    loss = w * ((m - xt) * inv_t + total)
    if smoothing > 0.0:
        acc = 0.0
        wsum = 0.0
        for c in range(n):
            wc = weight[c] if weighted else 1.0
            acc += wc * ((m - np.float64(_real(row[c]))) * inv_t)
            wsum += wc
        if not math.isfinite(acc):
            return math.nan
        loss = (1.0 - smoothing) * loss + smoothing * (acc + wsum * total) / n
    return loss


@numba.njit(fastmath=_SUM, cache=True, error_model="numpy")
def _counted_exps_into(e: Any, row: Any, m: float, inv_t: float, o: Any) -> tuple[int, float]:
    """``e[j] = exp((row[j] - m) * inv_t)``, and their sum as ``k + s`` with
    ``log(k) + log1p(s / k)`` its logarithm, as in :func:`_row_total`: ``k = 1`` and
    ``s = sum - 1`` where the sum is at least :func:`_clear` of the row's length, else
    :func:`_split_sum`. The gradient's row ``o`` is zeroed on the way (:func:`_touch`)."""
    _wide_vectors()
    whole = 0.0
    for j in range(row.shape[0]):
        v = _exp_nonpos(_shift(row[j], m, inv_t))
        e[j] = v
        _touch(o, j)
        whole += v
    if whole >= _clear(row.shape[0]):
        return 1, whole - 1.0
    return _split_sum(row, m, inv_t)


def _row_scale(scale: Any, i: int) -> float:
    """The factor of row ``i``'s gradient: ``scale`` itself, or ``scale[i]`` for an
    array of them."""
    raise NotImplementedError  # compiled only, see the overload


@overload(_row_scale, inline="always")
def _row_scale_impl(scale: Any, i: Any) -> Any:
    if isinstance(scale, types.Array):

        def of_row(scale: Any, i: Any) -> float:
            return np.float64(scale[i])

        return of_row

    def the_same(scale: Any, i: Any) -> float:
        return np.float64(scale)

    return the_same


# tanh(u) = u + u**3 P(u**2) for |u| < _TANH_SMALL: its Taylor series to u**13, which
# alternates; the first term left out, 1.46e-3 u**15, is below 7e-11 of the result
_TANH_SMALL = 0.3
_TANH_TAYLOR = (
    -1.0 / 3.0,
    2.0 / 15.0,
    -17.0 / 315.0,
    62.0 / 2835.0,
    -1382.0 / 155925.0,
    21844.0 / 6081075.0,
)


@numba.njit(fastmath=_EXACT, cache=True, error_model="numpy")
def _tanh_slope(u: float) -> tuple[float, float]:
    """``(tanh(u), 1 - tanh(u)**2)`` for float64 ``u``, each to a relative 1e-9 (``+-1``
    and ``~1e-307`` at ``+-inf``; NaN and NaN at NaN), in operations that vectorise
    (``math.tanh`` is a scalar libm call).

    Beyond :data:`_TANH_SMALL`, with ``e = exp(-2|u|) <= 0.55``: ``tanh|u| = (1 - e) /
    (1 + e)``, whose ``1 - e >= 0.45`` keeps the 2e-10 of :func:`_exp_nonpos`, and the
    slope ``4 e / (1 + e)**2`` without the cancellation of ``1 - tanh**2`` near 1.
    Below it, the Taylor series."""
    a = abs(u)
    e = _exp_nonpos(-2.0 * a)
    q = a * a
    c1, c2, c3, c4, c5, c6 = _TANH_TAYLOR
    p = c6
    p = p * q + c5
    p = p * q + c4
    p = p * q + c3
    p = p * q + c2
    p = p * q + c1
    small = a + a * q * p
    near = a < _TANH_SMALL
    th = small if near else (1.0 - e) / (1.0 + e)
    wide = 1.0 + e
    slope = 1.0 - small * small if near else 4.0 * e / (wide * wide)
    if u != u:
        return u, u
    return (th if u >= 0.0 else -th), slope


@numba.njit(fastmath=_EXACT, cache=True, error_model="numpy")
def _capped_into(y: Any, slope: Any, row: Any, cap: float) -> None:
    """``y[j] = cap tanh(row[j] / cap)`` (float64), the soft-capped logits, and unless
    ``slope`` is empty their derivative ``1 - tanh(row[j] / cap)**2`` into it."""
    _wide_vectors()
    with_slope = slope.shape[0] > 0
    for j in range(y.shape[0]):
        th, sl = _tanh_slope(np.float64(_real(row[j])) / cap)
        y[j] = cap * th
        if with_slope:
            slope[j] = sl


@numba.njit(fastmath=_EXACT, cache=True, error_model="numpy")
def _gradient_into(g: Any, e: Any, f: float, b: float, weight: Any, slope: Any) -> None:
    """``g[c] = (f e[c] - b w[c]) slope[c]`` (``w = 1`` for an empty ``weight``, no
    ``slope`` factor for an empty one), one rounding to ``g``'s dtype. Not in a
    function with ``reassoc`` (see :func:`_scale_into`)."""
    _wide_vectors()
    weighted = weight.shape[0] > 0
    capped = slope.shape[0] > 0
    for c in range(g.shape[0]):
        wc = weight[c] if weighted else 1.0
        v = f * e[c] - b * wc
        _put(g, c, v * slope[c] if capped else v)


def _cross_entropy_kernel(capped: bool) -> Any:
    """The loop of :func:`cross_entropy_rows` over its rows, soft-capped or not
    (``capped``, a constant of the closure: Numba prunes the other branch before it
    types ``row``, a float32 row of ``x`` or the float64 capped one). One body for the
    two, compiled as two kernels: with both paths in one function, or the row's work
    in a function of its own, LLVM made the forward pass 3-4% slower (4096x1000
    float32, one thread, interleaved rounds)."""

    def rows(
        x: Any,
        out: Any,
        r0: int,
        r1: int,
        target: Any,
        weight: Any,
        ignore_index: int,
        smoothing: float,
        inv_t: float,
        z: float,
        cap: float,
        grad: Any,
        scale: Any,
    ) -> bool:
        _wide_vectors()
        n = x.shape[1]
        weighted = weight.shape[0] > 0
        with_grad = grad.shape[0] > 0
        e = np.empty(n if with_grad else 0, dtype=np.float64)
        y = np.empty(n if capped else 0, dtype=np.float64)
        slope = np.empty(n if capped and with_grad else 0, dtype=np.float64)
        wsum = 0.0
        for c in range(n):
            wsum += weight[c] if weighted else 1.0
        for i in range(r0, r1):
            _ask_for_next(x, i, r1)
            t = target[i]
            if t == ignore_index:
                out[i] = 0.0
                if with_grad:
                    for c in range(n):
                        _put(grad[i], c, 0.0)
                continue
            if capped:
                _capped_into(y, slope, x[i], cap)
                row = y
            else:
                row = x[i]
            if with_grad:
                m = _row_max(row)
                if not math.isfinite(m):
                    return False
                # (None: no multiplication, see _shift)
                if inv_t == 1.0:
                    k, s = _counted_exps_into(e, row, m, None, grad[i])
                else:
                    k, s = _counted_exps_into(e, row, m, inv_t, grad[i])
                total = math.log(k) + math.log1p(s / k)
            elif inv_t == 1.0:
                m, total = _row_stats(row, None, None)
            else:
                m, total = _row_stats(row, inv_t, None)
            loss = _row_loss(row, t, m, total, weight, smoothing, inv_t)
            if loss != loss:
                return False
            zl = 0.0  # the z-loss's 2 z L
            if z > 0.0:
                lse = m * inv_t + total
                loss += z * lse * lse
                zl = 2.0 * z * lse
            # (finite logits give a finite loss and gradient, unless a huge inv_t makes
            # them overflow float64: then the generic kernel decides)
            if not math.isfinite(loss):
                return False
            out[i] = loss
            if with_grad:
                w = weight[t] if weighted else 1.0
                sc = _row_scale(scale, i) * inv_t
                a = (1.0 - smoothing) * w + smoothing * wsum / n + zl
                f = sc * a / (k + s)
                if not math.isfinite(f):
                    return False
                b = sc * smoothing / n
                g = grad[i]
                _gradient_into(g, e, f, b, weight, slope)
                gt = (f * e[t] - b * w) - sc * (1.0 - smoothing) * w
                _put(g, t, gt * slope[t] if capped else gt)
        return True

    return keyed.njit(nogil=True, fastmath=_SUM, error_model="numpy")(rows)


# (uncapped_cross_entropy_rows is also for callers that never cap, which then compile
# one of the two kernels: the JAX FFI handlers, XLA capping before the call)
uncapped_cross_entropy_rows = _cross_entropy_kernel(False)
_capped_rows = _cross_entropy_kernel(True)


@numba.njit(nogil=True, fastmath=_SUM, cache=True, error_model="numpy")
def cross_entropy_rows(
    x: Any,
    out: Any,
    r0: int,
    r1: int,
    target: Any,
    weight: Any,
    ignore_index: int,
    smoothing: float,
    inv_t: float,
    z: float,
    cap: float,
    grad: Any,
    scale: Any,
) -> bool:
    """Per-sample cross-entropy ``out[i]`` of the rows ``r0 <= i < r1`` with integer
    targets and logits ``x * inv_t`` (a temperature ``1 / inv_t``), in float64: times
    ``weight[t]`` (none for an empty ``weight``), 0 for ``ignore_index``.

    The loss is ``(m - x[t]) inv_t + (log(k) + log1p(s / k))``, a sum of two
    non-negative terms, so a confident prediction keeps its relative precision (SPEC
    §3.5); with ``smoothing = eps`` it is PyTorch's ``(1 - eps) w[t] nll + eps / C
    sum_c w[c] (-log p_c)``; with ``z > 0`` plus the z-loss ``z L**2``, ``L = m inv_t
    + log(k) + log1p(s / k)`` the row's logsumexp (unweighted, as the generic kernel
    has it). With ``cap > 0`` the logits are first soft-capped, ``cap tanh(x / cap)``
    (in float64, :func:`_tanh_slope`). False for a row the generic kernel must
    decide: a NaN or a non-finite maximum, a ``-inf`` logit at the target (or
    anywhere, with smoothing); with a cap, only a NaN.

    Unless ``grad`` is empty (shape ``(0, 0)``), the same pass over each row writes the
    gradient of ``scale`` times its loss (``scale`` a number, or an array of one a
    row): ``grad[i, c] = scale inv_t ((a + 2 z L) p_c - eps w_c / C - (1 - eps) w_t
    [c = t])`` with ``p = exp((x - m) inv_t) / (k + s)`` and ``a = (1 - eps) w_t + eps
    sum(w) / C``, times the cap's ``1 - tanh(x_c / cap)**2``, rounded once to
    ``grad``'s dtype (float32, or half-precision bits); zero for an ignored row. The
    exponentials of the row are kept in a float64 row buffer for it: computing them
    again took 1.2 times the time (4096x1000 and 256x32000 float32, one thread).
    """
    if cap > 0.0:
        return _capped_rows(
            x, out, r0, r1, target, weight, ignore_index, smoothing, inv_t, z, cap, grad, scale
        )
    return uncapped_cross_entropy_rows(
        x, out, r0, r1, target, weight, ignore_index, smoothing, inv_t, z, cap, grad, scale
    )


@numba.njit(cache=True, error_model="numpy")
def target_total(target: Any, weight: Any, ignore_index: int, n: int) -> float:
    """The sum of ``weight[t]`` over the targets ``t`` that are not ``ignore_index``
    (their count for an empty ``weight``): the denominator of a mean. -1 if a target
    is neither ``ignore_index`` nor a class in ``[0, n)``: :func:`cross_entropy_rows`
    indexes the logits with it, so it must not run then (the facade's check, on the
    generic path, raises). One pass in place of NumPy's comparison, count and
    reduction, 2-4 us on a batch of one."""
    weighted = weight.shape[0] > 0
    total = 0.0
    for i in range(target.shape[0]):
        t = target[i]
        if t == ignore_index:
            continue
        if t < 0 or t >= n:
            return -1.0
        total += weight[t] if weighted else 1.0
    return total


# --- threads ------------------------------------------------------------------------------

# Below _MIN_PARALLEL elements one thread does the whole array: handing rows to other
# threads costs some microseconds. Larger arrays are cut into blocks of about _BLOCK
# elements that the threads take one after the other, so that a thread slowed down
# (torch's OpenMP workers keep spinning on the cores for a while after each torch op:
# right after torch.softmax a static half-and-half split took 6.6 ms where it takes
# 3.5 ms alone, 4096x1000) does fewer blocks instead of holding up the others. These
# two are for compiled thread teams (XLA's pool, torch's OpenMP team).
_MIN_PARALLEL = 1 << 16
_BLOCK = 1 << 15
# stablemath's own pool of Python threads (NumPy arrays; torch tensors where torch's
# team is not for use) costs more: a job handed to a sleeping pool thread and back took
# 86 us on the 2-core VM, and each block goes back to Python, under the GIL, between
# kernel calls. So it takes arrays from _POOL_FROM elements, in blocks of _POOL_BLOCK:
# from 2 _MIN_PARALLEL in blocks of _BLOCK a float32 softmax on the pool took 2.59
# times the time of one thread at 140x1000, 1.37 at 300x1000, 0.94 at 1000x1000 and
# 0.70 at 4096x1000; with these, 1 (one thread), 0.94, 0.71 and 0.59 (medians of 60
# interleaved calls).
_POOL_FROM = 1 << 18
_POOL_BLOCK = 1 << 17
_POOL: ThreadPoolExecutor | None = None


def _count_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_THREADS = _count_threads()  # read once: the system call costs a microsecond


def _threads() -> int:
    return _THREADS


def _forget_pool() -> None:
    """In a child made by ``fork`` the pool's threads do not exist: a job handed to
    the inherited pool would never run (and ``result()`` would wait for ever), so the
    child starts a pool of its own."""
    global _POOL
    _POOL = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def run_rows(kernel: Any, x: np.ndarray, out: np.ndarray, *params: Any) -> bool:
    """Run ``kernel(x, out, r0, r1, *params)`` on all rows of ``x``, over the CPU's
    threads when the array is large enough to pay for it; False if some row is not for
    the kernels."""
    global _POOL
    rows = x.shape[0]
    if x.size < _POOL_FROM:
        return bool(kernel(x, out, 0, rows, *params))
    parts = min(_threads(), rows, x.size // _POOL_BLOCK)
    if parts <= 1:
        return bool(kernel(x, out, 0, rows, *params))
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="stablemath")
    step = max(1, min(rows // parts, _POOL_BLOCK // max(1, x.shape[1])))
    starts = iter(range(0, rows, step))  # next() on it is atomic under the GIL
    failed = []

    def work() -> None:
        for r0 in starts:
            if failed or not kernel(x, out, r0, min(r0 + step, rows), *params):
                failed.append(True)
                return

    jobs = [_POOL.submit(work) for _ in range(parts - 1)]
    work()
    for job in jobs:
        job.result()
    return not failed
