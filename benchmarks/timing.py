"""The one timing function: warm-up, calibration, then interleaved rounds.

Each callable must return only once its work is done (the providers make sure of it:
``block_until_ready``, ``compute()``, ``torch.cuda.synchronize``). A *sample* is the mean
of ``inner`` back-to-back calls, with ``inner`` chosen so that one sample lasts at least
``min_sample_s`` (so microsecond calls are not lost in the clock's resolution). Each round
takes one sample of every callable, in an order rotated from round to round, so slow
drifts of the machine (frequency, other load) hit every provider alike; a sample of short
calls starts after one untimed call, so that it does not pay for the caches and branch
predictors the previous provider (Dask above all) left cold. Rounds continue
until ``budget_s`` is spent and at least ``min_rounds`` were taken, at most ``max_rounds``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Timing:
    """Per-call times in seconds."""

    p20: float
    p50: float
    p80: float
    samples: tuple[float, ...]
    inner: int  # calls per sample

    @classmethod
    def from_samples(cls, samples: list[float], inner: int) -> Timing:
        p20, p50, p80 = np.percentile(samples, [20, 50, 80])
        return cls(float(p20), float(p50), float(p80), tuple(samples), inner)


def _calibrate(fn: Callable[[], Any], min_sample_s: float) -> int:
    """Warm up (a first call compiles under jit) and choose the calls per sample."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(100_000, math.ceil(min_sample_s / max(once, 1e-9))))


def measure(
    fns: dict[str, Callable[[], Any]],
    *,
    budget_s: float,
    min_rounds: int,
    max_rounds: int,
    min_sample_s: float = 1e-3,
) -> dict[str, Timing]:
    """Time every callable of ``fns`` side by side; see the module docstring."""
    names = list(fns)
    inner = {name: _calibrate(fns[name], min_sample_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        for r in range(max_rounds):
            if r >= min_rounds and clock() - start >= budget_s:
                break
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                fn, n = fns[name], inner[name]
                if n > 1:
                    fn()  # the previous provider left the caches cold: not this call's cost
                t0 = clock()
                for _ in range(n):
                    fn()
                samples[name].append((clock() - t0) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing.from_samples(samples[name], inner[name]) for name in names}
