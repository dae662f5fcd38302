"""The seed cases on every installed CPU backend: the naive formula, the framework's own
function and stablemath side by side, against the expected value.

    python benchmarks/demo.py        (or: nox -s demo)

Each backend gets its default floating dtype (NumPy float64, PyTorch and JAX float32;
the 70 000-zero rows are float16). "expected" is a float64 closed form evaluated on the
inputs as stored in that dtype and rounded to the output dtype. A value is marked `!`
when it is NaN or inf, or differs from expected by more than the dtype's tolerance.
The script exits with status 1 if stablemath is ever marked, raises, or returns an
array of another library or dtype, so it doubles as a check.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import stablemath as sm

INF = math.inf
RTOL = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3}


# --- the cases ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    op: str  # "softmax", "logsumexp" or "cross_entropy" (reduction="none"), along axis -1
    x: np.ndarray
    target: np.ndarray | None = None  # int: class indices; float: soft target
    where: np.ndarray | None = None  # softmax mask: False entries are excluded
    temperature: float = 1.0
    half: bool = False  # float16 input instead of the backend's default float


ZEROS16 = np.zeros(70_000)
ROW5 = np.array([[55.8906, -114.5621, 6.3440, -30.2473, -44.1440]])
CASES = [
    Case(
        "softmax [[1000,2000,3000],[4000,5000,6000]]",
        "softmax",
        np.array([[1000.0, 2000.0, 3000.0], [4000.0, 5000.0, 6000.0]]),
    ),
    Case(
        "CE [[2,1,.1],[1000,1,-1000],[3,2,1]], t=[0,2,1]",
        "cross_entropy",
        np.array([[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]]),
        target=np.array([0, 2, 1]),
    ),
    Case("CE [55.89,-114.56,6.34,-30.25,-44.14], t=2", "cross_entropy", ROW5, np.array([2])),
    Case("  the same at temperature 10", "cross_entropy", ROW5, np.array([2]), temperature=10.0),
    Case(
        "CE [[1,1000]], soft target [[0,1]]",
        "cross_entropy",
        np.array([[1.0, 1000.0]]),
        target=np.array([[0.0, 1.0]]),
    ),
    Case("softmax [-inf,-inf,-inf] (masked by -inf fill)", "softmax", np.array([[-INF] * 3])),
    Case(
        "softmax [1,2,3], mask [F,F,F]",
        "softmax",
        np.array([[1.0, 2.0, 3.0]]),
        where=np.array([[False, False, False]]),
    ),
    Case("softmax of 70000 zeros, float16", "softmax", ZEROS16, half=True),
    Case("logsumexp of 70000 zeros, float16", "logsumexp", ZEROS16, half=True),
]


# --- expected values: float64 closed forms, one row at a time -------------------------


def _ref_lse(row: np.ndarray) -> float:
    live = [float(v) for v in row if v > -INF]
    if not live:
        return -INF
    m = max(live)
    return m + math.log(math.fsum(math.exp(v - m) for v in live))


def _ref_softmax(row: np.ndarray) -> list[float]:
    lse = _ref_lse(row)
    return [0.0 if lse == -INF else math.exp(float(v) - lse) for v in row]


def expected(case: Case, x: np.ndarray) -> np.ndarray:
    """The true result for input ``x`` (the case's input as the backend stores it)."""
    x = x / case.temperature
    if case.where is not None:
        x = np.where(case.where, x, -INF)
    rows = x.reshape(-1, x.shape[-1])
    if case.op == "softmax":
        return np.array([_ref_softmax(r) for r in rows]).reshape(x.shape)
    if case.op == "logsumexp":
        return np.array([_ref_lse(r) for r in rows]).reshape(x.shape[:-1])
    assert case.target is not None
    if case.target.dtype.kind == "i":
        return np.array([_ref_lse(r) - r[t] for r, t in zip(rows, case.target, strict=True)])
    return np.array(
        [
            math.fsum(p * (_ref_lse(r) - v) for p, v in zip(pr, r, strict=True) if p)
            for r, pr in zip(rows, case.target, strict=True)
        ]
    )


# --- one adapter per backend ----------------------------------------------------------


class Backend:
    """How one library makes arrays, and its naive and native versions of each op."""

    name: str
    float_dtype: str  # the library's default floating dtype
    native_names: str  # what "native" means, for the legend

    def asarray(self, a: np.ndarray, dtype: str) -> Any:
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def is_own(self, x: Any) -> bool:
        raise NotImplementedError

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).removeprefix("torch.")

    # the backend's elementary ops, for the naive formulas
    def exp(self, x: Any) -> Any:
        raise NotImplementedError

    def log(self, x: Any) -> Any:
        raise NotImplementedError

    def sum_last(self, x: Any, keepdims: bool) -> Any:
        raise NotImplementedError

    def gather(self, x: Any, t: Any) -> Any:
        raise NotImplementedError

    # the naive formulas everybody writes first
    def naive(self, case: Case, x: Any, target: Any, where: Any) -> Any:
        x = x / case.temperature
        e = self.exp(x)
        if case.op == "logsumexp":
            return self.log(self.sum_last(e, keepdims=False))
        if where is not None:
            e = e * where
        p = e / self.sum_last(e, keepdims=True)
        if case.op == "softmax":
            return p
        if case.target.dtype.kind == "i":
            return -self.log(self.gather(p, target))
        return -self.sum_last(target * self.log(p), keepdims=False)

    def native(self, case: Case, x: Any, target: Any, where: Any) -> Any:
        raise NotImplementedError


