"""Where the time of a small torch cross-entropy call under autograd goes.

``run.py`` times ``ce_fwdbwd`` as one figure. This splits it, for stablemath and for
``F.cross_entropy`` on the same data, into three parts measured side by side
(``timing.measure``: interleaved rounds, p50 of each):

- forward: the loss of a tensor that does not require grad;
- graph: the loss of one that does, less the forward (what recording the graph adds);
- backward: ``torch.autograd.grad`` of that loss, less the loss under grad.

    python benchmarks/autograd_overhead.py                 # 1x10 float32
    python benchmarks/autograd_overhead.py --shape 64x1000 --budget 5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import timing


def stages(loss: Callable[[Any, Any], Any], x0: Any, t: Any) -> dict[str, Callable[[], Any]]:
    """The three callables whose differences are the parts (see the module docstring)."""
    import torch

    def forward() -> Any:
        return loss(x0, t)

    def under_grad() -> Any:
        return loss(x0.detach().requires_grad_(True), t)

    def with_backward() -> Any:
        x = x0.detach().requires_grad_(True)
        return torch.autograd.grad(loss(x, t), x)

    return {"forward": forward, "under_grad": under_grad, "with_backward": with_backward}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1x10", help="rows x classes, e.g. 1x10")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed rounds")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import stablemath as sm

    rows, classes = (int(v) for v in args.shape.split("x"))
    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.standard_normal((rows, classes)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, classes, rows))
    fns = {}
    for name, loss in (("stablemath", sm.cross_entropy), ("torch", F.cross_entropy)):
        for stage, fn in stages(loss, x0, t).items():
            fns[name, stage] = fn
    keys = list(fns)
    res = timing.measure(
        {f"{n}/{s}": fns[n, s] for n, s in keys},
        budget_s=args.budget,
        min_rounds=11,
        max_rounds=10_000,
    )
    p50 = {key: res[f"{key[0]}/{key[1]}"].p50 * 1e6 for key in keys}

    def parts(name: str) -> tuple[float, float, float, float]:
        f, g, b = (p50[name, s] for s in ("forward", "under_grad", "with_backward"))
        return f, g - f, b - g, b

    print(f"cross-entropy {args.shape} float32, p50 in µs")
    print()
    print("| | forward | graph | backward | all |")
    print("|---|---|---|---|---|")
    ours, theirs = parts("stablemath"), parts("torch")
    for name, row in (("stablemath", ours), ("torch", theirs)):
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
    print(
        "| difference | "
        + " | ".join(f"{a - b:+.1f}" for a, b in zip(ours, theirs, strict=True))
        + " |"
    )


if __name__ == "__main__":
    main()
