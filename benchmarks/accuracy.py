"""Accuracy report: error in ulp against the 50-digit mpmath reference vectors
(tests/data/reference.json, made by tests/make_reference.py), per function x dtype x
backend, for stablemath and for the framework's own function on the same inputs.

    python benchmarks/accuracy.py [--out benchmarks/results]

Prints a markdown table (max and p99 ulp, and the max over the references that are normal
numbers of the dtype) and writes accuracy.md and accuracy.json. Subnormal float32
references count like any other value in the first two: a backend that flushes them to
zero (XLA on CPU) shows it there, and the last column shows the error everywhere else,
where SPEC §3.5 holds every backend to 2 ulp.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import stablemath as sm

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "reference.json"
FUNCS = ("logsumexp", "softmax", "log_softmax", "cross_entropy")
Fn = Callable[[str, np.ndarray, int], Any]


def _numpy() -> dict[str, Fn]:
    out: dict[str, Fn] = {
        "stablemath": lambda f, x, t: (
            sm.cross_entropy(x[None], np.array([t])) if f == "cross_entropy" else getattr(sm, f)(x)
        )
    }
    if importlib.util.find_spec("scipy"):
        from scipy import special

        out["scipy.special"] = lambda f, x, t: (
            -special.log_softmax(x)[t] if f == "cross_entropy" else getattr(special, f)(x)
        )
    return out


def _torch() -> dict[str, Fn]:
    import torch
    import torch.nn.functional as F

    def native(f: str, x: np.ndarray, t: int) -> Any:
        xt = torch.from_numpy(x)
        if f == "cross_entropy":
            return F.cross_entropy(xt[None], torch.tensor([t]))
        return getattr(torch, f)(xt, -1)

    def ours(f: str, x: np.ndarray, t: int) -> Any:
        xt = torch.from_numpy(x)
        if f == "cross_entropy":
            return sm.cross_entropy(xt[None], torch.tensor([t]))
        return getattr(sm, f)(xt)

    return {"stablemath": ours, "torch": native}


def _jax() -> dict[str, Fn]:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    def native(f: str, x: np.ndarray, t: int) -> Any:
        xj = jnp.asarray(x)
        if f == "cross_entropy":
            return -jax.nn.log_softmax(xj)[t]
        return getattr(jax.nn, f)(xj)

    def ours(f: str, x: np.ndarray, t: int) -> Any:
        xj = jnp.asarray(x)
        if f == "cross_entropy":
            return sm.cross_entropy(xj[None], jnp.asarray([t]))
        return getattr(sm, f)(xj)

    return {"stablemath": ours, "jax.nn": native}


def _jax_x64_off() -> dict[str, Fn]:
    """JAX's default configuration: no float64 in JAX, so stablemath runs its row
    kernels through XLA's FFI on the CPU (stablemath/_xla_ffi.py; the ``jax`` rows
    above compute float32 input in float64)."""
    import jax

    def x64_off(fn: Fn) -> Fn:
        def call(f: str, x: np.ndarray, t: int) -> Any:
            with jax.enable_x64(False):
                return np.asarray(fn(f, x, t), dtype=np.float64)

        return call

    return {name: x64_off(fn) for name, fn in _jax().items()}


def _jax_x64_off_generic() -> dict[str, Fn]:
    """The same with the fast paths off: the compensated float32 kernels, which JAX
    runs on a GPU, with a mask or over several axes."""
    import os

    fn = _jax_x64_off()["stablemath"]

    def call(f: str, x: np.ndarray, t: int) -> Any:
        os.environ["STABLEMATH_DISABLE_FASTPATHS"] = "1"
        try:
            return fn(f, x, t)
        finally:
            del os.environ["STABLEMATH_DISABLE_FASTPATHS"]

    return {"stablemath": call}


BACKENDS = {
    "numpy": _numpy,
    "torch": _torch,
    "jax": _jax,
    "jax (x64 off)": _jax_x64_off,
    "jax (x64 off, generic)": _jax_x64_off_generic,
}
# the dtypes each backend can compute (JAX without x64 has no float64)
DTYPES = {"jax (x64 off)": ("float32",), "jax (x64 off, generic)": ("float32",)}


def _ulps(got: Any, ref: np.ndarray, dtype: type) -> np.ndarray:
    if hasattr(got, "detach"):
        got = got.detach().numpy()
    got = np.asarray(got, dtype=np.float64)
    spacing = np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
    diff = np.abs(got - ref)
    with np.errstate(invalid="ignore"):
        return np.where(diff == 0, 0.0, diff / spacing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    data = json.loads(DATA.read_text())
    report = []
    for backend, make in BACKENDS.items():
        module = backend.split()[0]
        if module != "numpy" and importlib.util.find_spec(module) is None:
            print(f"note: {backend} not installed, skipped")
            continue
        providers = make()
        for dtype in DTYPES.get(backend, ("float32", "float64")):
            for func in FUNCS:
                for name, fn in providers.items():
                    errs, normal = [], []
                    tiny = np.finfo(dtype).tiny
                    for row in data[dtype]:
                        x = np.array(row["x"], dtype=dtype)
                        ref = np.asarray(row[func], dtype=np.float64)
                        errs.append(np.ravel(_ulps(fn(func, x, row["target"]), ref, x.dtype.type)))
                        normal.append(np.ravel(~(np.abs(ref) < tiny)))
                    e = np.concatenate(errs)
                    e = np.where(np.isnan(e), np.inf, e)
                    e_normal = e[np.concatenate(normal)]
                    report.append(
                        {
                            "backend": backend,
                            "dtype": dtype,
                            "function": func,
                            "provider": name,
                            "max_ulp": float(e.max()),
                            "p99_ulp": float(np.percentile(e, 99)),
                            "max_ulp_normal": float(e_normal.max()),
                        }
                    )
    lines = [
        "| function | dtype | backend | provider | max ulp | p99 ulp | max ulp, normal results |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report:
        lines.append(
            f"| {r['function']} | {r['dtype']} | {r['backend']} | {r['provider']} "
            f"| {r['max_ulp']:.3g} | {r['p99_ulp']:.3g} | {r['max_ulp_normal']:.3g} |"
        )
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.md").write_text(md + "\n")
    (out / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'accuracy.md'} and {out / 'accuracy.json'}")


if __name__ == "__main__":
    main()