class NumPy(Backend):
    name, float_dtype = "numpy", "float64"

    def __init__(self) -> None:
        try:
            from scipy import special
        except ImportError:
            special = None
        self.special = special
        self.native_names = (
            "scipy.special.softmax / log_softmax / logsumexp"
            if special
            else "n/a (SciPy is not installed)"
        )

    def asarray(self, a, dtype):
        return np.asarray(a, dtype=dtype)

    def is_own(self, x):
        return isinstance(x, np.ndarray)  # a 0-d array, not a NumPy scalar

    exp, log = staticmethod(np.exp), staticmethod(np.log)

    def sum_last(self, x, keepdims):
        return np.sum(x, axis=-1, keepdims=keepdims)

    def gather(self, x, t):
        return np.take_along_axis(x, t[:, None], axis=-1)[:, 0]

    def native(self, case, x, target, where):
        s = self.special
        if s is None:
            return None
        x = x / case.temperature
        if where is not None:
            x = np.where(where, x, -np.inf)  # SciPy has no mask: the usual -inf fill
        if case.op == "softmax":
            return s.softmax(x, axis=-1)
        if case.op == "logsumexp":
            return s.logsumexp(x, axis=-1)
        logp = s.log_softmax(x, axis=-1)
        if target.dtype.kind == "i":
            return -self.gather(logp, target)
        return -np.sum(target * logp, axis=-1)


class Torch(Backend):
    name, float_dtype = "torch", "float32"
    native_names = "torch.softmax, torch.logsumexp, torch.nn.functional.cross_entropy"

    def __init__(self) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F

    def asarray(self, a, dtype):
        return self.torch.as_tensor(np.asarray(a, dtype=dtype))

    def to_numpy(self, x):
        return x.detach().cpu().double().numpy()

    def is_own(self, x):
        return isinstance(x, self.torch.Tensor)

    def exp(self, x):
        return self.torch.exp(x)

    def log(self, x):
        return self.torch.log(x)

    def sum_last(self, x, keepdims):
        return x.sum(dim=-1, keepdim=keepdims)

    def gather(self, x, t):
        return x.gather(-1, t[:, None])[:, 0]

    def native(self, case, x, target, where):
        torch = self.torch
        x = x / case.temperature
        if where is not None:
            x = x.masked_fill(~where, -torch.inf)  # the usual way to mask in torch
        if case.op == "softmax":
            return torch.softmax(x, dim=-1)
        if case.op == "logsumexp":
            return torch.logsumexp(x, dim=-1)
        return self.F.cross_entropy(x, target, reduction="none")


