"""JAX arrays on the CPU: the compiled row kernels as XLA FFI custom calls, for
softmax, log_softmax, logsumexp and cross-entropy with integer targets.

Why: under ``jax.jit`` the generic kernels (:mod:`stablemath._kernels`) cost 10-16x
``jax.nn.softmax`` on the CPU (``benchmarks/run.py``, 4096x1000 and 256x32000
float32). Their error-free corrections of the shift, the sum and the quotient are
about 60 float32 operations an element, which XLA's CPU fusions evaluate at a fraction
of the vector width (``jax.jit(sm.softmax).lower(x).compile().cost_analysis()``: 62
flops and 86 bytes an element, against 4 and 8 for ``jax.nn.softmax``). The row
kernels of :mod:`stablemath._cpu_kernels` compute in float64, where none of the
corrections is needed, and are what the NumPy fast path runs; here XLA calls them.

How:

* one XLA FFI handler per (function, element type): a Numba ``cfunc`` that reads
  XLA's call frame (``xla/ffi/api/c_api.h``, the ABI-stable C API: the structs are
  read as words at their documented offsets) and runs the kernel over the rows
  (through a row runner compiled on its own and called by symbol, so that the
  kernel is not compiled again at each level above it: :func:`_rows_runner`),
  shared out among the threads of XLA's own CPU pool (see :func:`_handler`); the
  rows the kernels refuse (a NaN, a maximum of ``+-inf``)
  get their SPEC §3 values in the handler, from the NaN and ``+inf`` counts of the
  row (NaN; ``1/k`` / ``-log k`` at the ``k`` entries ``+inf``; 0 / ``-inf`` for an
  all ``-inf`` row): a ``lax.cond`` falling back to the generic kernels cost more
  than the kernels themselves (XLA on the CPU took 14 ms for the conditional around
  a 3 ms call, 4096x1000 float32). The tests compare the two paths on those rows;
* :func:`normalise` and :func:`logsumexp` call it with :func:`jax.ffi.ffi_call` on
  the input with ``axis`` moved last. No value is read on the host, so this traces
  under ``jit`` and ``vmap`` (the batch becomes more rows of the same call);
* derivatives by ``jax.custom_jvp``, written with ``jnp`` from the softmax ``p`` (so
  they are differentiable in turn): ``p * (dx - sum(p dx)) / T`` for softmax,
  ``(dx - sum(p dx)) / T`` for log_softmax (0 in an all ``-inf`` slice), ``sum(p dx)``
  for logsumexp, ``(p - e/C - (1 - e) onehot(t)) . dx`` for a sample's cross-entropy
  (``-(1 - e) onehot(t)`` in an all ``-inf`` row). In a ``+inf`` slice ``p`` is
  ``1/k`` at its ``k`` infinite entries, which makes these the limits the generic
  kernels give (SPEC §3);
* cross-entropy: the kernel gives each sample's loss (of the logits over the
  ``temperature``, with label smoothing ``e`` and the ``z_loss``) in one pass over the
  logits, and under differentiation its gradient in the same pass (a second target;
  a ``custom_jvp`` of the pair gives the gradient's own derivative, through the
  softmax's). Class weights go into the kernel where there is smoothing or a z-loss
  (a float32 operand, one row of them per vmapped call: :func:`_weighted_rows`), and
  their tangent is a term of the ``custom_jvp``; without either term the weight of a
  sample is a factor of its whole loss, applied in JAX like ``ignore_index``, targets
  out of range (NaN, SPEC §4) and the reduction. A mean or a sum is ``sum(s * loss)``
  with the factors ``s`` (``w[t] / count``) passed to the gradient target, which
  writes ``s`` times the gradient in the logits' dtype: the reverse-mode gradient is
  then that array itself, without a second pass of XLA scaling it by the factors (and
  by the upstream gradient, which is a constant 1 under ``jax.grad``: XLA drops the
  product). A per-sample ``where`` arrives as ``ignore_index`` targets
  (:mod:`stablemath._fastpaths`). A ``softcap`` is applied by XLA in float32 before
  the call (JAX differentiates it), as the generic kernels do without
  ``jax_enable_x64``; with it, and for soft targets, the generic kernels run;
* only where XLA compiles for one CPU device: arrays on a CPU device, or, for traced
  arrays in a process that also has accelerators, ``lax.platform_dependent`` (the
  generic kernels for every other platform); not for arrays sharded over several
  devices (:func:`_cpu_only`).

What it gives (``nox -s bench``, quick set, 2-core VM, p50 time as a ratio to
``jax.nn`` / optax under jit; "generic" from the run at ac1e326, "FFI" from the run at
b8764f8, both the README's in their time):

==================================  =======  ====
op, shape, dtype                    generic  FFI
==================================  =======  ====
softmax 4096x1000 float32            39.16   0.63
softmax 256x32000 float32             7.77   0.86
softmax 4096x1000 bfloat16            1.60   0.63
log_softmax 4096x1000 float32        10.75   0.82
log_softmax 256x32000 float32         3.32   0.86
log_softmax 4096x1000 bfloat16        7.77   0.92
logsumexp 4096x1000 float32           2.05   0.78
logsumexp 256x32000 float32           8.29   0.70
cross-entropy 4096x1000 float32       8.41   0.85
cross-entropy 256x32000 float32       8.23   1.02
cross-entropy fwd+bwd 4096x1000       5.66   1.41
cross-entropy fwd+bwd 256x32000       6.86   0.77
==================================  =======  ====

(The generic figures of that run were taken right after CI, when JAX ran 3-4x slower
than in isolated runs; isolated, the generic softmax took 10-16x ``jax.nn``'s time.)
On one thread (before the pool was used) the FFI softmax took 1.3x ``jax.nn``'s time
at 4096x1000; cross-entropy forward+backward with the gradient from a second pass (the
FFI softmax) 1.7-4.8x optax's, 1.1-1.8x with it from the loss's pass, and 0.97 / 0.96
(float16 1.03, bfloat16 0.59) with the reduction's factors in the kernel's gradient
(the run at 89bd348, on an AVX-512 machine; ``--ops ce_fwdbwd`` A/B in one session,
float16 before -> after: 1.25 -> 0.71 at 4096x1000, 1.52 -> 0.74 at 256x32000).

Float16 needs the CPU's float16 conversions (``FLOAT16_CONVERSIONS``); bfloat16 and
float16 are read and written as their bits, as on the other fast paths, and logsumexp
of them is the kernel's float32, rounded once more to the input's dtype (JAX without
``jax_enable_x64`` has no float64 to round from).
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _cpu_kernels as ck
from . import _numba_cache as keyed
from ._cpu_team import _address

__all__ = ["cross_entropy", "logsumexp", "normalise", "supported_dtype"]

# word offsets (int64) in XLA_FFI_CallFrame: extension_start, stage, args.args, rets.rets
_EXTENSION, _STAGE, _ARGS, _RETS = 1, 4, 9, 14
# in XLA_FFI_Buffer: data, rank, dims
_DATA, _RANK, _DIMS = 3, 4, 5
_EXTENSION_METADATA = 1  # XLA_FFI_Extension_Type
_STAGE_EXECUTE = 3  # XLA_FFI_ExecutionStage
# XLA_FFI_Metadata read as int32: api_version.major_version, .minor_version, traits
_MAJOR, _MINOR, _TRAITS = 6, 7, 8
_API_VERSION = (0, 1)  # the C API version whose structs are read here


@intrinsic
def _atomic_add(typingctx: Any, address: Any, value: Any) -> Any:
    """Atomically ``*address += value`` on an int64 (sequentially consistent); the
    value before."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "seq_cst")

    return sig, codegen


