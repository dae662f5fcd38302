"""Regenerate tests/data/reference.json: inputs and 50-digit mpmath values of
logsumexp, softmax, log_softmax and the per-row cross-entropy (SPEC §3.5).

    python tests/make_reference.py

The rows: random normal rows at scales 1, 10, 30 and lengths 3, 10, 100; rows where one
term dominates; confident-prediction cross-entropy rows; rows whose probabilities are
subnormal in float32. Each is stored as float64 and as its float32 rounding, with the
reference computed from the stored (rounded) values.
"""

from __future__ import annotations

import json
from pathlib import Path

import mpmath as mp
import numpy as np

mp.mp.dps = 50
OUT = Path(__file__).parent / "data" / "reference.json"


def rows() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(20261124)
    out = []
    for scale in (1.0, 10.0, 30.0):
        for n in (3, 10, 100):
            for _ in range(3):
                out.append((f"normal scale {scale:g} n {n}", rng.standard_normal(n) * scale, 0))
    for gap in (20.0, 40.0, 80.0):
        out.append((f"dominant gap {gap:g}", np.array([0.0, -gap, -gap - 1.0, -2 * gap]), 0))
    out.append(("confident [100, 1, 0]", np.array([100.0, 1.0, 0.0]), 0))
    out.append(("confident [60, 0, -5, 3]", np.array([60.0, 0.0, -5.0, 3.0]), 0))
    out.append(("subnormal float32 probs", np.array([0.0, -95.0, -100.0, -103.0]), 0))
    return out


def reference(x: np.ndarray, t: int) -> dict[str, object]:
    v = [mp.mpf(float(a)) for a in x]
    # m + log1p(sum of the others): 50 digits of the result even when the others add
    # 1e-43 to 1 (a plain log(sum) would keep only 7 of them)
    m = max(v)
    i = v.index(m)
    rest = mp.log1p(mp.fsum(mp.exp(a - m) for j, a in enumerate(v) if j != i))
    lse = m + rest
    return {
        "x": [float(a) for a in x],
        "target": t,
        "logsumexp": float(lse),
        "softmax": [float(mp.exp((a - m) - rest)) for a in v],
        "log_softmax": [float((a - m) - rest) for a in v],
        "cross_entropy": float((m - v[t]) + rest),
    }


def main() -> None:
    data = {"float64": [], "float32": []}
    for name, x, t in rows():
        for dtype in ("float64", "float32"):
            xr = x.astype(dtype).astype(np.float64)
            data[dtype].append({"name": name, **reference(xr, t)})
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(data, indent=0) + "\n")
    print(f"wrote {OUT}: {len(data['float64'])} rows per dtype")


if __name__ == "__main__":
    main()
