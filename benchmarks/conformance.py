"""The SPEC §3 edge-case conformance matrix: the value and gradient of each function
on each edge row, for stablemath and for every framework's own function (gradients of
softmax and log_softmax as the vector-Jacobian product with ``V`` below).

    python benchmarks/conformance.py [--out benchmarks/results]

Writes conformance.md and conformance.json; prints the markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import stablemath as sm

INF = math.inf
EDGES: dict[str, tuple[list[float], int]] = {
    # name: (row, target class for cross-entropy)
    "finite": ([1.0, 2.0, 3.0], 0),
    "one -inf": ([1.0, -INF, 3.0], 0),
    "-inf at target": ([1.0, -INF, 3.0], 1),
    "all -inf": ([-INF, -INF, -INF], 0),
    "two +inf": ([INF, 1.0, INF], 0),
    "+inf not at target": ([INF, 1.0, INF], 1),
    "NaN": ([1.0, math.nan, 3.0], 0),
    "float32 [1000,2000,3000]": ([1000.0, 2000.0, 3000.0], 0),
}
FUNCS = (
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "grad softmax",
    "grad log_softmax",
    "grad logsumexp",
    "grad CE",
)
# the cotangent of softmax and log_softmax: their gradient rows are the vector-Jacobian
# product v^T J (for log_softmax v - softmax * sum(v)), v the same on every edge
V = [1.0, -1.0, 0.5]


def _fmt(v: Any) -> str:
    # + 0.0 turns -0 into 0: the sign of a zero is no part of the contract, and it
    # differs between the fast and the generic paths
    a = np.atleast_1d(np.asarray(v, dtype=np.float64)) + 0.0
    return "[" + ", ".join(f"{x:.4g}" for x in a) + "]" if a.size > 1 else f"{a[0]:.4g}"


def providers() -> dict[str, Callable[[str, np.ndarray, int], Any]]:
    out: dict[str, Callable[[str, np.ndarray, int], Any]] = {}

    def stablemath_numpy(func: str, x: np.ndarray, t: int) -> Any:
        if func.startswith("grad"):
            return None
        if func == "cross_entropy":
            return sm.cross_entropy(x[None], np.array([t]))
        return getattr(sm, func)(x)

    out["stablemath (NumPy)"] = stablemath_numpy
    if importlib.util.find_spec("scipy"):
        from scipy import special

        def scipy_fn(func: str, x: np.ndarray, t: int) -> Any:
            if func.startswith("grad"):
                return None
            with np.errstate(all="ignore"):
                if func == "cross_entropy":
                    return -special.log_softmax(x)[t]
                return getattr(special, func)(x)

        out["scipy.special"] = scipy_fn
    if importlib.util.find_spec("torch"):
        import torch
        import torch.nn.functional as F

        def torch_fn(func: str, x: np.ndarray, t: int, own: bool = True) -> Any:
            xt = torch.tensor(x, requires_grad=True)
            tt = torch.tensor([t])
            if func in ("grad softmax", "grad log_softmax"):
                base = func.split()[1]
                y = getattr(torch, base)(xt, -1) if own else getattr(sm, base)(xt)
                (g,) = torch.autograd.grad(y, xt, torch.tensor(V, dtype=y.dtype))
                return g.numpy()
            if func in ("grad logsumexp", "grad CE"):
                if func == "grad logsumexp":
                    y = torch.logsumexp(xt, -1) if own else sm.logsumexp(xt)
                else:
                    y = F.cross_entropy(xt[None], tt) if own else sm.cross_entropy(xt[None], tt)
                (g,) = torch.autograd.grad(y, xt)
                return g.numpy()
            if func == "cross_entropy":
                y = F.cross_entropy(xt[None], tt) if own else sm.cross_entropy(xt[None], tt)
            elif own:
                y = getattr(torch, func)(xt, -1)
            else:
                y = getattr(sm, func)(xt)
            return y.detach().numpy()

        out["stablemath (torch)"] = lambda f, x, t: torch_fn(f, x, t, own=False)
        out["torch"] = torch_fn
    if importlib.util.find_spec("jax"):
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        optax = importlib.import_module("optax") if importlib.util.find_spec("optax") else None

        def jax_fn(func: str, x: np.ndarray, t: int, own: bool = True) -> Any:
            xj = jnp.asarray(x)
            tj = jnp.asarray([t])

            def ce(v: Any) -> Any:
                if not own:
                    return sm.cross_entropy(v[None], tj)
                if optax is None:
                    return -jax.nn.log_softmax(v)[t]
                return optax.softmax_cross_entropy_with_integer_labels(v[None], tj)[0]

            lse = jax.nn.logsumexp if own else sm.logsumexp
            if func in ("grad softmax", "grad log_softmax"):
                base = getattr(jax.nn if own else sm, func.split()[1])
                _, vjp = jax.vjp(base, xj)
                return np.asarray(vjp(jnp.asarray(V, dtype=xj.dtype))[0])
            if func == "grad logsumexp":
                return np.asarray(jax.grad(lse)(xj))
            if func == "grad CE":
                return np.asarray(jax.grad(ce)(xj))
            if func == "cross_entropy":
                return np.asarray(ce(xj))
            if func == "logsumexp":
                return np.asarray(lse(xj))
            mod = jax.nn if own else sm
            return np.asarray(getattr(mod, func)(xj))

        out["stablemath (JAX)"] = lambda f, x, t: jax_fn(f, x, t, own=False)
        out["jax.nn / optax"] = jax_fn
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    provs = providers()
    results: dict[str, dict[str, dict[str, str]]] = {}
    for edge, (row, t) in EDGES.items():
        dtype = np.float32 if edge.startswith("float32") else np.float64
        x = np.array(row, dtype=dtype)
        for func in FUNCS:
            for name, fn in provs.items():
                try:
                    v = fn(func, x, t)
                    shown = "—" if v is None else _fmt(v)
                except Exception as exc:  # a framework raising is an answer too
                    shown = f"error ({type(exc).__name__})"
                results.setdefault(func, {}).setdefault(edge, {})[name] = shown
    names = list(provs)
    lines = []
    for func in FUNCS:
        lines += [f"### {func}", "", "| edge (row; target) | " + " | ".join(names) + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for edge, (row, t) in EDGES.items():
            label = f"{edge}: {_fmt(row)}" + (
                f"; t={t}" if "CE" in func or "cross" in func else ""
            )
            cells = [results[func][edge][n] for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conformance.md").write_text(md + "\n")
    (out / "conformance.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'conformance.md'} and {out / 'conformance.json'}")


if __name__ == "__main__":
    main()