@intrinsic
def _call(typingctx: Any, function: Any, argument: Any) -> Any:
    """Call the C function ``void *f(void *)`` at address ``function``; its result as
    an int64 (the XLA FFI API's functions return an ``XLA_FFI_Error*``, null for
    success; a task's ``void`` result reads as garbage and is not used)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i8p, [i8p])
        fn = builder.inttoptr(args[0], fnty.as_pointer())
        result = builder.call(fn, [builder.inttoptr(args[1], i8p)])
        return builder.ptrtoint(result, ir.IntType(64))

    return sig, codegen


@intrinsic
def _malloc(typingctx: Any, size: Any) -> Any:
    """The C library's ``malloc(size)``, as an int64 address (0 when it fails)."""
    sig = types.int64(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i8p, [ir.IntType(64)]), "malloc"
        )
        return builder.ptrtoint(builder.call(fn, [args[0]]), ir.IntType(64))

    return sig, codegen


@intrinsic
def _symbol_address(typingctx: Any, name: Any) -> Any:
    """The address of the C function registered in this process under the literal
    ``name`` (``llvmlite.binding.add_symbol``), as an int64: resolved when the compiled
    code is loaded, so that code compiled in another process (Numba's disk cache)
    finds this process's function."""
    if not isinstance(name, types.StringLiteral):
        return None
    sig = types.int64(name)
    symbol = name.literal_value

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
        return builder.ptrtoint(fn, ir.IntType(64))

    return sig, codegen


# a row runner's C signature (:func:`_rows_runner`): int64 x, rows, n, out, targets,
# grad, scales, r0, r1; float64 param, inv_t, z; int64 wts; int64 result (1: done)
_ROWS_ARGS = (*[types.int64] * 9, types.float64, types.float64, types.float64, types.int64)
_ROWS_SIG = types.int64(*_ROWS_ARGS)


@intrinsic
def _call_rows(
    typingctx: Any,
    function: Any,
    x: Any,
    rows: Any,
    n: Any,
    out: Any,
    targets: Any,
    grad: Any,
    scales: Any,
    r0: Any,
    r1: Any,
    param: Any,
    inv_t: Any,
    z: Any,
    wts: Any,
) -> Any:
    """Call the row runner (:func:`_rows_runner`) at address ``function``, as
    :func:`_call` calls an API function: the arguments cast to its C signature
    ``_ROWS_SIG``; its int64 result. With the address from :func:`_symbol_address`,
    an external call: the caller neither links nor optimises the kernel again."""
    sig = types.int64(types.int64, *_ROWS_ARGS)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        argtypes = [context.get_value_type(t) for t in _ROWS_ARGS]
        fnty = ir.FunctionType(context.get_value_type(_ROWS_SIG.return_type), argtypes)
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])

    return sig, codegen


