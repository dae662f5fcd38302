"""References computed with mpmath at 50 digits, never with the code under test."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np

mp.mp.dps = 50
INF = math.inf
NAN = math.nan


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


def np_cross_entropy(
    logits: np.ndarray,
    target: np.ndarray,
    *,
    axis: int = -1,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    where: np.ndarray | None = None,
) -> np.ndarray:
    """PyTorch's definitions written out in float64 NumPy, for ordinary (finite)
    inputs; checked against torch.nn.functional.cross_entropy in test_losses."""
    x = np.moveaxis(np.asarray(logits, dtype=np.float64), axis, -1)
    c = x.shape[-1]
    m = x.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]
    logp = x - lse[..., None]
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    if np.issubdtype(np.asarray(target).dtype, np.floating):
        q = np.moveaxis(np.asarray(target, dtype=np.float64), axis, -1)
        q = q * (1 - label_smoothing) + label_smoothing / c
        loss = -(q * w * logp).sum(axis=-1)
        kept = np.ones(loss.shape, bool) if where is None else np.broadcast_to(where, loss.shape)
        denom = kept.sum()
    else:
        t = np.asarray(target)
        kept = t != ignore_index
        if where is not None:
            kept = kept & np.broadcast_to(where, t.shape)
        safe = np.where(kept, t, 0)
        logp_t = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        w_t = np.where(kept, w[safe], 0.0)
        loss = -(1 - label_smoothing) * w_t * logp_t
        if label_smoothing:
            loss = loss - label_smoothing / c * (w * logp).sum(axis=-1)
        denom = w_t.sum()
    loss = loss + z_loss * lse**2
    loss = np.where(kept, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return np.asarray(loss.sum())
    return np.asarray(loss.sum() / denom if denom else 0.0)


# SPEC §3.3, one row per edge: (row, logsumexp, softmax, log_softmax), the edge values
# worked out by hand (the finite row by mpmath); shared by the tests of every path
EDGE_ROWS = {
    "finite": (
        [1.0, 2.0, 3.0],
        float(logsumexp(np.array([1.0, 2.0, 3.0]))),
        softmax(np.array([1.0, 2.0, 3.0])),
        log_softmax(np.array([1.0, 2.0, 3.0])),
    ),
    "some_neg_inf": (
        [0.0, -INF, 0.0],
        math.log(2.0),
        [0.5, 0.0, 0.5],
        [-math.log(2.0), -INF, -math.log(2.0)],
    ),
    "all_neg_inf": ([-INF, -INF, -INF], -INF, [0.0, 0.0, 0.0], [-INF, -INF, -INF]),
    "k_pos_inf": (
        [INF, 1.0, INF, -INF],
        INF,
        [0.5, 0.0, 0.5, 0.0],
        [-math.log(2.0), -INF, -math.log(2.0), -INF],
    ),
    "one_pos_inf": ([INF, 5.0], INF, [1.0, 0.0], [0.0, -INF]),
    "nan": ([1.0, NAN, 3.0], NAN, [NAN, NAN, NAN], [NAN, NAN, NAN]),
    "nan_and_inf": ([INF, NAN], NAN, [NAN, NAN], [NAN, NAN]),
}
