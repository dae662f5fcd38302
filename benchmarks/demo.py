"""The seed cases on every installed CPU backend: the naive formula, the framework's
own function and stablemath, side by side. Exits non-zero if stablemath is ever wrong.

    python benchmarks/demo.py
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import stablemath as sm

INF = math.inf


# --- the cases: name, inputs, expected value (float64 closed forms) ----------------

SOFT = np.array([[1000.0, 2000.0, 3000.0], [4000.0, 5000.0, 6000.0]])
CE_X = np.array([[2.0, 1.0, 0.1], [1000.0, 1.0, -1000.0], [3.0, 2.0, 1.0]])
CE_T = np.array([0, 2, 1])
ROW5 = np.array([[55.8906, -114.5621, 6.3440, -30.2473, -44.1440]])
MASKED = np.array([[1.0, 2.0, 3.0]])
MASK = np.array([[False, False, False]])


def _lse(row: np.ndarray) -> float:
    m = row.max()
    return float(m + math.log(sum(math.exp(v - m) for v in row)))


CASES: list[dict[str, Any]] = [
    {
        "name": "softmax [[1000,2000,3000],[4000,5000,6000]]",
        "expected": np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
    },
    {
        "name": "CE [[2,1,.1],[1000,1,-1000],[3,2,1]] t=[0,2,1]",
        "expected": np.array([_lse(r) - r[t] for r, t in zip(CE_X, CE_T, strict=True)]),
    },
    {
        "name": "CE [55.89,-114.56,6.34,-30.25,-44.14] t=2, T=1",
        "expected": np.array([_lse(ROW5[0]) - ROW5[0, 2]]),
    },
    {
        "name": "CE same row, temperature 10",
        "expected": np.array([_lse(ROW5[0] / 10) - ROW5[0, 2] / 10]),
    },
    {"name": "CE [[1,1000]] soft target [[0,1]]", "expected": np.array([0.0])},
    {"name": "softmax of a fully masked row", "expected": np.array([[0.0, 0.0, 0.0]])},
    {"name": "float16 row of 70000 zeros: softmax[0]", "expected": np.array(1 / 70_000)},
    {"name": "float16 row of 70000 zeros: logsumexp", "expected": np.array(math.log(70_000))},
]


# --- one adapter per backend: naive formula, native function, stablemath ----------------


def numpy_backend() -> dict[str, Callable[[], Any]]:
    try:
        from scipy import special
    except ImportError:
        special = None

    def naive_softmax(x):
        with np.errstate(all="ignore"):
            e = np.exp(x)
            return e / e.sum(axis=-1, keepdims=True)

    def naive_ce(x, t):
        with np.errstate(all="ignore"):
            return -np.log(naive_softmax(x)[np.arange(len(t)), t])

    def native_ce(x, t):
        if special is None:
            return None
        return -special.log_softmax(x, axis=-1)[np.arange(len(t)), t]

    z16 = np.zeros(70_000, dtype=np.float16)
    with np.errstate(all="ignore"):
        naive16 = [naive_softmax(z16)[0], np.log(np.exp(z16).sum(dtype=np.float16))]
    soft = special.softmax if special else None
    return {
        "naive": [
            lambda: naive_softmax(SOFT),
            lambda: naive_ce(CE_X, CE_T),
            lambda: naive_ce(ROW5, [2]),
            lambda: naive_ce(ROW5 / 10, [2]),
            lambda: np.array([-np.log(naive_softmax(np.array([[1.0, 1000.0]]))[0, 1])]),
            lambda: naive_softmax(np.where(MASK, MASKED, -np.inf)),
            lambda: naive16[0],
            lambda: naive16[1],
        ],
        "native (scipy.special)": [
            lambda: soft(SOFT, axis=-1) if soft else None,
            lambda: native_ce(CE_X, CE_T),
            lambda: native_ce(ROW5, [2]),
            lambda: native_ce(ROW5 / 10, [2]),
            lambda: native_ce(np.array([[1.0, 1000.0]]), [1]),
            lambda: soft(np.where(MASK, MASKED, -np.inf), axis=-1) if soft else None,
            lambda: soft(z16)[0] if soft else None,
            lambda: special.logsumexp(z16) if special else None,
        ],
        "stablemath": [
            lambda: sm.softmax(SOFT),
            lambda: sm.cross_entropy(CE_X, CE_T, reduction="none"),
            lambda: sm.cross_entropy(ROW5, np.array([2]), reduction="none"),
            lambda: sm.cross_entropy(ROW5, np.array([2]), reduction="none", temperature=10.0),
            lambda: sm.cross_entropy(
                np.array([[1.0, 1000.0]]), np.array([[0.0, 1.0]]), reduction="none"
            ),
            lambda: sm.softmax(MASKED, where=MASK),
            lambda: sm.softmax(z16)[0],
            lambda: sm.logsumexp(z16),
        ],
    }


def torch_backend() -> dict[str, Callable[[], Any]]:
    import torch
    import torch.nn.functional as F

    def t(a, dtype=torch.float64):
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    def naive_softmax(x):
        e = torch.exp(x)
        return e / e.sum(dim=-1, keepdim=True)

    def naive_ce(x, tg):
        return -torch.log(naive_softmax(x)[torch.arange(len(tg)), tg])

    z16 = torch.zeros(70_000, dtype=torch.float16)
    tt = t(CE_T, torch.long)
    two = t([2], torch.long)
    return {
        "naive": [
            lambda: naive_softmax(t(SOFT)),
            lambda: naive_ce(t(CE_X), tt),
            lambda: naive_ce(t(ROW5), two),
            lambda: naive_ce(t(ROW5) / 10, two),
            lambda: -torch.log(naive_softmax(t([[1.0, 1000.0]]))[:, 1]),
            lambda: naive_softmax(t(np.where(MASK, MASKED, -np.inf))),
            lambda: naive_softmax(z16)[0],
            lambda: torch.log(torch.exp(z16).sum()),
        ],
        "native (torch)": [
            lambda: torch.softmax(t(SOFT), dim=-1),
            lambda: F.cross_entropy(t(CE_X), tt, reduction="none"),
            lambda: F.cross_entropy(t(ROW5), two, reduction="none"),
            lambda: F.cross_entropy(t(ROW5) / 10, two, reduction="none"),
            lambda: F.cross_entropy(t([[1.0, 1000.0]]), t([[0.0, 1.0]]), reduction="none"),
            lambda: torch.softmax(t(np.where(MASK, MASKED, -np.inf)), dim=-1),
            lambda: torch.softmax(z16, dim=-1)[0],
            lambda: torch.logsumexp(z16, dim=-1),
        ],
        "stablemath": [
            lambda: sm.softmax(t(SOFT)),
            lambda: sm.cross_entropy(t(CE_X), tt, reduction="none"),
            lambda: sm.cross_entropy(t(ROW5), two, reduction="none"),
            lambda: sm.cross_entropy(t(ROW5), two, reduction="none", temperature=10.0),
            lambda: sm.cross_entropy(t([[1.0, 1000.0]]), t([[0.0, 1.0]]), reduction="none"),
            lambda: sm.softmax(t(MASKED), where=t(MASK, torch.bool)),
            lambda: sm.softmax(z16)[0],
            lambda: sm.logsumexp(z16),
        ],
    }


def jax_backend() -> dict[str, Callable[[], Any]]:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    try:
        import optax
    except ImportError:
        optax = None

    def naive_softmax(x):
        e = jnp.exp(x)
        return e / e.sum(axis=-1, keepdims=True)

    def naive_ce(x, tg):
        return -jnp.log(naive_softmax(x)[jnp.arange(len(tg)), tg])

    def native_ce(x, tg):
        if optax is None:
            return jnp.take_along_axis(-jax.nn.log_softmax(x), tg[:, None], axis=-1)[:, 0]
        return optax.softmax_cross_entropy_with_integer_labels(x, tg)

    z16 = jnp.zeros(70_000, dtype=jnp.float16)
    tt, two = jnp.asarray(CE_T), jnp.asarray([2])
    j = jnp.asarray
    return {
        "naive": [
            lambda: naive_softmax(j(SOFT)),
            lambda: naive_ce(j(CE_X), tt),
            lambda: naive_ce(j(ROW5), two),
            lambda: naive_ce(j(ROW5) / 10, two),
            lambda: -jnp.log(naive_softmax(j([[1.0, 1000.0]]))[:, 1]),
            lambda: naive_softmax(j(np.where(MASK, MASKED, -np.inf))),
            lambda: naive_softmax(z16)[0],
            lambda: jnp.log(jnp.exp(z16).sum()),
        ],
        "native (jax.nn/optax)": [
            lambda: jax.nn.softmax(j(SOFT)),
            lambda: native_ce(j(CE_X), tt),
            lambda: native_ce(j(ROW5), two),
            lambda: native_ce(j(ROW5) / 10, two),
            lambda: (
                optax.softmax_cross_entropy(j([[1.0, 1000.0]]), j([[0.0, 1.0]])) if optax else None
            ),
            lambda: jax.nn.softmax(j(MASKED), where=j(MASK)),
            lambda: jax.nn.softmax(z16)[0],
            lambda: jax.nn.logsumexp(z16),
        ],
        "stablemath": [
            lambda: sm.softmax(j(SOFT)),
            lambda: sm.cross_entropy(j(CE_X), tt, reduction="none"),
            lambda: sm.cross_entropy(j(ROW5), two, reduction="none"),
            lambda: sm.cross_entropy(j(ROW5), two, reduction="none", temperature=10.0),
            lambda: sm.cross_entropy(j([[1.0, 1000.0]]), j([[0.0, 1.0]]), reduction="none"),
            lambda: sm.softmax(j(MASKED), where=j(MASK)),
            lambda: sm.softmax(z16)[0],
            lambda: sm.logsumexp(z16),
        ],
    }


BACKENDS = {"numpy": numpy_backend, "torch": torch_backend, "jax": jax_backend}


def _to_numpy(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    if hasattr(v, "detach"):
        v = v.detach().float() if v.dtype.is_floating_point and v.dtype.itemsize < 4 else v
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.float64)


def _fmt(v: np.ndarray | None) -> str:
    if v is None:
        return "n/a"
    flat = np.ravel(v)
    parts = [f"{x:.6g}" for x in flat[:3]]
    return ", ".join(parts) + (", ..." if flat.size > 3 else "")


def _ok(v: np.ndarray | None, expected: np.ndarray) -> bool:
    if v is None or v.shape != np.shape(expected) or not np.all(np.isfinite(v)):
        return False
    return bool(np.allclose(v, expected, rtol=2e-3, atol=1e-12))


def main() -> int:
    header = ["case", "backend", "provider", "value", "ok"]
    rows = []
    failures = []
    naive_failures = 0
    for name, make in BACKENDS.items():
        if name != "numpy" and importlib.util.find_spec(name) is None:
            print(f"note: {name} is not installed; skipping it")
            continue
        providers = make()
        for i, case in enumerate(CASES):
            for provider, calls in providers.items():
                try:
                    value = _to_numpy(calls[i]())
                    shown = _fmt(value)
                except Exception as exc:  # a framework raising is a result too
                    value, shown = None, f"error: {type(exc).__name__}"
                ok = _ok(value, case["expected"])
                if provider == "stablemath" and not ok:
                    failures.append(f"{case['name']} on {name}: {shown}")
                if provider == "naive" and not ok:
                    naive_failures += 1
                rows.append([case["name"], name, provider, shown, "yes" if ok else "NO"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    print()
    n_sm = sum(1 for r in rows if r[2] == "stablemath")
    print(
        f"stablemath: {n_sm - len(failures)}/{n_sm} finite and correct; "
        f"naive formula wrong or non-finite on {naive_failures} of {n_sm}"
    )
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