class Jax(Backend):
    name, float_dtype = "jax", "float32"  # JAX's default: x64 off

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        try:
            import optax
        except ImportError:
            optax = None
        self.jax, self.jnp, self.optax = jax, jnp, optax
        self.native_names = "jax.nn.softmax(where=) / logsumexp, " + (
            "optax.softmax_cross_entropy(_with_integer_labels)"
            if optax
            else "-jax.nn.log_softmax (optax is not installed)"
        )

    def asarray(self, a, dtype):
        return self.jnp.asarray(np.asarray(a, dtype=dtype))

    def is_own(self, x):
        return isinstance(x, self.jax.Array)

    def exp(self, x):
        return self.jnp.exp(x)

    def log(self, x):
        return self.jnp.log(x)

    def sum_last(self, x, keepdims):
        return self.jnp.sum(x, axis=-1, keepdims=keepdims)

    def gather(self, x, t):
        return self.jnp.take_along_axis(x, t[:, None], axis=-1)[:, 0]

    def native(self, case, x, target, where):
        nn, optax = self.jax.nn, self.optax
        x = x / case.temperature
        if case.op == "softmax":
            return nn.softmax(x, axis=-1, where=where)
        if case.op == "logsumexp":
            return nn.logsumexp(x, axis=-1)
        hard = target.dtype.kind == "i"
        if optax is None:
            logp = nn.log_softmax(x, axis=-1)
            return -self.gather(logp, target) if hard else -(target * logp).sum(-1)
        if hard:
            return optax.softmax_cross_entropy_with_integer_labels(x, target)
        return optax.softmax_cross_entropy(x, target)


BACKENDS: dict[str, Callable[[], Backend]] = {"numpy": NumPy, "torch": Torch, "jax": Jax}


def stablemath(case: Case, x: Any, target: Any, where: Any) -> Any:
    if case.op == "softmax":
        return sm.softmax(x, where=where, temperature=case.temperature)
    if case.op == "logsumexp":
        return sm.logsumexp(x)
    return sm.cross_entropy(x, target, reduction="none", temperature=case.temperature)


# --- running and printing -------------------------------------------------------------


def _fmt(v: np.ndarray, digits: int = 6) -> str:
    """Compact: 6 significant digits, at most 4 entries a row, equal entries as `n x v`."""
    v = np.asarray(v, dtype=np.float64) + 0.0  # -0.0 prints as 0
    if v.ndim == 0:
        return f"{v:.{digits}g}"
    flat = v.ravel()
    if flat.size > 3 and (np.all(flat == flat[0]) or np.all(np.isnan(flat))):
        return f"{flat.size} x {flat[0]:.{digits}g}"

    def fmt(a: np.ndarray) -> str:
        if a.ndim == 1:
            items = [f"{e:.{digits}g}" for e in a[:4]] + (["..."] if a.size > 4 else [])
        else:
            items = [fmt(r) for r in a[:3]] + (["..."] if len(a) > 3 else [])
        return "[" + ", ".join(items) + "]"

    return fmt(v)


def _ok(v: np.ndarray, want: np.ndarray, dtype: str) -> bool:
    if v.shape != want.shape or not np.all(np.isfinite(v)):
        return False
    want = want.astype(dtype).astype(np.float64)  # the true result, as stored in dtype
    tiny = float(np.finfo(dtype).smallest_subnormal)
    return bool(np.allclose(v, want, rtol=RTOL[dtype], atol=tiny))


