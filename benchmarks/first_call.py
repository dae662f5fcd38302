"""How long the first call of each op takes in a new process: right after an install
(Numba's disk cache empty, the kernels compile) and in any later process (they load
from the cache the first process filled), and how much that cache holds after each.

    python benchmarks/first_call.py                     # numpy, torch and JAX
    python benchmarks/first_call.py --libs jax --dtype bfloat16

Each library runs in two fresh processes, one after the other, that share an empty
``NUMBA_CACHE_DIR``. A process times, in turn, the first call of each op on a
512x1000 array and then on a 1x10 one (the fast paths for small arrays are other
compiled functions), and the gradient of the cross-entropy where the library has one.
The second process should load everything and write nothing: its cache size is the
first's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import stablemath as sm

lib, dtype = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x0 = rng.standard_normal((512, 1000)).astype(np.float32)
t0 = rng.integers(0, 1000, 512)
if lib == "numpy":
    arr, labels, ready, grad = (lambda a: a.astype(dtype)), (lambda t: t), (lambda r: r), None
elif lib == "torch":
    import torch
    arr = lambda a: torch.from_numpy(a).to(getattr(torch, dtype))
    labels, ready = torch.from_numpy, (lambda r: r)
    def grad(x, t):
        x = x.clone().requires_grad_(True)
        sm.cross_entropy(x, t).backward()
        return x.grad
else:
    import jax, jax.numpy as jnp
    arr = lambda a: jnp.asarray(a, dtype)
    labels, ready = jnp.asarray, jax.block_until_ready
    grad = jax.grad(sm.cross_entropy)
times = {}
for rows, n in ((512, 1000), (1, 10)):
    x, t = arr(x0[:rows, :n]), labels(t0[:rows] % n)
    calls = {
        "softmax": lambda: sm.softmax(x),
        "log_softmax": lambda: sm.log_softmax(x),
        "logsumexp": lambda: sm.logsumexp(x),
        "cross_entropy": lambda: sm.cross_entropy(x, t),
    }
    if grad is not None:
        calls["cross_entropy gradient"] = lambda: grad(x, t)
    for op, call in calls.items():
        start = time.perf_counter()
        ready(call())
        times[f"{op} {rows}x{n}"] = time.perf_counter() - start
print(json.dumps(times))
"""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _process(lib: str, dtype: str, cache: Path) -> dict[str, float]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, lib, dtype],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{lib}: the child process failed\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", default="numpy,torch,jax", help="comma-separated")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    print(f"first call in a new process, {args.dtype}, seconds")
    print()
    print("| library | call | after an install | a later process |")
    print("|---|---|---|---|")
    sizes = []
    for lib in [name.strip() for name in args.libs.split(",") if name.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp)
            first = _process(lib, args.dtype, cache)
            size_first = _size(cache)
            later = _process(lib, args.dtype, cache)
            sizes.append((lib, size_first, _size(cache)))
        for call in first:
            print(f"| {lib} | {call} | {first[call]:.2f} | {later[call]:.2f} |")
        print(f"| {lib} | all | {sum(first.values()):.1f} | {sum(later.values()):.1f} |")
    print()
    print("| library | cache after the first process | after the second |")
    print("|---|---|---|")
    for lib, a, b in sizes:
        print(f"| {lib} | {a / 1e6:.1f} MB | {b / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