@intrinsic
def _free(typingctx: Any, address: Any) -> Any:
    """The C library's ``free``."""
    sig = types.void(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i8p = ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p]), "free"
        )
        builder.call(fn, [builder.inttoptr(args[0], i8p)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True)
def _buffer(table: int, i: int) -> Any:
    """The words of the ``i``-th XLA_FFI_Buffer of an argument or result table."""
    return numba.carray(
        _address(numba.carray(_address(table), (i + 1,), np.int64)[i]), (6,), np.int64
    )


@numba.njit(cache=True)
def _rows(buffer: Any) -> tuple[int, int]:
    """``(rows, n)``: the buffer's last dimension and the product of the others."""
    rank = buffer[_RANK]
    dims = numba.carray(_address(buffer[_DIMS]), (max(rank, 1),), np.int64)
    n = dims[rank - 1] if rank > 0 else 1
    rows = 1
    for k in range(rank - 1):
        rows *= dims[k]
    return rows, n


@numba.njit(cache=True)
def _answer_metadata(frame: Any) -> bool:
    """XLA asks a handler for its API version through an extension of the call frame;
    True where this call was that question (answered)."""
    if frame[_EXTENSION] == 0:
        return False
    extension = numba.carray(_address(frame[_EXTENSION]), (4,), np.int64)
    if extension[1] & 0xFFFFFFFF != _EXTENSION_METADATA:
        return False
    metadata = numba.carray(_address(extension[3]), (9,), np.int32)
    metadata[_MAJOR], metadata[_MINOR] = _API_VERSION
    metadata[_TRAITS] = 0
    return True


@numba.njit(cache=True, error_model="numpy")
def _edge_counts(row: Any) -> tuple[bool, int]:
    """Whether the row holds a NaN, and how many ``+inf``."""
    nan, k = False, 0
    for j in range(row.shape[0]):
        v = ck._real(row[j])
        if v != v:
            nan = True
        elif v == math.inf:
            k += 1
    return nan, k


# The SPEC §3 values of a row the kernels refuse (a NaN, or a maximum of +-inf: an all
# -inf row, or k entries +inf), written as ck._put rounds them; logsumexp returns its own.


@numba.njit(cache=True, error_model="numpy")
def _edge_softmax(row: Any, out: Any) -> None:
    nan, k = _edge_counts(row)
    for j in range(row.shape[0]):
        # (the value in a variable: an inline _put of a conditional expression wrote
        # nothing, Numba 0.68)
        v = math.nan if nan else (1.0 / k if ck._real(row[j]) == math.inf else 0.0)
        ck._put(out, j, v)


@numba.njit(cache=True, error_model="numpy")
def _edge_log_softmax(row: Any, out: Any) -> None:
    nan, k = _edge_counts(row)
    for j in range(row.shape[0]):
        v = math.nan if nan else (0.0 - math.log(k) if ck._real(row[j]) == math.inf else -math.inf)
        ck._put(out, j, v)


@numba.njit(cache=True, error_model="numpy")
def _edge_logsumexp(row: Any) -> float:
    nan, k = _edge_counts(row)
    return math.nan if nan else (math.inf if k else -math.inf)


# the XLA_FFI_Api's functions used here, as word offsets: Error_Destroy,
# ThreadPool_Schedule, ThreadPool_NumThreads (c_api.h, API version 0.1 on)
_API, _CTX = 2, 3  # in the call frame: the XLA_FFI_Api* and the execution context
_ERROR_DESTROY, _SCHEDULE, _NUM_THREADS = 8, 17, 18
# a job: the rows shared out among the threads, in words of a malloc'd block: the next
# row, a "refused" flag, the threads inside a block of rows, the references to the job
# (the caller's and each scheduled task's: the last one out frees it), rows per block,
# rows, row length, x, out, the kernel's parameter (float64: 1/T, or the smoothing of a
# cross-entropy), the addresses of a cross-entropy's targets
_NEXT, _REFUSED, _ACTIVE, _REFS, _STEP, _JOB_ROWS, _JOB_N, _JOB_X, _JOB_OUT, _PARAM = range(10)
# and, for a cross-entropy with its gradient, those of the gradient and of its factors;
# a cross-entropy's 1 / temperature and z-loss (float64)
_TARGETS_AT, _GRAD_AT, _SCALES_AT, _INV_T, _Z = 10, 11, 12, 13, 14
# and the address of XLA's descriptor of its class weights (:func:`_class_weights`), or 0
_WEIGHTS_AT = 15
_JOB_WORDS = 16


@numba.njit(cache=True)
def _destroy(api: Any, error: int) -> None:
    """Destroy an XLA_FFI_Error that an API function returned."""
    if error != 0:
        args = np.zeros(3, np.int64)
        args[0], args[2] = 24, error
        _call(api[_ERROR_DESTROY], args.ctypes.data)


@numba.njit(cache=True)
def _pool_threads(frame: Any) -> int:
    """The number of threads of XLA's CPU pool, 1 where it cannot be asked."""
    api = numba.carray(_address(frame[_API]), (_NUM_THREADS + 1,), np.int64)
    if api[0] < 8 * (_NUM_THREADS + 1):  # an API without thread pools
        return 1
    count = np.zeros(1, np.int64)
    args = np.zeros(4, np.int64)
    args[0], args[2], args[3] = 32, frame[_CTX], count.ctypes.data
    error = _call(api[_NUM_THREADS], args.ctypes.data)
    if error != 0:
        _destroy(api, error)
        return 1
    return max(count[0], 1)


@numba.njit(cache=True)
def _release(job: int) -> None:
    """Drop one reference to the job; the last one frees it."""
    if _atomic_add(job + 8 * _REFS, -1) == 1:
        _free(job)


@numba.njit(cache=True)
def _class_weights(wts: int) -> Any:
    """The class weights of a cross-entropy: ``wts`` is the address of XLA's own
    descriptor of the float32 weights operand (an XLA_FFI_Buffer, alive until the
    call returns), ``(w_rows, C)`` once its leading dimensions are flattened; a 2-d
    array of no rows where ``wts`` is 0 (no weights).

    (Not an array of this module's making: Numba frees an array after its last use in
    the function that made it, and an address taken from it dangles.)"""
    if wts == 0:
        return numba.carray(_address(0), (0, 0), np.float32)
    buffer = numba.carray(_address(wts), (6,), np.int64)
    w_rows, n = _rows(buffer)
    return numba.carray(_address(buffer[_DATA]), (w_rows, n), np.float32)


def _weighted_rows(kernel: Any) -> Any:
    """``weighted(x, loss, r0, r1, target, wts, smoothing, inv_t, z, grad, factor)``:
    the cross-entropy ``kernel`` on the rows ``[r0, r1)`` with the class weights at
    ``wts`` (:func:`_class_weights`). Those have one row, or under ``jax.vmap``
    (``vmap_method="broadcast_all"``) one row for each vmapped call: its rows of
    ``x`` are a contiguous block of ``rows / w_rows``, and the kernel runs on each
    block's part of ``[r0, r1)`` with that block's weights."""

    @keyed.njit()
    def weighted(
        x: Any,
        loss: Any,
        r0: int,
        r1: int,
        target: Any,
        wts: int,
        smoothing: float,
        inv_t: float,
        z: float,
        grad: Any,
        factor: Any,
    ) -> bool:
        weights = _class_weights(wts)
        if weights.shape[0] == 0 or weights.shape[1] == 0:
            none = np.empty(0, np.float32)
            return kernel(
                x, loss, r0, r1, target, none, -1, smoothing, inv_t, z, 0.0, grad, factor
            )
        per = x.shape[0] // weights.shape[0]
        if per * weights.shape[0] != x.shape[0]:
            return False  # (not a vmapped block structure: never the case from JAX)
        r = r0
        while r < r1:
            block = r // per
            end = min(r1, (block + 1) * per)
            w = weights[block]
            if not kernel(x, loss, r, end, target, w, -1, smoothing, inv_t, z, 0.0, grad, factor):
                return False
            r = end
        return True

    return weighted


def _rows_runner(kernel: Any, element: Any, kind: str) -> Any:
    """The Python function, compiled by :func:`_handler`: ``run_rows(x, rows, n, out,
    targets, grad, scales, r0, r1, param, inv_t, z, wts)``, a C function of addresses
    and sizes (``_ROWS_SIG``): ``kernel`` on the rows ``[r0, r1)`` of the ``(rows, n)``
    array of ``element`` at address ``x``, its output at address ``out`` (and the int32
    targets of a cross-entropy at ``targets``, -1 for a sample that contributes 0); 0
    where it refuses one, else 1. ``kind``:
    "normalise" (``out`` like ``x``), "reduce" (one float32 a row, the logsumexp),
    "cross_entropy" (one float32 loss a row, with smoothing ``param``, of the logits
    times ``inv_t``, with the z-loss ``z``), "cross_entropy_grad" (that, and at address
    ``grad`` the gradient of each loss times its float32 factor at ``scales``, in
    ``x``'s dtype); a cross-entropy's class weights are described at ``wts`` (0: none),
    see :func:`_weighted_rows`.

    Compiled as a ``cfunc`` of its own, that the job's threads and the handler call
    at the address of its symbol (:func:`_symbol_address`, :func:`_call_rows`). Numba
    links a callee's code into its caller and optimises the whole again: called
    directly, the kernel was optimised once more at
    each of the four levels above it, and once more for each signature a level called
    it with (the job's loop with an int64 and a uint64 job, the row runner with a
    literal 0). The first calls after an install (``python benchmarks/first_call.py
    --libs jax``, float32, 512x1000) took 15.4 s for a cross-entropy, 10.5 s for its
    gradient and 38.1 s for the five ops and their 1x10 calls; now 5.7 s, 2.7 s and
    16.5 s (two runs), and the cache they fill 5.4 MB instead of 15.5 MB."""
    weighted = _weighted_rows(kernel)
    # (constants of the closure: Numba prunes the branches of the other kinds before
    # it types them)
    normalise, reduce, with_grad = kind == "normalise", kind == "reduce", kind.endswith("grad")

    def run_rows(
        x_at: int,
        rows: int,
        n: int,
        out: int,
        targets: int,
        grad: int,
        scales: int,
        r0: int,
        r1: int,
        param: float,
        inv_t: float,
        z: float,
        wts: int,
    ) -> int:
        x = numba.carray(_address(x_at), (rows, n), element)
        if normalise:
            ok = kernel(x, numba.carray(_address(out), (rows, n), element), r0, r1, param)
        elif reduce:
            ok = kernel(x, numba.carray(_address(out), (rows,), np.float32), r0, r1, 1.0)
        else:
            loss = numba.carray(_address(out), (rows,), np.float32)
            target = numba.carray(_address(targets), (rows,), np.int32)
            if with_grad:  # the loss and its gradient, in one pass
                g = numba.carray(_address(grad), (rows, n), element)
                factor = numba.carray(_address(scales), (rows,), np.float32)
                ok = weighted(x, loss, r0, r1, target, wts, param, inv_t, z, g, factor)
            else:
                no_grad = np.empty((0, 0), np.float32)
                ok = weighted(x, loss, r0, r1, target, wts, param, inv_t, z, no_grad, 1.0)
        return 1 if ok else 0

    return run_rows


def _work(rows_symbol: str) -> Any:
    """The loop every thread of a job runs: take blocks of rows until none is left,
    counted in ``_ACTIVE`` while inside one; a row the row runner registered as
    ``rows_symbol`` refuses sets ``_REFUSED`` (the caller then redoes the rows one by
    one)."""

    @keyed.njit()
    def work(job: int) -> None:
        words = numba.carray(_address(job), (_JOB_WORDS,), np.int64)
        floats = numba.carray(_address(job), (_JOB_WORDS,), np.float64)
        param, inv_t, z = floats[_PARAM], floats[_INV_T], floats[_Z]
        rows, n, step = words[_JOB_ROWS], words[_JOB_N], words[_STEP]
        x = words[_JOB_X]
        while True:
            _atomic_add(job + 8 * _ACTIVE, 1)
            r0 = _atomic_add(job + 8 * _NEXT, step)
            if r0 >= rows:
                _atomic_add(job + 8 * _ACTIVE, -1)
                return
            r1 = min(r0 + step, rows)
            out, targets, grad = words[_JOB_OUT], words[_TARGETS_AT], words[_GRAD_AT]
            scales, wts = words[_SCALES_AT], words[_WEIGHTS_AT]
            runner = _symbol_address(rows_symbol)
            done = _call_rows(
                runner, x, rows, n, out, targets, grad, scales, r0, r1, param, inv_t, z, wts
            )
            if done == 0:
                words[_REFUSED] = 1
            _atomic_add(job + 8 * _ACTIVE, -1)

    return work


@numba.njit(cache=True, error_model="numpy")
def _edge_cross_entropy(
    x: Any,
    t: int,
    weight: Any,
    smoothing: float,
    inv_t: float,
    z: float,
    grad: Any,
    scale: float,
) -> float:
    """The loss of the one row of ``x`` (logits times ``inv_t``) that the kernel
    refused, with class weights ``w`` (none for an empty ``weight``), from its
    log-probabilities (the log_softmax kernel's, or their SPEC §3 edge values):
    ``w[t] (-lp[t])``, with smoothing ``(1 - e) w[t] (-lp[t]) + e / C sum_c w[c]
    (-lp[c])`` (a term of weight 0 is 0, even where ``-lp`` is ``+inf``), plus the
    z-loss ``z L**2`` (``L`` the logsumexp: ``+inf`` in a row of ``+-inf`` maximum, as
    the generic kernels give); unless ``grad`` is empty, its gradient times ``scale``
    into ``grad``: ``inv_t ((a + 2 z L) p - e w / C - (1 - e) w[t] onehot(t))``, ``a =
    (1 - e) w[t] + e sum(w) / C``, without the z-loss's term where ``L`` is not finite
    (SPEC §3: it adds nothing in a ``+inf`` row)."""
    n = x.shape[1]
    weighted = weight.shape[0] > 0
    lp = np.empty((1, n), np.float64)
    if not ck.log_softmax_rows(x, lp, 0, 1, inv_t):
        _edge_log_softmax(x[0], lp[0])
    wt = np.float64(weight[t]) if weighted else 1.0
    loss = 0.0 if wt == 0.0 else wt * (0.0 - lp[0, t])  # (+0, not -0, for lp 0 at t)
    wsum = 0.0
    for c in range(n):
        wsum += np.float64(weight[c]) if weighted else 1.0
    if smoothing > 0.0:
        acc = 0.0
        for c in range(n):
            wc = np.float64(weight[c]) if weighted else 1.0
            if wc != 0.0:
                acc -= wc * lp[0, c]
        loss = (1.0 - smoothing) * loss + smoothing * acc / n
    zl = 0.0  # 2 z L where L is finite
    if z > 0.0:
        m = ck._row_max(x[0])  # (NaN or finite for a row with a NaN, whose loss is NaN)
        lse = m * inv_t  # +-inf for a +-inf maximum
        if math.isfinite(m):
            for c in range(n):
                if np.float64(ck._real(x[0, c])) == m:
                    lse -= lp[0, c]  # the maximum's log-probability is -log(sum)
                    break
        loss += z * lse * lse
        if math.isfinite(lse):
            zl = 2.0 * z * lse
    if grad.shape[0] > 0:
        # p - e / C - (1 - e) onehot(t), p = exp(lp); -(1 - e) onehot(t) in an all
        # -inf row (the generic kernels' limit)
        dead = True
        for c in range(n):
            dead = dead and lp[0, c] == -math.inf
        spread = 0.0 if dead else smoothing / n
        f = scale * inv_t
        a = (1.0 - smoothing) * wt + smoothing * wsum / n
        for c in range(n):
            # (variables for the value: see _edge_softmax)
            wc = np.float64(weight[c]) if weighted else 1.0
            hit = (1.0 - smoothing) * wt if c == t else 0.0
            v = f * ((a + zl) * math.exp(lp[0, c]) - spread * wc - hit)
            ck._put(grad, c, v)
    return loss


def _task(work: Any) -> Any:
    """The ``XLA_FFI_Task`` of a job: its share of the work, then its reference."""

    def task(job: Any) -> None:
        address = np.int64(numba.carray(job, (1,), np.int64).ctypes.data)
        work(address)
        _release(address)

    return keyed.cfunc(types.void(types.voidptr), nogil=True)(task)


def _symbols(kernel: Any, element: Any, kind: str) -> tuple[str, str]:
    """The names the handler of ``kernel`` on rows of ``element`` (``kind`` as in
    :func:`_rows_runner`) registers its row runner and its task under."""
    name = f"{kernel.py_func.__name__}_{kind}_{np.dtype(element).name}"
    return f"stablemath_rows_{name}", f"stablemath_task_{name}"


def _handler(kernel: Any, element: Any, kind: str) -> Any:
    """The FFI handler running ``kernel`` on rows of ``element`` (``kind`` as in
    :func:`_rows_runner`): arguments ``x``, for a cross-entropy the int32 targets (and
    with its gradient the float32 factor of each sample's gradient), and the float64
    parameters (float64, as pairs of uint32: 1/T for softmax and log_softmax; the
    smoothing, 1/T and the z-loss for a cross-entropy); results ``out`` (and the
    gradient, like ``x``).

    An array of at least ``2 * _MIN_PARALLEL`` elements is shared out among the
    threads of XLA's own CPU pool (``XLA_FFI_ThreadPool_Schedule``; the very threads
    that run XLA's fusions, so none competes for a core with spinning workers): the
    handler schedules a task per other thread and takes blocks of rows itself; it
    returns once no thread is inside a block (a task that starts later finds none
    left). Where the kernel refuses a row, all rows run again one by one, and the rows
    it refuses get their edge values."""
    edge = _edge_softmax if kernel is ck.softmax_rows else _edge_log_softmax
    # the row runner and the task, found by name (their addresses are this
    # process's alone): registered before the code that calls them is compiled or
    # loaded from the cache
    rows_symbol, symbol = _symbols(kernel, element, kind)
    runner = keyed.cfunc(_ROWS_SIG, nogil=True)(_rows_runner(kernel, element, kind))
    _CFUNCS.append(runner)
    llvm.add_symbol(rows_symbol, runner.address)
    work = _work(rows_symbol)

    @keyed.njit()
    def run_rows(x: Any, at: tuple, r0: int, r1: int, params: tuple) -> bool:
        # the row runner on the rows [r0, r1) of the array x; at: the addresses out,
        # targets, grad, scales and wts; params: param, inv_t and z
        rows, n = x.shape
        x_at, (out, targets, grad, scales, wts), (param, inv_t, z) = x.ctypes.data, at, params
        runner = _symbol_address(rows_symbol)
        done = _call_rows(
            runner, x_at, rows, n, out, targets, grad, scales, r0, r1, param, inv_t, z, wts
        )
        return done != 0

    task = _task(work)
    _CFUNCS.append(task)
    llvm.add_symbol(symbol, task.address)

    def run(
        frame: Any,
        x: Any,
        out: int,
        targets: int,
        grad: int,
        scales: int,
        param: float,
        inv_t: float,
        z: float,
        wts: int,
    ) -> bool:
        rows, n = x.shape
        threads = 1 if x.size < 2 * ck._MIN_PARALLEL else _pool_threads(frame)
        threads = min(threads, rows, x.size // ck._MIN_PARALLEL)
        job = _malloc(8 * _JOB_WORDS) if threads > 1 else 0
        if job == 0:
            at = (out, targets, grad, scales, wts)
            return run_rows(x, at, 0, rows, (param, inv_t, z))
        words = numba.carray(_address(job), (_JOB_WORDS,), np.int64)
        words[:] = 0
        words[_REFS] = threads
        words[_STEP] = max(1, min(rows // threads, ck._BLOCK // max(1, n)))
        words[_JOB_ROWS], words[_JOB_N] = rows, n
        words[_JOB_X], words[_JOB_OUT], words[_TARGETS_AT] = x.ctypes.data, out, targets
        words[_GRAD_AT], words[_SCALES_AT], words[_WEIGHTS_AT] = grad, scales, wts
        floats = numba.carray(_address(job), (_JOB_WORDS,), np.float64)
        floats[_PARAM], floats[_INV_T], floats[_Z] = param, inv_t, z
        api = numba.carray(_address(frame[_API]), (_SCHEDULE + 1,), np.int64)
        args = np.zeros(5, np.int64)
        args[0], args[2], args[3], args[4] = 40, frame[_CTX], _symbol_address(symbol), job
        for _ in range(threads - 1):
            error = _call(api[_SCHEDULE], args.ctypes.data)
            if error != 0:  # not scheduled: its reference goes
                _destroy(api, error)
                _release(job)
        work(job)
        while _atomic_add(job + 8 * _ACTIVE, 0) != 0:
            pass
        ok = _atomic_add(job + 8 * _REFUSED, 0) == 0
        _release(job)
        return ok

    run = keyed.njit()(run)
    cross_entropy = kind.startswith("cross_entropy")
    with_grad = kind == "cross_entropy_grad"

    def handler(frame_address: Any) -> int:
        frame = numba.carray(frame_address, (22,), np.int64)
        if _answer_metadata(frame) or frame[_STAGE] & 0xFFFFFFFF != _STAGE_EXECUTE:
            return 0
        xb = _buffer(frame[_ARGS], 0)
        targets = _buffer(frame[_ARGS], 1)[_DATA] if cross_entropy else 0
        # a cross-entropy's class weights (float32; none where they have no classes):
        # the address of their buffer's descriptor, for _class_weights
        wts = 0
        if cross_entropy:
            wts = numba.carray(_address(frame[_ARGS]), (3,), np.int64)[2]
            if _rows(_buffer(frame[_ARGS], 2))[1] == 0:
                wts = 0
        scales = _buffer(frame[_ARGS], 3)[_DATA] if with_grad else 0
        pb = _buffer(frame[_ARGS], 4 if with_grad else 3 if cross_entropy else 1)
        out = _buffer(frame[_RETS], 0)[_DATA]
        grad = _buffer(frame[_RETS], 1)[_DATA] if with_grad else 0
        rows, n = _rows(xb)
        x = numba.carray(_address(xb[_DATA]), (rows, n), element)
        params = numba.carray(_address(pb[_DATA]), (3 if cross_entropy else 1,), np.float64)
        param = params[0]
        inv_t, z = (params[1], params[2]) if cross_entropy else (1.0, 0.0)
        if run(frame, x, out, targets, grad, scales, param, inv_t, z, wts):
            return 0  # a null XLA_FFI_Error*: success
        weights = _class_weights(wts)
        for i in range(rows):
            if run_rows(x, (out, targets, grad, scales, wts), i, i + 1, (param, inv_t, z)):
                continue
            if kind == "normalise":
                edge(x[i], numba.carray(_address(out), (rows, n), element)[i])
            elif kind == "reduce":
                numba.carray(_address(out), (rows,), np.float32)[i] = _edge_logsumexp(x[i])
            else:
                t = numba.carray(_address(targets), (rows,), np.int32)[i]
                loss = numba.carray(_address(out), (rows,), np.float32)
                if with_grad:
                    g = numba.carray(_address(grad), (rows, n), element)[i]
                    scale = numba.carray(_address(scales), (rows,), np.float32)[i]
                else:
                    g = np.empty(0, element)
                    scale = np.float32(1.0)
                if weights.shape[0] > 0:
                    w = weights[i // (rows // weights.shape[0])]
                else:
                    w = np.empty(0, np.float32)
                loss[i] = _edge_cross_entropy(x[i : i + 1], t, w, param, inv_t, z, g, scale)
        return 0

    return handler


_KERNELS = {
    "softmax": (ck.softmax_rows, "normalise"),
    "log_softmax": (ck.log_softmax_rows, "normalise"),
    "logsumexp": (ck.logsumexp_rows, "reduce"),
    "cross_entropy": (ck.uncapped_cross_entropy_rows, "cross_entropy"),
    "cross_entropy_grad": (ck.uncapped_cross_entropy_rows, "cross_entropy_grad"),
}
# the element type the kernels read each dtype as (half precision: its bits)
_ELEMENTS = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.int16}
_TARGETS: dict[tuple[str, str], str] = {}
_CFUNCS: list[Any] = []  # kept alive: XLA holds their addresses


def _capsule(address: int) -> Any:
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    return new(address, None, None)


def _target(func: str, dtype_name: str) -> str:
    """The name of the FFI target of ``func`` on ``dtype_name`` rows, compiled and
    registered at its first use: seconds of compiling after an install, 0.1 s of
    loading it from Numba's disk cache in any later process
    (:mod:`stablemath._numba_cache`)."""
    key = (func, dtype_name)
    name = _TARGETS.get(key)
    if name is None:
        import jax

        kernel, kind = _KERNELS[func]
        handler = _handler(kernel, _ELEMENTS[dtype_name], kind)
        compiled = keyed.cfunc(types.int64(types.voidptr), nogil=True)(handler)
        _CFUNCS.append(compiled)
        name = f"stablemath_{func}_{dtype_name}"
        jax.ffi.register_ffi_target(name, _capsule(compiled.address), platform="cpu")
        _TARGETS[key] = name
    return name


def supported_dtype(dtype: Any) -> bool:
    """Whether the kernels take JAX arrays of ``dtype``."""
    name = getattr(dtype, "name", str(dtype))
    if name == "float16":
        return bool(ck.FLOAT16_CONVERSIONS)
    return name in _ELEMENTS


@functools.cache
def _jax_functions() -> Any:
    """The jitted entry points, built at the first JAX call (JAX is imported then)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from . import _kernels, _reductions
    from ._lib._compat import array_namespace, device
    from ._lib._utils import compute_dtype, float_dtype

    def kernel_call(func: str, x: Any, t: float) -> Any:
        """The FFI call on ``x`` with the reduced axis last."""
        shape = x.shape[:-1] if func == "logsumexp" else x.shape
        dtype = jnp.float32 if func == "logsumexp" else x.dtype
        inv_t = jnp.asarray(np.array([1.0 / t]).view(np.uint32))
        call = jax.ffi.ffi_call(
            _target(func, x.dtype.name),
            jax.ShapeDtypeStruct(shape, dtype),
            vmap_method="broadcast_all",
        )
        return call(x, inv_t)

    def generic(func: str, axis: int, t: float, x: Any) -> Any:
        # a tuple axis never takes a fast path: the generic kernels
        if func == "logsumexp":
            return _reductions.logsumexp(x, axis=(axis,))
        return getattr(_reductions, func)(x, axis=(axis,), temperature=t)

    def on_cpu(func: str, axis: int, t: float, x: Any) -> Any:
        out = kernel_call(func, jnp.moveaxis(x, axis, -1), t)
        if func == "logsumexp":
            return out.astype(x.dtype)
        return jnp.moveaxis(out, -1, axis)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
    def value(func: str, axis: int, t: float, cpu_only: bool, x: Any) -> Any:
        if cpu_only:
            return on_cpu(func, axis, t, x)
        return lax.platform_dependent(
            x,
            cpu=functools.partial(on_cpu, func, axis, t),
            default=lambda x: generic(func, axis, t, x).astype(x.dtype),
        )

    @value.defjvp
    def value_jvp(
        func: str, axis: int, t: float, cpu_only: bool, primals: Any, tangents: Any
    ) -> tuple[Any, Any]:
        (x,), (dx,) = primals, tangents
        y = value(func, axis, t, cpu_only, x)
        x32 = x.astype(jnp.float32)
        if func == "softmax" and x.dtype == jnp.float32:
            p = y
        else:  # (the probabilities of half precision input in float32)
            p = value("softmax", axis, t, cpu_only, x32)
        dx = dx.astype(jnp.float32) * (1.0 / t)
        mean = jnp.sum(p * dx, axis=axis, keepdims=True)
        if func == "softmax":
            dy = p * (dx - mean)
        elif func == "log_softmax":
            # an all -inf slice has p = 0 and a constant log_softmax
            dead = jnp.max(x32, axis=axis, keepdims=True) == -jnp.inf
            dy = jnp.where(dead, 0.0, dx - mean)
        else:
            dy = jnp.squeeze(mean, axis)
        return y, dy.astype(y.dtype)

    @functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
    def entry(func: str, axis: int, t: float, cpu_only: bool, x: Any) -> Any:
        return value(func, axis, t, cpu_only, x)

    # A cross-entropy's options, a static argument: opts = (label smoothing, 1 /
    # temperature, z-loss)

    def ce_on_cpu(opts: tuple, with_grad: bool, x: Any, t: Any, w: Any, *scales: Any) -> Any:
        loss = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
        results = (loss, jax.ShapeDtypeStruct(x.shape, x.dtype)) if with_grad else loss
        call = jax.ffi.ffi_call(
            _target("cross_entropy_grad" if with_grad else "cross_entropy", x.dtype.name),
            results,
            vmap_method="broadcast_all",
        )
        params = jnp.asarray(np.array(opts, np.float64).view(np.uint32))
        return call(x, t, w, *scales, params)

    def ce_parts(opts: tuple, cpu_only: bool, x: Any) -> tuple[Any, Any, Any, Any]:
        """``(p, 2 z L, 2 z, dead)``: the softmax of ``x / T`` (float32), twice the
        z-loss times the logsumexp ``L`` of ``x / T`` and twice the z-loss (both 0
        where ``L`` is not finite: SPEC §3, the z-loss adds nothing to the gradient of
        a +inf row), and the all -inf rows."""
        _, inv_t, z = opts
        x32 = x.astype(jnp.float32)
        p = value("softmax", x.ndim - 1, 1.0 / inv_t, cpu_only, x32)
        dead = jnp.max(x32, axis=-1, keepdims=True) == -jnp.inf
        if not z:
            return p, 0.0, 0.0, dead
        lse = value("logsumexp", x.ndim - 1, 1.0, cpu_only, x32 * inv_t)[..., None]
        finite = jnp.isfinite(lse)
        return p, jnp.where(finite, 2.0 * z * lse, 0.0), jnp.where(finite, 2.0 * z, 0.0), dead

    def class_weights(t: Any, w: Any, n: int) -> tuple[Any, Any, Any]:
        """``(w[t], sum(w), w)`` per sample (``w`` broadcast to the rows), all 1, ``n``
        and 1 for no class weights (an empty ``w``)."""
        if w.shape[-1] == 0:
            return 1.0, float(n), 1.0
        wt = jnp.take_along_axis(w, jnp.maximum(t, 0)[..., None], axis=-1)
        return wt, jnp.sum(w, axis=-1, keepdims=True), w

    def ce_gradient(opts: tuple, cpu_only: bool, x: Any, t: Any, w: Any) -> Any:
        # ((a + 2 z L) p - e w / C - (1 - e) w[t] onehot(t)) / T, a = (1 - e) w[t] + e
        # sum(w) / C, 0 for a sample of target -1; in an all -inf row (p = 0) -(1 - e)
        # w[t] onehot(t) / T, as the generic kernels give
        eps, inv_t, _ = opts
        p, zl, _, dead = ce_parts(opts, cpu_only, x)
        n = x.shape[-1]
        wb = jnp.broadcast_to(w, (*t.shape, n)) if w.shape[-1] else w
        wt, wsum, wc = class_weights(t, wb, n)
        onehot = jnp.arange(n) == t[..., None]
        a = (1.0 - eps) * wt + eps * wsum / n
        spread = jnp.where(dead, 0.0, eps * wc / n)
        g = p * (a + zl) - spread - jnp.where(onehot, (1.0 - eps) * wt, 0.0)
        return jnp.where(t[..., None] < 0, 0.0, g * inv_t)

    def weight_tangent(opts: tuple, cpu_only: bool, x: Any, t: Any, w: Any, dw: Any) -> Any:
        """The derivative of each sample's loss along the class weights' tangent
        ``dw``: ``(1 - e) dw[t] (-lp[t]) + e / C sum_c dw[c] (-lp[c])``, a class of
        weight 0 contributing 0 (the generic kernels' ``w * where(w == 0, 0, -lp)``)."""
        eps = opts[0]
        n = x.shape[-1]
        lp = value("log_softmax", x.ndim - 1, 1.0 / opts[1], cpu_only, x.astype(jnp.float32))
        wb = jnp.broadcast_to(w, (*t.shape, n))
        dwb = jnp.broadcast_to(dw, (*t.shape, n)).astype(jnp.float32)
        # (0 in ignored rows before any product: a cotangent 0 times a -lp of +inf
        # would be NaN in reverse mode; the target's terms picked before the product,
        # for the same reason at the other classes)
        nlp = jnp.where((wb == 0) | (t[..., None] < 0), 0.0, -lp)
        pick = jnp.maximum(t, 0)[..., None]
        d = (1.0 - eps) * (
            jnp.take_along_axis(dwb, pick, axis=-1) * jnp.take_along_axis(nlp, pick, axis=-1)
        )[..., 0]
        if eps:
            d = d + (eps / n) * jnp.sum(dwb * nlp, axis=-1)
        return jnp.where(t < 0, 0.0, d)

    def ce_generic(opts: tuple, with_grad: bool, x: Any, t: Any, w: Any, *scales: Any) -> Any:
        # the generic kernel itself on the targets as prepared (-1: contributes 0),
        # in the computing dtype the facade would choose (the facade would come back
        # to the fast paths)
        xp, (x,) = array_namespace(x)
        work = compute_dtype(xp, float_dtype(xp, x), device=device(x))
        loss = _kernels.cross_entropy(
            x.astype(work),
            t,
            axis=x.ndim - 1,
            soft=False,
            weight=w.astype(work) if w.shape[-1] else None,
            ignore_index=-1,
            reduction="none",
            label_smoothing=opts[0],
            temperature=1.0 / opts[1],
            softcap=None,
            z_loss=opts[2],
            sample_mask=None,
            xp=xp,
        )
        loss = loss.astype(jnp.float32)
        if not with_grad:
            return loss
        g = scales[0][..., None] * ce_gradient(opts, False, x, t, w)
        return loss, g.astype(x.dtype)

    def ce_call(
        opts: tuple, with_grad: bool, cpu_only: bool, x: Any, t: Any, w: Any, *scales: Any
    ) -> Any:
        if cpu_only:
            return ce_on_cpu(opts, with_grad, x, t, w, *scales)
        return lax.platform_dependent(
            x,
            t,
            w,
            *scales,
            cpu=functools.partial(ce_on_cpu, opts, with_grad),
            default=functools.partial(ce_generic, opts, with_grad),
        )

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
    def ce_rows(opts: tuple, cpu_only: bool, x: Any, t: Any, w: Any) -> Any:
        """The per-sample loss (float32), classes on the last axis, with the class
        weights ``w`` (float32; none for an empty ``w``); 0 where ``t`` is -1."""
        return ce_call(opts, False, cpu_only, x, t, w)

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
    def ce_total(opts: tuple, cpu_only: bool, x: Any, t: Any, w: Any, s: Any) -> Any:
        """``sum(s * ce_rows(x, t, w))``, float32: a reduced loss, with the reduction's
        factor of each sample in ``s`` (float32, like ``t``)."""
        return jnp.sum(s * ce_rows(opts, cpu_only, x, t, w))

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
    def ce_rows_and_gradient(opts: tuple, cpu_only: bool, x: Any, t: Any, w: Any, s: Any) -> Any:
        """``(loss, G)``: the loss of :func:`ce_rows` and ``s`` times its gradient (in
        ``x``'s dtype), from one pass of the kernel over the logits."""
        return ce_call(opts, True, cpu_only, x, t, w, s)

    def tangent(g: Any, dx: Any) -> Any:
        """``sum(g dx)`` over the classes, in float32."""
        return jnp.sum(g.astype(jnp.float32) * dx.astype(jnp.float32), axis=-1)

    def zero(tan: Any) -> bool:
        return isinstance(tan, jax.custom_derivatives.SymbolicZero)

    def ce_rows_jvp(opts: tuple, cpu_only: bool, primals: Any, tangents: Any) -> tuple[Any, Any]:
        x, t, w = primals
        dx, _, dw = tangents
        ones = jnp.ones(t.shape, jnp.float32)
        loss, g = ce_rows_and_gradient(opts, cpu_only, x, t, w, ones)
        out = jnp.zeros(loss.shape, jnp.float32) if zero(dx) else tangent(g, dx)
        if not zero(dw) and w.shape[-1]:
            out = out + weight_tangent(opts, cpu_only, x, t, w, dw)
        return loss, out

    ce_rows.defjvp(ce_rows_jvp, symbolic_zeros=True)

    def ce_total_jvp(opts: tuple, cpu_only: bool, primals: Any, tangents: Any) -> tuple[Any, Any]:
        # the reduction's factors are in the kernel's gradient: its transpose is then
        # the upstream gradient times that array, which XLA drops for the 1 that
        # jax.grad starts from (no second pass over the gradient). Symbolic zeros:
        # a constant s has no term ds * loss, which is NaN for a loss of +inf
        x, t, w, s = primals
        dx, _, dw, ds = tangents
        loss, g = ce_rows_and_gradient(opts, cpu_only, x, t, w, s)
        terms = []
        if not zero(dx):
            terms.append(jnp.sum(tangent(g, dx)))
        if not zero(ds):
            terms.append(jnp.sum(ds * loss))
        if not zero(dw) and w.shape[-1]:
            terms.append(jnp.sum(s * weight_tangent(opts, cpu_only, x, t, w, dw)))
        return jnp.sum(s * loss), sum(terms[1:], terms[0]) if terms else jnp.float32(0)

    ce_total.defjvp(ce_total_jvp, symbolic_zeros=True)

    @ce_rows_and_gradient.defjvp
    def ce_rows_and_gradient_jvp(
        opts: tuple, cpu_only: bool, primals: Any, tangents: Any
    ) -> tuple[Any, Any]:
        # the gradient moves with p and L, whose derivatives are the softmax's and
        # the logsumexp's: in a row that counts and is not all -inf, with u = dx / T,
        # dp = p (u - sum(p u)), dL = sum(p u), and along dx dg = ((a + 2 z L) dp + 2 z
        # dL p) / T; along the class weights' dw, dg = (da p - e dw / C - (1 - e) dw[t]
        # onehot(t)) / T (no spread in an all -inf row); G = s g
        eps, inv_t, _ = opts
        x, t, w, s = primals
        dx, _, dw, ds = tangents
        n = x.shape[-1]
        u = dx.astype(jnp.float32) * inv_t
        loss, big_g = ce_rows_and_gradient(opts, cpu_only, x, t, w, s)
        g = ce_gradient(opts, cpu_only, x, t, w)
        p, zl, zon, dead = ce_parts(opts, cpu_only, x)
        wb = jnp.broadcast_to(w, (*t.shape, n)) if w.shape[-1] else w
        wt, wsum, _ = class_weights(t, wb, n)
        a = (1.0 - eps) * wt + eps * wsum / n
        still = (t[..., None] < 0) | dead
        dl = jnp.sum(p * u, axis=-1, keepdims=True)
        dg = jnp.where(still, 0.0, ((a + zl) * p * (u - dl) + zon * dl * p) * inv_t)
        dloss = tangent(g, dx)
        if w.shape[-1]:
            # (a class of weight 0 has no derivative along its weight: the generic
            # kernels' w * where(w == 0, 0, -lp))
            dwb = jnp.broadcast_to(dw, (*t.shape, n)).astype(jnp.float32)
            dwb = jnp.where(wb == 0, 0.0, dwb)
            dwt, dwsum, _ = class_weights(t, dwb, n)
            onehot = jnp.arange(n) == t[..., None]
            spread = jnp.where(dead, 0.0, eps * dwb / n)
            da = (1.0 - eps) * dwt + eps * dwsum / n
            dg_w = (da * p - spread - jnp.where(onehot, (1.0 - eps) * dwt, 0.0)) * inv_t
            dg = dg + jnp.where(t[..., None] < 0, 0.0, dg_w)
            dloss = dloss + weight_tangent(opts, cpu_only, x, t, w, dw)
        d_big_g = ds[..., None] * g + s[..., None] * dg
        return (loss, big_g), (dloss, d_big_g.astype(big_g.dtype))

    @functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
    def ce_entry(
        axis: int,
        ignore_index: int,
        reduction: str,
        opts: tuple,
        cap: float,
        cpu_only: bool,
        x: Any,
        target: Any,
        weight: Any,
    ) -> Any:
        xm = jnp.moveaxis(x, axis, -1)
        if cap:
            # the soft-cap as the generic kernels compute it in their float32, by XLA,
            # and differentiated by JAX (the custom_jvps see the capped logits)
            xm = cap * jnp.tanh(xm.astype(jnp.float32) / cap)
        n = xm.shape[-1]
        ignored = target == ignore_index
        # a target out of range gives NaN (SPEC §4 under tracing; eager calls with one
        # take the generic path, which raises)
        bad = ~ignored & ((target < 0) | (target >= n))
        t = jnp.where(ignored | bad, -1, target).astype(jnp.int32)
        no_weights = jnp.zeros((0,), jnp.float32)
        # class weights go into the kernel with smoothing or the z-loss (not factors
        # of the whole loss then); else they are each sample's factor
        inside = weight is not None and (opts[0] > 0 or opts[2] > 0)
        w = weight.astype(jnp.float32) if inside else no_weights
        if weight is None:
            counted = jnp.where(ignored, 0.0, 1.0)
        else:
            counted = jnp.where(t < 0, 0.0, weight.astype(jnp.float32)[jnp.maximum(t, 0)])
            if not inside:
                # a class of weight 0 contributes 0, even where its loss is +inf
                t = jnp.where(counted == 0, -1, t)
        nan = jnp.where(bad, jnp.nan, 0.0)
        if reduction == "none":
            loss = ce_rows(opts, cpu_only, xm, t, w)
            loss = loss if weight is None or inside else counted * loss
            return (loss + nan).astype(x.dtype)
        # the reduction's factors: the weight of each sample (unless inside the loss),
        # over their total for a mean (over no kept sample 0, with a zero gradient:
        # SPEC §4)
        factors = jnp.where(t < 0, 0.0, 1.0) if inside else counted
        if reduction == "mean":
            count = jnp.sum(counted)
            factors = factors / jnp.where(count == 0, 1.0, count)
        # (the kernel reads the factors as float32: with jax_enable_x64 they were not)
        total = ce_total(opts, cpu_only, xm, t, w, factors.astype(jnp.float32))
        return (total + jnp.sum(nan)).astype(x.dtype)

    return entry, ce_entry


def _cpu_only(x: Any) -> bool | None:
    """True where XLA compiles ``x``'s computation for one CPU device, False where
    not, None where that is known only at lowering (traced arrays in a process with
    one CPU device and accelerators).

    One device only: XLA cannot partition the FFI call, and would gather an array
    sharded over several CPU devices onto each of them (its result replicated); the
    generic kernels keep the sharding (``tests/test_jax_sharding.py``). A traced array
    does not tell its sharding, so a process with several CPU devices takes the
    generic kernels for every traced array."""
    import jax

    if not isinstance(x, jax.core.Tracer):
        devices = x.sharding.device_set
        return len(devices) == 1 and next(iter(devices)).platform == "cpu"
    devices = jax.devices()
    if all(d.platform == "cpu" for d in devices):
        return len(devices) == 1
    return None if len(jax.devices("cpu")) == 1 else False


def normalise(func: str, x: Any, axis: int, t: float) -> Any:
    """``func`` (softmax or log_softmax) of the JAX array ``x`` along ``axis`` (an
    index), or None where the kernels do not apply."""
    cpu = _cpu_only(x)
    if cpu is False:
        return None
    return _jax_functions()[0](func, axis, t, bool(cpu), x)


def logsumexp(x: Any, axis: int, keepdims: bool) -> Any:
    """``logsumexp`` of the JAX array ``x`` along ``axis`` (an index), or None."""
    cpu = _cpu_only(x)
    if cpu is False:
        return None
    out = _jax_functions()[0]("logsumexp", axis, 1.0, bool(cpu), x)
    return out.reshape((*out.shape[:axis], 1, *out.shape[axis:])) if keepdims else out


def cross_entropy(
    x: Any,
    target: Any,
    axis: int,
    weight: Any,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    temperature: float = 1.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Any:
    """Hard-target cross-entropy of the JAX array ``x / temperature`` (classes along
    ``axis``, an index) against integer ``target`` of its sample shape, with the
    z-loss ``z_loss``, of the logits soft-capped first for a ``softcap`` (by XLA, in
    float32), or None where the kernels do not apply: an eager call with a target out
    of range (the generic path raises), a ``softcap`` with ``jax_enable_x64`` (the
    generic kernels cap in float64 then, more than the float32 logits the kernel
    reads can hold). The kernel gives each sample's
    loss, with the class weights inside it where there is label smoothing or a z-loss
    (elsewhere the weight of a sample is a factor of its whole loss, applied here with
    the ignored samples and the reduction)."""
    import jax

    cpu = _cpu_only(x)
    if cpu is False:
        return None
    if softcap is not None and jax.dtypes.canonicalize_dtype(np.float64) == np.float64:
        return None
    if not isinstance(target, jax.core.Tracer):
        # (in NumPy: under a trace, jnp would stage this check on a captured target)
        values, n = np.asarray(target), x.shape[axis]
        if ((values != ignore_index) & ((values < 0) | (values >= n))).any():
            return None
    ce_entry = _jax_functions()[1]
    opts = (float(smoothing), 1.0 / temperature, float(z_loss))
    cap = 0.0 if softcap is None else float(softcap)
    return ce_entry(axis, ignore_index, reduction, opts, cap, bool(cpu), x, target, weight)
