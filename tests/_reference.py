"""References computed with mpmath at 50 digits, never with the code under test."""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 50


def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])


def logsumexp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) of each last-axis row, as float64."""
    out = []
    for row in _rows(x):
        out.append(float(mp.log(mp.fsum(mp.exp(mp.mpf(float(v))) for v in row))))
    return np.array(out).reshape(np.shape(x)[:-1])


def softmax(x: np.ndarray) -> np.ndarray:
    out = []
    for row in _rows(x):
        e = [mp.exp(mp.mpf(float(v))) for v in row]
        z = mp.fsum(e)
        out.append([float(v / z) for v in e])
    return np.array(out).reshape(np.shape(x))


def log_softmax(x: np.ndarray) -> np.ndarray:
    out = []
    for row in _rows(x):
        lse = mp.log(mp.fsum(mp.exp(mp.mpf(float(v))) for v in row))
        out.append([float(mp.mpf(float(v)) - lse) for v in row])
    return np.array(out).reshape(np.shape(x))


def cross_entropy(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-row -log softmax(x)[t]."""
    out = []
    for row, t in zip(_rows(x), np.ravel(target), strict=True):
        lse = mp.log(mp.fsum(mp.exp(mp.mpf(float(v))) for v in row))
        out.append(float(lse - mp.mpf(float(row[int(t)]))))
    return np.array(out)


def ulp_error(got: np.ndarray, ref: np.ndarray, dtype: type) -> float:
    """Largest distance in units of the last place of ``dtype`` at the reference."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    spacing = np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
    return float(np.max(np.abs(got - ref) / spacing))
