"""The row kernels of :mod:`stablemath._cpu_kernels` run on PyTorch's own OpenMP threads.

Why: after each parallel torch op, torch's OpenMP workers keep spinning on their cores
for some milliseconds, waiting for the next op (GNU OpenMP's default wait policy).
Threads of our own, started right after a torch op, share those cores with the
spinning workers: on the 2-core test machine a softmax of a 4096x1000 float32 tensor on
our thread pool took 4.7-4.9 ms right after ``torch.softmax``, and 2.2-2.4 ms on torch's
team (``torch.softmax`` itself 1.7-2.0 ms; medians of 60 interleaved calls). So for
torch tensors the kernels are handed to the very threads that torch's ops use, through
the OpenMP runtime's ``GOMP_parallel(fn, data, num_threads, flags)``: the entry point
that GCC emits for every ``#pragma omp parallel``, and the one torch's own parallel
loops go through. The spinning workers pick the work up at once.

``fn`` is a Numba ``cfunc`` per kernel (below): every thread of the team runs it, takes
blocks of rows with an atomic counter until none is left, and runs the kernel on them.
Its arguments travel in one int64 block (floats bit-cast into it): addresses and
shapes of the arrays, then the scalars; the caller keeps the arrays alive for the call.

Used only where it is known to work: Linux, torch's parallel backend is OpenMP and
its runtime is GNU OpenMP (``libgomp``, as in the PyTorch wheels), and not in a child
made by ``fork`` (the inherited team's threads do not exist there). Otherwise the
kernels run on stablemath's own pool (:func:`stablemath._cpu_kernels.run_rows`), as
they do for NumPy arrays.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import _cpu_kernels as ck
from . import _numba_cache as keyed

__all__ = [
    "MEAN",
    "NONE",
    "SMALL",
    "SMALL_CROSS_ENTROPY",
    "SUM",
    "at_address",
    "available",
    "run_rows",
]

_SLOTS = 18  # int64 words of the argument block
# block layout, all kernels: the counter's address (words 0 and 1: next row, failed),
# rows per block, rows, row length, x, out; then each kernel's own
_COUNTER, _STEP, _ROWS, _N, _X, _OUT = range(6)


@intrinsic
def _address(typingctx: Any, addr: Any) -> Any:
    """The pointer whose address is the int64 ``addr``."""
    sig = types.voidptr(types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return sig, codegen


@intrinsic
def _fetch_add(typingctx: Any, counter: Any, value: Any) -> Any:
    """Atomically ``counter[0] += value``; the value before."""
    sig = types.int64(counter, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [zero])
        return builder.atomic_rmw("add", ptr, args[1], "monotonic")

    return sig, codegen


@numba.njit(cache=True)
def _claim(a: Any) -> int:
    """The first row of the next block for this thread, or -1 when all are taken or a
    thread has found a row that is not for the kernels."""
    counter = numba.carray(_address(a[_COUNTER]), (2,), np.int64)
    if counter[1] != 0:
        return -1
    r0 = _fetch_add(counter, a[_STEP])
    return r0 if r0 < a[_ROWS] else -1


@numba.njit(cache=True)
def _fail(a: Any) -> None:
    numba.carray(_address(a[_COUNTER]), (2,), np.int64)[1] = 1


def _rows_of(element: Any) -> Any:
    """The function that reads the rows ``x`` out of the argument block, as arrays of
    ``element`` (float32; uint16 for bfloat16 bits, int16 for float16 bits)."""

    @keyed.njit()
    def rows_of(a: Any) -> Any:
        return numba.carray(_address(a[_X]), (a[_ROWS], a[_N]), element)

    return rows_of


# Each kernel's block function runs it on the rows [r0, r1), its arrays read out of
# the argument block, and says whether they were all for the kernels.


# softmax and log_softmax: word 6 says whether out is float64 (for float16 inputs),
# word 7 holds inv_t; rows of bfloat16 or float16 bits have outputs of the same
def _normalise_block(kernel: Any, element: Any) -> Any:
    bits = element is not np.float32

    @keyed.njit()
    def block(a: Any, f: Any, x: Any, r0: int, r1: int) -> bool:
        shape = (a[_ROWS], a[_N])
        out = _address(a[_OUT])
        if bits:
            return kernel(x, numba.carray(out, shape, element), r0, r1, f[7])
        if a[6]:
            return kernel(x, numba.carray(out, shape, np.float64), r0, r1, f[7])
        return kernel(x, numba.carray(out, shape, np.float32), r0, r1, f[7])

    return block


# logsumexp: word 6 says whether out is float64
@numba.njit(cache=True)
def _logsumexp_block(a: Any, f: Any, x: Any, r0: int, r1: int) -> bool:
    out = _address(a[_OUT])
    if a[6]:
        return ck.logsumexp_rows(x, numba.carray(out, (a[_ROWS],), np.float64), r0, r1, 1.0)
    return ck.logsumexp_rows(x, numba.carray(out, (a[_ROWS],), np.float32), r0, r1, 1.0)


# cross-entropy: words 6-12: target, weight and its length, ignore_index, grad and its
# two dimensions; 13-17: smoothing, 1 / temperature, z-loss, scale and soft-cap
# (float64); out is float64
@numba.njit(cache=True)
def _cross_entropy_block(a: Any, f: Any, x: Any, r0: int, r1: int) -> bool:
    rows = a[_ROWS]
    loss = numba.carray(_address(a[_OUT]), (rows,), np.float64)
    target = numba.carray(_address(a[6]), (rows,), np.int64)
    weight = numba.carray(_address(a[7]), (a[8],), np.float64)
    grad = numba.carray(_address(a[10]), (a[11], a[12]), np.float32)
    return ck.cross_entropy_rows(
        x, loss, r0, r1, target, weight, a[9], f[13], f[14], f[15], f[17], grad, f[16]
    )


def _team(block: Any, element: Any) -> Any:
    """The team's function for ``block`` on rows of ``element``: every thread takes
    blocks of rows until none is left, and reports a row that is not for the kernels.
    It receives the argument block, read as int64 and as float64 words."""
    rows_of = _rows_of(element)

    @keyed.njit()
    def body(a: Any, f: Any) -> None:
        x = rows_of(a)
        rows, step = a[_ROWS], a[_STEP]
        while True:
            r0 = _claim(a)
            if r0 < 0:
                return
            if not block(a, f, x, r0, min(r0 + step, rows)):
                _fail(a)

    def team(data: Any) -> None:
        body(numba.carray(data, (_SLOTS,), np.int64), numba.carray(data, (_SLOTS,), np.float64))

    return team


# (kernel, element type of the rows) -> the team's function, compiled at first use
_BODIES = {
    (kernel, element): _team(make(element), element)
    for element in (np.float32, np.uint16, np.int16)
    for kernel, make in (
        (ck.softmax_rows, lambda e: _normalise_block(ck.softmax_rows, e)),
        (ck.log_softmax_rows, lambda e: _normalise_block(ck.log_softmax_rows, e)),
        (ck.logsumexp_rows, lambda e: _logsumexp_block),
        (ck.cross_entropy_rows, lambda e: _cross_entropy_block),
    )
}
_CFUNCS: dict[Any, Any] = {}


def _cfunc(kernel: Any, element: Any) -> Any:
    """The address of the team's function for ``kernel`` on rows of ``element``,
    compiled at its first use (a fresh install took 6 s to compile all four float32
    ones at once; loading one from Numba's disk cache takes about 0.1 s, in any later
    process: see :mod:`stablemath._numba_cache`)."""
    key = (kernel, element)
    address = _CFUNCS.get(key)
    if address is None:
        compiled = keyed.cfunc(types.void(types.voidptr), nogil=True)(_BODIES[key])
        address = _CFUNCS[key] = compiled.address
    return address


# --- small tensors: on the calling thread, the rows read at their address ---------------

# Elements: softmax, log_softmax and logsumexp of fewer run on the calling thread
# (run_rows), cross-entropy of fewer than SMALL_CROSS_ENTROPY. Where the team's turn
# costs about 3 us (the argument block built in compiled code, see _launch_normaliser),
# it pays from about 40000 elements for the normalisers: a softmax of 32x1000 float32
# took 1.12 of the time on the calling thread, 48x1000 0.80, 64x1000 0.72; and from
# 64000 for cross-entropy, whose rows are handed out in unequal blocks: 64x1000 0.95,
# 100x1000 0.92, 127x1000 0.79 (torch's 2 threads, interleaved with torch.softmax
# and F.cross_entropy, medians of 600 rounds).
SMALL = 40 << 10
SMALL_CROSS_ENTROPY = 64 << 10


def _at_address(kernel: Any, element: Any) -> Any:
    @keyed.njit()
    def at(address: int, rows: int, n: int, out: Any, param: float) -> bool:
        return kernel(numba.carray(_address(address), (rows, n), element), out, 0, rows, param)

    return at


# reductions of cross_entropy_at_address
NONE, SUM, MEAN = 0, 1, 2


def _cross_entropy_at_address(element: Any) -> Any:
    @keyed.njit()
    def at(
        address: int,
        rows: int,
        n: int,
        targets: int,
        weight: Any,
        ignore_index: int,
        smoothing: float,
        inv_t: float,
        z: float,
        cap: float,
        loss: Any,
        grad: Any,
        reduce: int,
    ) -> float:
        x = numba.carray(_address(address), (rows, n), element)
        target = numba.carray(_address(targets), (rows,), np.int64)
        total = ck.target_total(target, weight, ignore_index, n)
        if total < 0.0 or (reduce == MEAN and total == 0.0):
            return math.nan
        denominator = total if reduce == MEAN else 1.0
        args = (target, weight, ignore_index, smoothing, inv_t, z, cap, grad, 1.0 / denominator)
        if not ck.cross_entropy_rows(x, loss, 0, rows, *args):
            return math.nan
        if reduce == NONE:
            return 0.0
        s = 0.0
        for i in range(rows):
            s += loss[i]
        return s / denominator

    return at


_AT: dict[Any, Any] = {}


def at_address(kernel: Any, element: Any) -> Any:
    """``at(address, rows, n, out, param)``: ``kernel(x, out, 0, rows, param)`` on the
    calling thread, ``x`` the C-contiguous ``(rows, n)`` rows of ``element`` (as for
    :func:`_rows_of`) at ``address``; for softmax, log_softmax and logsumexp.

    For ``cross_entropy_rows``, ``at(address, rows, n, targets, weight, ignore_index,
    smoothing, inv_t, z, cap, loss, grad, reduce)`` with the int64 targets at
    ``targets``: the check of the targets (``target_total``), the kernel (the
    gradient scaled by one over the mean's denominator) and the reduction of the
    float64 ``loss`` rows (``reduce``: :data:`NONE`, :data:`SUM` or :data:`MEAN`)
    in one call; the reduced loss (0 for ``NONE``), or NaN where the fast path gives
    None: a target out of range, a mean over no kept sample, a row the kernel
    refuses.

    For tensors of fewer than :data:`SMALL` (:data:`SMALL_CROSS_ENTROPY`) elements,
    which :func:`run_rows` runs on the calling thread, the kernel reads the tensor's
    memory from ``Tensor.data_ptr()`` (0.07 us) instead of a NumPy view
    (``Tensor.numpy()``, 0.6 us, a quarter of the call overhead of a 1x10 softmax).
    Compiled at first use, like :func:`_cfunc`."""
    key = (kernel, element)
    at = _AT.get(key)
    if at is None:
        make = _cross_entropy_at_address if kernel is ck.cross_entropy_rows else None
        at = _AT[key] = make(element) if make else _at_address(kernel, element)
    return at


@intrinsic
def _gomp_parallel(typingctx: Any, gomp: Any, fn: Any, data: Any, threads: Any) -> Any:
    """``GOMP_parallel(fn, data, threads, 0)`` through the function at the address
    ``gomp`` (all four arguments int64)."""
    sig = types.void(types.int64, types.int64, types.int64, types.int64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i8p, i32, i32])
        callee = builder.inttoptr(args[0], fnty.as_pointer())
        fn, data = (builder.inttoptr(v, i8p) for v in args[1:3])
        builder.call(callee, [fn, data, builder.trunc(args[3], i32), ir.Constant(i32, 0)])
        return context.get_dummy_value()

    return sig, codegen


# The argument block is built, and GOMP_parallel called, in compiled code. From Python
# (NumPy's zeros, .ctypes.data of each array, ctypes' call) the block alone took 4.4 us,
# and run_rows of a 70x1000 float32 softmax on the team 30 us where it now takes 23
# (130x1000: 48 and 40; medians of 1000 calls, two runs). nogil, as ctypes' call was:
# other Python threads run while the team works.


@numba.njit(nogil=True, cache=True)
def _start(x: Any, out: Any) -> tuple[Any, Any, Any]:
    """The counter and the argument block (as int64 and float64 words) with the
    words every kernel reads."""
    counter = np.zeros(2, np.int64)
    a = np.zeros(_SLOTS, np.int64)
    rows, n = x.shape
    a[_COUNTER] = counter.ctypes.data
    a[_STEP] = max(1, ck._BLOCK // max(1, n))
    a[_ROWS] = rows
    a[_N] = n
    a[_X] = x.ctypes.data
    a[_OUT] = out.ctypes.data
    return counter, a, a.view(np.float64)


@numba.njit(nogil=True, cache=True)
def _launch_normaliser(gomp: int, fn: int, x: Any, out: Any, param: float, threads: int) -> bool:
    """softmax, log_softmax or logsumexp (``fn``'s) on the team: ``param`` is inv_t."""
    counter, a, f = _start(x, out)
    a[6] = 1 if out.itemsize == 8 else 0  # a float64 out
    f[7] = param
    _gomp_parallel(gomp, fn, a.ctypes.data, threads)
    return counter[1] == 0


@numba.njit(nogil=True, cache=True)
def _launch_cross_entropy(
    gomp: int,
    fn: int,
    x: Any,
    loss: Any,
    target: Any,
    weight: Any,
    ignore_index: int,
    smoothing: float,
    inv_t: float,
    z: float,
    cap: float,
    grad: Any,
    scale: float,
    threads: int,
) -> bool:
    counter, a, f = _start(x, loss)
    a[6] = target.ctypes.data
    a[7] = weight.ctypes.data
    a[8] = weight.shape[0]
    a[9] = ignore_index
    a[10] = grad.ctypes.data
    a[11], a[12] = grad.shape
    f[13], f[14], f[15], f[16], f[17] = smoothing, inv_t, z, scale, cap
    _gomp_parallel(gomp, fn, a.ctypes.data, threads)
    return counter[1] == 0


_GOMP: Any = None  # the address of GOMP_parallel of torch's runtime; False: not for use


def _find() -> Any:
    global _GOMP
    if _GOMP is None:
        _GOMP = False
        path = _gnu_openmp_of_torch()
        if path is not None:
            try:
                fn = ctypes.CDLL(path).GOMP_parallel
            except (OSError, AttributeError):
                return False
            _GOMP = ctypes.cast(fn, ctypes.c_void_p).value  # its address
    return _GOMP


def _gnu_openmp_of_torch() -> str | None:
    """The path of the GNU OpenMP runtime that torch's parallel ops run on, or None."""
    torch = sys.modules.get("torch")
    if torch is None or not sys.platform.startswith("linux"):
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    # a PyTorch wheel brings its own copy; another libgomp may be loaded beside it
    own = os.path.join(os.path.dirname(torch.__file__), "lib")
    mine = sorted(p for p in loaded if os.path.dirname(p) == own)
    if mine:
        return mine[0]
    return loaded.pop() if len(loaded) == 1 else None


def _forget() -> None:
    global _GOMP
    _GOMP = False  # the inherited team's threads do not exist in a forked child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def available() -> bool:
    """Whether the kernels can run on torch's OpenMP team (see the module docstring)."""
    return bool(_find())


def run_rows(kernel: Any, x: np.ndarray, out: np.ndarray, *params: Any) -> bool:
    """:func:`stablemath._cpu_kernels.run_rows` on torch's threads (as many as
    ``torch.get_num_threads()``); on stablemath's own pool where :func:`available` is
    False, and on the calling thread alone for small arrays."""
    small = SMALL_CROSS_ENTROPY if kernel is ck.cross_entropy_rows else SMALL
    if x.size < small:  # first, and directly: a 1x10 call pays no more
        return bool(kernel(x, out, 0, x.shape[0], *params))
    gomp = _find()
    if not gomp:
        return ck.run_rows(kernel, x, out, *params)
    threads = sys.modules["torch"].get_num_threads()
    if threads <= 1:
        return bool(kernel(x, out, 0, x.shape[0], *params))
    fn = _cfunc(kernel, x.dtype.type)
    if kernel is ck.cross_entropy_rows:
        return bool(_launch_cross_entropy(gomp, fn, x, out, *params, threads))
    return bool(_launch_normaliser(gomp, fn, x, out, *params, threads))
