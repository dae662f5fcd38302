"""stablemath against torch on one op, with the input left in the caches or evicted.

``run.py`` times every provider between the others and the copy baseline, a clone of
the input, which leaves the input in the caches for the next call. This times single
calls of ``sm.<op>`` and ``torch.<op>`` along the last axis of a float32 tensor
(logits ~ N(0, 3^2)), interleaved, each after one of:

- ``clone``: a clone of the input, as in ``run.py`` (the input stays in the caches);
- ``evict``: a copy between two 64 MiB buffers (the input is evicted from them);

and prints the medians and their ratio (stablemath / torch).

    python benchmarks/input_in_cache.py --op softmax --shape 256x32000 --before clone
    python benchmarks/input_in_cache.py --op log_softmax --before evict --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

OPS = ("softmax", "log_softmax", "logsumexp")
_EVICT_BYTES = 64 << 20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=OPS, default="softmax")
    parser.add_argument("--shape", default="256x32000", help="rows x classes")
    parser.add_argument("--before", choices=("clone", "evict"), default="clone")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--calls", type=int, default=40, help="timed calls of each")
    args = parser.parse_args(argv)
    import torch

    import stablemath as sm

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    rng = np.random.default_rng(0)
    x = torch.from_numpy((3.0 * rng.standard_normal(shape)).astype(np.float32))
    ours, theirs = getattr(sm, args.op), getattr(torch, args.op)
    calls = {"stablemath": lambda: ours(x, axis=-1), "torch": lambda: theirs(x, -1)}
    src = torch.empty(_EVICT_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def before() -> Any:
        return x.clone() if args.before == "clone" else dst.copy_(src)

    for call in calls.values():  # warm-up: compilation, the allocator, the threads
        for _ in range(3):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(args.calls):
        for name in ("stablemath", "torch") if i % 2 else ("torch", "stablemath"):
            before()
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    ours_s, theirs_s = (statistics.median(times[name]) for name in ("stablemath", "torch"))
    print(
        f"{args.op} {args.shape} float32, after {args.before}, {torch.get_num_threads()} "
        f"threads: stablemath {ours_s * 1e3:.3g} ms, torch {theirs_s * 1e3:.3g} ms, "
        f"ratio {ours_s / theirs_s:.2f} (medians of {args.calls})"
    )


if __name__ == "__main__":
    main()