def _call(b: Backend, provider: str, case: Case, *args: Any) -> tuple[Any, str | None, list]:
    """Run one provider: (result or None, error message or None, warnings it raised)."""
    fn = {"naive": b.naive, "native": b.native}.get(provider, stablemath)
    # The naive and native columns are meant to show NaN and inf: silence NumPy there.
    # stablemath runs under the default error state; any warning it raises is reported.
    quiet = provider != "stablemath"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore" if quiet else "always")
        with np.errstate(all="ignore") if quiet else contextlib.nullcontext():
            try:
                return fn(case, *args), None, caught
            except Exception as exc:  # a framework raising is a result too
                return None, f"{type(exc).__name__}: {exc}", caught


def run_backend(b: Backend, rows: list[list[str]], failures: list[str], tally: dict) -> None:
    for case in CASES:
        dtype = "float16" if case.half else b.float_dtype
        x = b.asarray(case.x, dtype)
        target = where = None
        if case.target is not None:
            target = b.asarray(case.target, "int64" if case.target.dtype.kind == "i" else dtype)
        if case.where is not None:
            where = b.asarray(case.where, "bool")
        # the true result, rounded to the output dtype
        want = expected(case, b.to_numpy(x)).astype(dtype).astype(np.float64)
        label = f"{case.name.strip()} on {b.name}"
        cells = []
        for provider in ("naive", "native", "stablemath"):
            out, err, caught = _call(b, provider, case, x, target, where)
            problems = []
            if err is not None:
                cells.append(f"error: {err.split(':')[0]} !")
                problems.append(f"raised {err}")
            elif out is None:  # no native function for this backend
                cells.append("n/a")
                continue
            else:
                got = b.to_numpy(out)
                ok = _ok(got, want, dtype)
                cells.append(_fmt(got) + ("" if ok else " !"))
                if not ok:
                    problems.append(f"expected {_fmt(want, 17)}, got {_fmt(got, 17)}")
            if provider == "stablemath" and out is not None:
                if not b.is_own(out) or b.dtype_name(out) != dtype:
                    problems.append(
                        f"returned a {type(out).__module__}.{type(out).__name__} of dtype "
                        f"{b.dtype_name(out)}, expected a {b.name} array of {dtype}"
                    )
                problems += [f"warned: {w.category.__name__}: {w.message}" for w in caught]
            if problems:
                tally[provider] += 1
                if provider == "stablemath":
                    failures += [f"{label}: {p}" for p in problems]
        rows.append([case.name, b.name, dtype, *cells, _fmt(want)])
        tally["total"] += 1


def main() -> int:
    rows: list[list[str]] = []
    failures: list[str] = []
    tally = {"naive": 0, "native": 0, "stablemath": 0, "total": 0}
    legend = []
    for name, make in BACKENDS.items():
        if name != "numpy" and importlib.util.find_spec(name) is None:
            print(f"note: {name} is not installed; skipping it")
            continue
        try:
            b = make()
        except ImportError as exc:
            print(f"note: {name} does not import ({exc}); skipping it")
            continue
        legend.append(f"native on {name}: {b.native_names}")
        run_backend(b, rows, failures, tally)

    header = ["case", "backend", "dtype", "naive", "native", "stablemath", "expected"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print()
    print("naive: exp(x) / sum(exp(x)), log(sum(exp(x))), -log(softmax[t]), in the backend's ops")
    for line in legend:
        print(line)
    tol = ", ".join(f"{k} {v:g}" for k, v in RTOL.items())
    print(f"! = NaN, inf or not within relative {tol} of expected")
    print()
    n = tally["total"]
    if failures:
        print(f"stablemath FAILED on {tally['stablemath']} of {n} (case, backend) pairs:")
        for f in failures:
            print(f"  {f}")
    else:
        print(f"stablemath: finite and as expected on all {n} (case, backend) pairs.")
    print(
        f"naive formula: NaN, inf or wrong on {tally['naive']} of {n}; "
        f"the frameworks' own functions on {tally['native']} of {n}."
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
