"""Why stablemath on JAX is slower than ``jax.nn`` on the CPU: formulations of the same
row statistics timed under ``jax.jit`` against ``jax.nn``, side by side.

    python benchmarks/xla_probe.py [--shapes 4096x1000 256x32000]

Prints, per shape, the median time of each formulation as a ratio to its ``jax.nn``
counterpart (interleaved rounds, median of the per-round ratios) and how many fusions
XLA compiled it into ("ynn" = fusions XLA hands to YNNPACK, "loop" = XLA's own loop
emitter). Run it again with a new jaxlib: the ratios here are a property of XLA's CPU
compiler, which decides what a formulation costs.

What it showed with jaxlib 0.10.2 on the 2-core CI VM (see the session notes):

- ``jax.nn.softmax`` and ``jax.nn.logsumexp`` compile into YNNPACK fusions, the whole
  softmax into one at 4096x1000;
- counting the ties of the maximum (a second reduction, which SPEC §3.5's
  ``log(k) + log1p(s / k)`` needs) or a ``where`` in the element path sends the
  computation to XLA's loop emitter with materialised intermediates, and XLA runs
  independent fusions at the same time on the two cores;
- the bare ``m + log(sum(exp(x - m)))`` in float64 (``jax.enable_x64`` inside the jitted
  function, the arithmetic of the NumPy and PyTorch fast paths) is already several
  times ``jax.nn``: XLA's float64 ``exp`` runs at half the SIMD width.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import stablemath as sm


def _lse_float64(x: Any) -> Any:
    """The bare formula in float64 for float32 input: no tie count, no edge rows."""
    with jax.enable_x64(True):
        x64 = x.astype(jnp.float64)
        m = jnp.max(x64, axis=-1, keepdims=True)
        total = jnp.sum(jnp.exp(x64 - m), axis=-1)
        return (m[..., 0] + jnp.log(total)).astype(x.dtype)


def _lse_ties_float32(x: Any) -> Any:
    """float32, the maximal entries counted and taken out of the sum (no edge rows)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    z = x - m
    top = z == 0
    k = jnp.sum(jnp.where(top, 1.0, 0.0), axis=-1)
    s = jnp.sum(jnp.where(top, 0.0, jnp.exp(z)), axis=-1)
    return m[..., 0] + jnp.log(k) + jnp.log1p(s / k)


def _lse_float32(x: Any) -> Any:
    """The bare formula in float32, written out (the reference for the two above)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    return m[..., 0] + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))


def _softmax(x: Any) -> Any:
    return jax.nn.softmax(x, axis=-1)


def _logsumexp(x: Any) -> Any:
    return jax.nn.logsumexp(x, axis=-1)


# (name, formulation, native it is compared with)
CASES: list[tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = [
    ("logsumexp, float32 written out", _lse_float32, _logsumexp),
    ("logsumexp, float32, ties counted", _lse_ties_float32, _logsumexp),
    ("logsumexp, float64 inside jit", _lse_float64, _logsumexp),
    ("sm.logsumexp (x64 off)", sm.logsumexp, _logsumexp),
    ("sm.softmax (x64 off)", sm.softmax, _softmax),
    ("sm.log_softmax (x64 off)", sm.log_softmax, jax.nn.log_softmax),
]


def _fusions(fn: Callable[[Any], Any], x: Any) -> str:
    hlo = jax.jit(fn).lower(x).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    kinds = re.findall(r"fusion\(.*?kind=(\w+)", entry)
    ynn = entry.count("__ynn_fusion")
    return f"{ynn} ynn, {len(kinds) - ynn} loop"


def _ratio(native: Callable, ours: Callable, x: Any, rounds: int, calls: int) -> float:
    jax.block_until_ready(native(x))
    jax.block_until_ready(ours(x))
    ratios = []
    for _ in range(rounds):
        times = []
        for fn in (native, ours):
            ts = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(x))
                ts.append(time.perf_counter() - start)
            times.append(np.median(ts))
        ratios.append(times[1] / times[0])
    return float(np.median(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x1000", "256x32000"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=7)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, x64 {jax.config.jax_enable_x64}")
    print("| shape | formulation | time / jax.nn | fusions |")
    print("|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        rows, cols = (int(n) for n in shape.split("x"))
        x = jnp.asarray(rng.standard_normal((rows, cols), dtype=np.float32) * 3)
        for name, ours, native in CASES:
            r = _ratio(jax.jit(native), jax.jit(ours), x, args.rounds, args.calls)
            print(f"| {shape} | {name} | {r:.2f} | {_fusions(ours, x)} |", flush=True)


if __name__ == "__main__":
    main()
