"""The Triton kernels (:mod:`stablemath._triton`) against the generic path.

Every kernel is compared, forward and backward (torch autograd), with
:mod:`stablemath._kernels` run on the same values upcast to float64: on random rows
(several shapes, non-power-of-two widths, rows wider than one block, float32, float16
and bfloat16) and on every SPEC §3 edge row, plus ``gradcheck`` in float64 and
``torch.compile(fullgraph=True)``.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: set
``TRITON_INTERPRET=1`` (``nox -s tests_triton`` does). On a CUDA machine without the
variable the same tests run on the GPU.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("triton")
torch = pytest.importorskip("torch")

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "the Triton kernels need TRITON_INTERPRET=1 (interpreter on CPU tensors, as in "
        "`nox -s tests_triton`) or a CUDA device",
        allow_module_level=True,
    )

import array_api_compat.torch as txp  # noqa: E402

import stablemath._triton as st  # noqa: E402
from stablemath import _kernels as generic  # noqa: E402
from stablemath._triton import _ops  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
INF = math.inf
NAN = math.nan
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("float32", "float16", "bfloat16")
# relative tolerance per dtype: float32 arithmetic in the kernels, a few ulp; half
# precision results are rounded once, so one ulp of the dtype apart at most
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-13}


@pytest.fixture(params=[False, True], ids=["one_block", "streamed"])
def stream(request, monkeypatch):
    """Also run every row through the streaming (multi-block) path, with tiny blocks."""
    if request.param:
        monkeypatch.setattr(_ops, "MAX_SINGLE", 4)
        monkeypatch.setattr(_ops, "LOOP_BLOCK", 4)
    return request.param


def tensor(a, dtype=torch.float32):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64).to(DEVICE, dtype)


def randn(shape, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)


def check(got, ref, dtype, *, atol=None, scale=None, what=""):
    """``got`` (in ``dtype``) against the float64 reference: same NaN and inf pattern,
    values within the dtype's tolerance, relative, and absolute for entries near 0:
    relative to the largest finite reference value, or to ``scale`` if larger (for a
    gradient, the upstream gradient's size: ``p * (g - sum(g * p))`` has an absolute
    error of a few ulp of ``g`` where ``p`` is 1)."""
    got = got.detach().double().cpu()
    # the generic path's answer in the output dtype (what the facade returns)
    ref = ref.detach().to(dtype).double().cpu()
    tol = TOL[dtype]
    if atol is None:
        finite = ref[torch.isfinite(ref)]
        atol = tol * float(finite.abs().max()) if finite.numel() else 0.0
        if scale is not None:
            atol = max(atol, tol * float(scale))
        atol = max(atol, 1e-30)
    torch.testing.assert_close(got, ref, rtol=tol, atol=atol, equal_nan=True, msg=what or None)


# ------------------------------------------------------------------------ references


def ref_softmax(x, axes, where=None, temperature=1.0, log=False):
    x = x.double()
    if temperature != 1.0:
        x = x / temperature
    fn = generic.log_softmax if log else generic.softmax
    return fn(x, axes=axes, live=where, compensate=True, xp=txp)


def ref_logsumexp(x, axes, where=None, keepdims=False):
    return generic.logsumexp(
        x.double(),
        axes=axes,
        keepdims=keepdims,
        live=where,
        b=None,
        return_sign=False,
        xp=txp,
    )


def ref_cross_entropy(x, target, axis=-1, weight=None, where=None, **options):
    x = x.double()
    ax = axis % x.ndim
    sample_shape = x.shape[:ax] + x.shape[ax + 1 :]
    mask = None if where is None else torch.broadcast_to(where, sample_shape)
    return generic.cross_entropy(
        x,
        target,
        axis=ax,
        soft=False,
        weight=None if weight is None else weight.double(),
        ignore_index=options.get("ignore_index", -100),
        reduction=options.get("reduction", "mean"),
        label_smoothing=options.get("label_smoothing", 0.0),
        temperature=options.get("temperature", 1.0),
        softcap=options.get("softcap"),
        z_loss=options.get("z_loss", 0.0),
        sample_mask=mask,
        xp=txp,
    )


def value_and_grad(fn, x, g=None, seed=1):
    """``fn(x)`` and the gradient of ``sum(fn(x) * g)`` for a random upstream ``g``."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    if g is None:
        gen = torch.Generator().manual_seed(seed)
        g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, g.to(y.device, y.dtype))
    return y.detach(), gx, g


def ref_value_and_grad(fn, x, g):
    x = x.detach().double().requires_grad_(True)
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, g.to(y.device, y.dtype))
    return y.detach(), gx


# ----------------------------------------------------------------------- edge rows

EDGE_ROWS = {
    "finite": [0.5, -1.0, 2.0, 0.0, 1.5],
    "some_neg_inf": [0.5, -INF, 2.0, -INF, 1.5],
    "one_finite": [-INF, -INF, 3.0, -INF, -INF],
    "all_neg_inf": [-INF] * 5,
    "one_pos_inf": [1.0, INF, 0.0, -INF, 2.0],
    "two_pos_inf": [INF, 1.0, INF, -INF, 2.0],
    "all_pos_inf": [INF] * 5,
    "nan": [1.0, NAN, 0.0, 2.0, -INF],
    "nan_and_pos_inf": [INF, NAN, 0.0, 2.0, 1.0],
    "ties": [2.0, 2.0, -1.0, 2.0, 1.0],
    "dominant": [0.0, -40.0, -INF, -100.0, -80.0],
    "max_last": [-3.0, -2.0, -1.0, 0.0, 30.0],
    "pos_inf_last": [1.0, 2.0, 3.0, 4.0, INF],
    "masked_some": [0.5, 7.0, 2.0, 9.0, 1.5],
    "masked_nan": [0.5, NAN, 2.0, INF, 1.5],
    "fully_masked": [0.5, 7.0, 2.0, 9.0, 1.5],
}
MASKS = {
    "masked_some": [True, False, True, False, True],
    "masked_nan": [True, False, True, False, True],
    "fully_masked": [False] * 5,
}


def edge_batch(dtype):
    names = list(EDGE_ROWS)
    x = tensor([EDGE_ROWS[n] for n in names], dtype)
    mask = torch.tensor([MASKS.get(n, [True] * 5) for n in names], device=DEVICE)
    return names, x, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_edges(dtype, log, stream):
    """SPEC §3.3 rows, forward and backward, against the generic path."""
    names, x, mask = edge_batch(dtype)
    fn = st.log_softmax if log else st.softmax
    y, gx, g = value_and_grad(lambda v: fn(v, where=mask), x)
    ry, rgx = ref_value_and_grad(lambda v: ref_softmax(v, (1,), mask, log=log), x, g)
    assert y.dtype == dtype
    for i, name in enumerate(names):
        check(y[i], ry[i], dtype, what=f"value, row {name}")
        check(gx[i], rgx[i], dtype, scale=g[i].abs().max(), what=f"gradient, row {name}")
    finite_rows = [i for i, n in enumerate(names) if "nan" not in n or n == "masked_nan"]
    assert torch.isfinite(gx[finite_rows]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_logsumexp_edges(dtype, stream):
    names, x, mask = edge_batch(dtype)
    y, gx, g = value_and_grad(lambda v: st.logsumexp(v, where=mask), x)
    ry, rgx = ref_value_and_grad(lambda v: ref_logsumexp(v, (1,), mask), x, g)
    assert y.dtype == dtype
    for i, name in enumerate(names):
        check(y[i], ry[i], dtype, what=f"value, row {name}")
        check(gx[i], rgx[i], dtype, scale=g[i].abs().max(), what=f"gradient, row {name}")
    # the table, spelled out
    row = dict(zip(names, y.double().cpu().tolist(), strict=True))
    assert row["all_neg_inf"] == -INF
    assert row["fully_masked"] == -INF
    assert row["two_pos_inf"] == INF
    assert math.isnan(row["nan_and_pos_inf"])
    assert math.isfinite(row["masked_nan"])
    two = gx[names.index("two_pos_inf")].double().cpu()
    g2 = g[names.index("two_pos_inf")]
    expected = torch.tensor([g2 / 2, 0, g2 / 2, 0, 0]).to(dtype).double()
    torch.testing.assert_close(two, expected)


def test_edge_values_spelled_out():
    """The SPEC table's values themselves, not only agreement with the generic path."""
    x = tensor([[INF, 1.0, INF, -INF], [-INF] * 4, [1.0, -INF, 2.0, NAN]])
    p = st.softmax(x).cpu()
    lp = st.log_softmax(x).cpu()
    torch.testing.assert_close(p[0], torch.tensor([0.5, 0.0, 0.5, 0.0]))
    assert (p[1] == 0).all()
    assert p[2].isnan().all()
    torch.testing.assert_close(lp[0], torch.tensor([-math.log(2), -INF, -math.log(2), -INF]))
    assert (lp[1] == -INF).all()
    assert lp[2].isnan().all()


def test_empty_axis_and_rows():
    x = torch.zeros((3, 0), device=DEVICE)
    assert st.softmax(x).shape == (3, 0)
    assert st.log_softmax(x).shape == (3, 0)
    lse = st.logsumexp(x)
    assert lse.shape == (3,)
    assert (lse == -INF).all()
    assert st.logsumexp(x, keepdims=True).shape == (3, 1)
    y = torch.zeros((0, 4), device=DEVICE)
    assert st.softmax(y).shape == (0, 4)
    assert st.logsumexp(y).shape == (0,)
    t = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    for reduction, shape in [("mean", ()), ("sum", ()), ("none", (0,))]:
        loss = st.cross_entropy(y, t, reduction=reduction)
        assert loss.shape == shape
        assert (loss == 0).all()


# ---------------------------------------------------------------------- random rows

SHAPES = [
    ((4, 7), -1),
    ((3, 1), -1),
    ((5, 33), -1),
    ((2, 3, 17), 1),
    ((2, 3, 17), (0, 2)),
    ((3, 4, 5), None),
    ((6, 100), -1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("func", ["softmax", "log_softmax", "logsumexp"])
def test_random(func, shape, axis, dtype, stream):
    x = randn(shape, dtype, seed=len(shape) + shape[-1])
    axes = tuple(range(x.ndim)) if axis is None else axis
    axes = (axes,) if isinstance(axes, int) else axes
    axes = tuple(sorted(a % x.ndim for a in axes))
    if func == "logsumexp":
        y, gx, g = value_and_grad(lambda v: st.logsumexp(v, axis=axis), x)
        ry, rgx = ref_value_and_grad(lambda v: ref_logsumexp(v, axes), x, g)
    else:
        log = func == "log_softmax"
        fn = st.log_softmax if log else st.softmax
        y, gx, g = value_and_grad(lambda v: fn(v, axis=axis), x)
        ry, rgx = ref_value_and_grad(lambda v: ref_softmax(v, axes, log=log), x, g)
    assert y.shape == ry.shape
    assert y.dtype == gx.dtype == dtype
    check(y, ry, dtype)
    check(gx, rgx, dtype, scale=g.abs().max())


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("temperature", [0.5, 0.7, 3.0])
def test_temperature_and_broadcast_mask(log, temperature, stream):
    x = randn((4, 6, 9), scale=5.0, seed=3)
    gen = torch.Generator().manual_seed(4)
    mask = (torch.rand((1, 6, 9), generator=gen) > 0.3).to(DEVICE)
    mask[0, 2] = False  # a fully masked row
    fn = st.log_softmax if log else st.softmax
    y, gx, g = value_and_grad(lambda v: fn(v, temperature=temperature, where=mask), x)
    ry, rgx = ref_value_and_grad(
        lambda v: ref_softmax(v, (2,), mask, temperature=temperature, log=log), x, g
    )
    # x / temperature is rounded in float32 in the kernel (in float64 in the reference)
    atol = 4e-7 * 5.0 * 5 / temperature
    check(y, ry, torch.float32, atol=atol)
    check(gx, rgx, torch.float32, atol=atol * float(g.abs().max()))
    # logsumexp with a mask along another axis
    lse, gl, g = value_and_grad(lambda v: st.logsumexp(v, axis=1, where=mask), x)
    rlse, rgl = ref_value_and_grad(lambda v: ref_logsumexp(v, (1,), mask), x, g)
    check(lse, rlse, torch.float32)
    check(gl, rgl, torch.float32, scale=g.abs().max())


def test_noncontiguous_input_and_keepdims():
    base = randn((7, 12), seed=5)
    x = base.t()[::2]  # (6, 7), not contiguous
    for axis in (0, 1, -1):
        check(st.softmax(x, axis=axis), ref_softmax(x, (axis % 2,)), torch.float32)
        out = st.logsumexp(x, axis=axis, keepdims=True)
        check(out, ref_logsumexp(x, (axis % 2,), keepdims=True), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_wide_rows(dtype):
    """Rows wider than the largest single block: the streamed path at its real size."""
    x = randn((2, 10_001), dtype, scale=4.0, seed=6)
    x[0, 9_999] = 40.0  # the maximum in the last block
    x[1, 3] = -INF
    for func in ("softmax", "log_softmax"):
        log = func == "log_softmax"
        fn = st.log_softmax if log else st.softmax
        y, gx, g = value_and_grad(fn, x)
        ry, rgx = ref_value_and_grad(lambda v, log=log: ref_softmax(v, (1,), log=log), x, g)
        check(y, ry, dtype)
        check(gx, rgx, dtype, scale=g.abs().max())
    y, gx, g = value_and_grad(st.logsumexp, x)
    ry, rgx = ref_value_and_grad(lambda v: ref_logsumexp(v, (1,)), x, g)
    check(y, ry, dtype)
    check(gx, rgx, dtype, scale=g.abs().max())


def test_half_precision_long_row_of_equal_values():
    """SPEC §3.4: a float16 row of 70 000 equal values, no overflow of the sum."""
    x = torch.full((1, 70_000), 3.0, dtype=torch.float16, device=DEVICE)
    p = st.softmax(x)
    assert p.dtype == torch.float16
    torch.testing.assert_close(
        p.float().cpu(), torch.full((1, 70_000), 1 / 70_000).half().float(), rtol=0, atol=0
    )
    lse = st.logsumexp(x)
    assert abs(float(lse) - (3.0 + math.log(70_000))) < 1e-2  # one float16 ulp at 14


# ------------------------------------------------------------------------ accuracy


def test_seed_cases_and_accuracy():
    """SPEC §3.2 seed rows and the dominant-term cases, in float32, to a few ulp."""
    rows = [
        [1000.0, 2000.0, 3000.0],
        [1000.0, 1.0, -1000.0],
    ]
    for row in rows:
        x = tensor([row])
        check(st.softmax(x), ref_softmax(x, (1,)), torch.float32, atol=1e-38)
        check(st.log_softmax(x), ref_softmax(x, (1,), log=True), torch.float32, atol=0)
        check(st.logsumexp(x), ref_logsumexp(x, (1,)), torch.float32, atol=0)
    x = tensor([[55.8906, -114.5621, 6.3440, -30.2473, -44.1440]])
    for log in (False, True):
        got = st.log_softmax(x) if log else st.softmax(x)
        check(got, ref_softmax(x, (1,), log=log), torch.float32, atol=1e-44)
    # logsumexp([0, -40]) to full relative precision (log1p of the non-maximal terms)
    lse = float(st.logsumexp(tensor([0.0, -40.0])))
    assert abs(lse - math.log1p(math.exp(-40.0))) <= 2e-7 * lse
    # small probabilities keep their relative accuracy (the shift's remainder)
    x = tensor([[0.0, -20.3, -60.7, -87.1]])
    torch.testing.assert_close(
        st.softmax(x).double().cpu(), ref_softmax(x, (1,)).cpu(), rtol=4e-7, atol=0
    )


def test_confident_cross_entropy():
    """SPEC §3.5: [100, 1, 0] with target 0 keeps its tiny loss (not 0)."""
    loss = st.cross_entropy(tensor([[100.0, 1.0, 0.0]]), torch.tensor([0], device=DEVICE))
    if INTERPRET:
        assert float(loss) == pytest.approx(1.387e-43, rel=1e-2, abs=0)
    else:  # compiled Triton kernels may flush float32 subnormals to zero (SPEC §3.5)
        assert 0.0 <= float(loss) <= 1.4e-43


# ------------------------------------------------------------------- cross-entropy

CE_EDGE = [
    # (row, target)
    ([0.5, -1.0, 2.0, 0.0, 1.5], 2),
    ([0.5, -INF, 2.0, -INF, 1.5], 0),
    ([0.5, -INF, 2.0, -INF, 1.5], 1),  # x[t] = -inf
    ([-INF] * 5, 3),
    ([INF, 1.0, INF, -INF, 2.0], 2),  # x[t] = +inf
    ([INF, 1.0, INF, -INF, 2.0], 1),
    ([INF] * 5, 4),
    ([1.0, NAN, 0.0, 2.0, -INF], 0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], -100),  # ignored
    ([1.0, 2.0, 3.0, 4.0, 5.0], 3),  # masked out by `where`
    ([1.0, 2.0, 3.0, 4.0, 5.0], 7),  # out of range: NaN (what tracing gives)
    ([100.0, 1.0, 0.0, -5.0, -INF], 0),
    ([2.0, 2.0, 2.0, -1.0, 0.0], 1),
]
CE_WHERE = [True] * 9 + [False] + [True] * 3
POS_INF_ROWS = [4, 5, 6]


def ce_limit_grad(row, t, weight, label_smoothing):
    """SPEC §3.3: in a row with +inf logits the gradient is the limit,
    ``w_t (1 - e) (softmax - onehot(t)) + (e / C) (sum(w) softmax - w)``."""
    row = np.asarray(row)
    c = row.size
    w = np.ones(c) if weight is None else weight.double().cpu().numpy()
    p = (row == INF) / np.sum(row == INF)
    onehot = np.arange(c) == t
    e = label_smoothing
    return w[t] * (1 - e) * (p - onehot) + (e / c) * (w.sum() * p - w)


CE_OPTIONS = list(
    itertools.product(
        [None, "weight"],  # weight
        [0.0, 0.1],  # label_smoothing
        [0.0, 1e-3],  # z_loss
        [None, 3.0],  # softcap
        [1.0, 0.5],  # temperature
    )
)


# float32 under every option; half precision under half of them
CE_EDGE_CASES = [
    (dtype, *opts)
    for dtype in DTYPES
    for opts in CE_OPTIONS
    if dtype == torch.float32 or (opts[3] is None) != (opts[4] == 1.0)
]


@pytest.mark.parametrize(
    ("dtype", "weight", "label_smoothing", "z_loss", "softcap", "temperature"),
    CE_EDGE_CASES,
    ids=[
        f"{str(d)[6:]}-w{w is not None:d}-ls{ls}-z{z}-cap{c}-T{t}"
        for d, w, ls, z, c, t in CE_EDGE_CASES
    ],
)
def test_cross_entropy_edges(dtype, weight, label_smoothing, z_loss, softcap, temperature, stream):
    """Every CE edge row under every option, per sample, forward and backward."""
    x = tensor([r for r, _ in CE_EDGE], dtype)
    t = torch.tensor([t for _, t in CE_EDGE], device=DEVICE)
    where = torch.tensor(CE_WHERE, device=DEVICE)
    w = None if weight is None else tensor([1.0, 0.5, 2.0, 1.5, 0.25])
    opts = {
        "weight": w,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
        "temperature": temperature,
        "where": where,
        "reduction": "none",
    }
    y, gx, g = value_and_grad(lambda v: st.cross_entropy(v, t, **opts), x)
    ry, rgx = ref_value_and_grad(lambda v: ref_cross_entropy(v, t, **opts), x, g)
    assert y.dtype == dtype
    check(y, ry, dtype, what="loss")
    for i in range(len(CE_EDGE)):
        if softcap is None and i in POS_INF_ROWS:
            # the limit, spelled out (the generic path gives it too)
            row, ti = CE_EDGE[i]
            expected = ce_limit_grad(row, ti, w, label_smoothing) * float(g[i]) / temperature
            check(gx[i], torch.tensor(expected), dtype, scale=g[i].abs(), what=f"limit, row {i}")
        check(gx[i], rgx[i], dtype, scale=g[i].abs(), what=f"gradient, row {i}")
    nan_rows = [i for i, (r, _) in enumerate(CE_EDGE) if any(map(math.isnan, r))]
    keep = [i for i in range(len(CE_EDGE)) if i not in nan_rows]
    assert torch.isfinite(gx[keep]).all()
    assert (gx[8] == 0).all()
    assert (gx[9] == 0).all()
    assert y[8] == 0
    assert y[9] == 0
    assert torch.isnan(y[10])


CE_PRODUCT = list(
    itertools.product(
        [None, "weight"],
        [-100, 1],  # ignore_index: the default, or a valid class
        [0.0, 0.2],
        ["mean", "sum", "none"],
        [0.0, 1e-2],
        [None, 4.0],
        [None, "where"],
    )
)


@pytest.mark.parametrize(
    ("weight", "ignore_index", "label_smoothing", "reduction", "z_loss", "softcap", "where"),
    CE_PRODUCT,
    ids=["-".join(str(v) for v in p) for p in CE_PRODUCT],
)
def test_cross_entropy_options(
    weight, ignore_index, label_smoothing, reduction, z_loss, softcap, where, monkeypatch
):
    """The options product on random logits (class axis 1 of a 3-d batch), streamed
    in two blocks (the CE kernel has one code path for any number of blocks)."""
    monkeypatch.setattr(_ops, "LOOP_BLOCK", 4)
    x = randn((3, 7, 4), scale=4.0, seed=7)
    gen = torch.Generator().manual_seed(8)
    t = torch.randint(0, 7, (3, 4), generator=gen)
    t[0, 1] = -100
    t[2, 3] = 1
    t = t.to(DEVICE)
    w = None if weight is None else tensor(np.linspace(0.5, 2.0, 7))
    mask = None
    if where is not None:
        mask = torch.tensor([True, False, True, True], device=DEVICE)  # broadcast (4,)
    opts = {
        "axis": 1,
        "weight": w,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "softcap": softcap,
        "where": mask,
    }
    y, gx, g = value_and_grad(lambda v: st.cross_entropy(v, t, **opts), x)
    ry, rgx = ref_value_and_grad(lambda v: ref_cross_entropy(v, t, **opts), x, g)
    assert y.shape == ry.shape
    check(y, ry, torch.float32, what="loss")
    check(gx, rgx, torch.float32, scale=g.abs().max(), what="gradient")


def test_cross_entropy_all_ignored_mean_is_zero():
    x = randn((3, 5))
    t = torch.full((3,), -100, device=DEVICE)
    y, gx, _ = value_and_grad(lambda v: st.cross_entropy(v, t), x, torch.tensor(1.0))
    assert float(y) == 0.0
    assert (gx == 0).all()


def test_cross_entropy_zero_weight_class_is_not_nan():
    """A class of weight 0 adds 0 where its -log p is +inf (not 0 * inf = NaN):
    SPEC §3.1, no NaN from NaN-free input."""
    x = tensor([[1.0, -INF, 3.0, 0.5], [1.0, 2.0, 0.0, 0.5]])
    t = torch.tensor([1, 0], device=DEVICE)
    w = tensor([1.0, 0.0, 2.0, 1.0])
    for ls in (0.0, 0.1):
        y, gx, _ = value_and_grad(
            lambda v, ls=ls: st.cross_entropy(
                v, t, weight=w, label_smoothing=ls, reduction="none"
            ),
            x,
        )
        assert torch.isfinite(y).all()
        assert torch.isfinite(gx).all()
        # both rows agree with the generic path
        check(
            y,
            ref_cross_entropy(x, t, weight=w, label_smoothing=ls, reduction="none"),
            torch.float32,
        )
    # label_smoothing = 1: the target term is gone, the rest finite
    y = st.cross_entropy(x[1:], t[1:], label_smoothing=1.0, reduction="none")
    check(y, ref_cross_entropy(x[1:], t[1:], label_smoothing=1.0, reduction="none"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cross_entropy_vocabulary_width(dtype):
    """A 128 256-wide row (Llama 3's vocabulary) through the streamed kernel."""
    x = randn((2, 128_256), dtype, scale=2.0, seed=9)
    t = torch.tensor([5, 128_000], device=DEVICE)
    opts = {"label_smoothing": 0.1, "z_loss": 1e-4, "reduction": "mean"}
    y, gx, g = value_and_grad(lambda v: st.cross_entropy(v, t, **opts), x, torch.tensor(1.0))
    ry, rgx = ref_value_and_grad(lambda v: ref_cross_entropy(v, t, **opts), x, g)
    check(y, ry, dtype)
    check(gx, rgx, dtype)
    lse = st.logsumexp(x)
    check(lse, ref_logsumexp(x, (1,)), dtype)


def test_cross_entropy_retain_graph_and_no_grad():
    """The backward scales its saved gradient in place only when the graph is freed:
    a second backward through a retained graph gets the same gradient."""
    x = randn((4, 9), seed=10).requires_grad_(True)
    t = torch.tensor([0, 3, 8, 2], device=DEVICE)
    loss = st.cross_entropy(x, t, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)
    with torch.no_grad():
        torch.testing.assert_close(st.cross_entropy(x, t, label_smoothing=0.1), loss.detach())


def test_inputs_are_not_modified():
    x = randn((3, 6), seed=11)
    x[0, 2] = INF
    x[1, :] = -INF
    before = x.clone()
    mask = torch.ones((3, 6), dtype=torch.bool, device=DEVICE)
    for fn in (st.softmax, st.log_softmax, st.logsumexp):
        value_and_grad(lambda v, fn=fn: fn(v, where=mask), x)
    t = torch.tensor([2, 0, 5], device=DEVICE)
    xr = x.clone().requires_grad_(True)
    st.cross_entropy(xr, t, reduction="sum").backward()
    torch.testing.assert_close(x, before, equal_nan=True)
    torch.testing.assert_close(xr.detach(), before, equal_nan=True)


# -------------------------------------------------------------- autograd, compile


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn((3, 5), generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    mask = torch.tensor([[True, False, True, True, True]] * 3, device=DEVICE)
    t = torch.tensor([0, 4, 1], device=DEVICE)
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0], dtype=torch.float64, device=DEVICE)
    sample_mask = torch.tensor([True, True, False], device=DEVICE)
    funcs = [
        lambda v: st.softmax(v, temperature=0.7, where=mask),
        lambda v: st.log_softmax(v, axis=0, temperature=1.3),
        # (the -inf outputs at masked entries have no finite differences)
        lambda v: st.log_softmax(v, where=mask)[mask],
        lambda v: st.logsumexp(v, axis=None),
        lambda v: st.logsumexp(v, where=mask),
        lambda v: st.cross_entropy(
            v,
            t,
            weight=w,
            label_smoothing=0.2,
            z_loss=0.01,
            softcap=2.0,
            temperature=0.8,
            reduction="none",
        ),
        lambda v: st.cross_entropy(v, t, weight=w, where=sample_mask, reduction="mean"),
    ]
    for f in funcs:
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_second_order_gradients_raise():
    x = randn((2, 4)).requires_grad_(True)
    (gx,) = torch.autograd.grad(st.softmax(x)[:, 0].sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second-order"):
        gx.sum().backward()


def test_torch_compile_fullgraph():
    x = randn((4, 7), seed=13)
    t = torch.tensor([0, 6, 2, 3], device=DEVICE)
    mask = (randn((4, 7), seed=14) > -2.0).to(DEVICE)

    def f(v):
        return (
            st.softmax(v, temperature=0.5, where=mask).square().sum()
            + st.log_softmax(v, axis=0).square().mean()
            + st.logsumexp(v, axis=(0, 1), where=mask)
            + st.cross_entropy(v, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
        )

    torch._dynamo.reset()
    # aot_eager: dynamo + AOTAutograd over the custom ops (importing Inductor emits a
    # DeprecationWarning of torch's own, an error under this suite's filterwarnings)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, gx, g = value_and_grad(compiled, x, torch.tensor(1.0))
    ry, rgx, _ = value_and_grad(f, x, g)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(gx, rgx)


# -------------------------------------------------------------- dispatch helpers


def test_available_and_supports(monkeypatch):
    assert st.available()
    monkeypatch.setenv("STABLEMATH_DISABLE_TRITON", "1")
    assert not st.available()
    assert not st.supports(randn((2, 3)))
    monkeypatch.delenv("STABLEMATH_DISABLE_TRITON")
    assert st.available()
    for dtype in DTYPES:
        assert st.supports(randn((2, 3), dtype))
    assert not st.supports(randn((2, 3), torch.float64))
    assert not st.supports(torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert not st.supports(np.zeros(3))
    assert not st.supports([1.0, 2.0])


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_import_is_lazy():
    """`import stablemath._triton` imports neither torch nor Triton."""
    code = """
        import sys
        import numpy as np
        import stablemath, stablemath._triton as st
        assert not st.supports(np.zeros(3))
        assert "torch" not in sys.modules, "torch imported"
        assert "triton" not in sys.modules, "triton imported"
    """
    proc = _run_python(code, dict(os.environ))
    assert proc.returncode == 0, proc.stderr


def test_kernels_compile_for_cuda():
    """Ahead-of-time compile every kernel for sm_90 without a GPU: checks the compiled
    (libdevice) branches, which the interpreter never runs."""
    pytest.importorskip("triton.backends.nvidia")
    code = """
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from stablemath._triton import _kernels as K
        assert not K.INTERPRET
        target = GPUTarget("cuda", 90, 32)

        def build(kernel, types, consts):
            sig = {n: "constexpr" if n in consts else types[n] for n in kernel.arg_names}
            src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
            triton.compile(src, target=target, options={"enable_fp_fusion": False})

        for dt, acc, cdt in [("fp32", "fp32", tl.float32), ("bf16", "fp32", tl.float32),
                             ("fp16", "fp32", tl.float32), ("fp64", "fp64", tl.float64)]:
            for single, mask, log in [(True, True, False), (False, False, True)]:
                block = 1024 if single else 4096
                c = dict(HAS_MASK=mask, BLOCK=block, SINGLE=single, CDT=cdt, INTERP=False)
                build(K.softmax_fwd_kernel, dict(x_ptr="*" + dt, mask_ptr="*u8",
                      y_ptr="*" + dt, lse_ptr="*" + acc, C="i32", T="fp64"), dict(c, LOG=log))
                build(K.softmax_bwd_kernel, dict(y_ptr="*" + dt, g_ptr="*" + dt,
                      mask_ptr="*u8", lse_ptr="*" + acc, dx_ptr="*" + dt, C="i32", T="fp64"),
                      dict(c, LOG=log))
                build(K.logsumexp_fwd_kernel, dict(x_ptr="*" + dt, mask_ptr="*u8",
                      out_ptr="*" + dt, m_ptr="*" + acc, total_ptr="*" + acc, C="i32"), c)
                del c["SINGLE"]
                build(K.logsumexp_bwd_kernel, dict(x_ptr="*" + dt, mask_ptr="*u8",
                      g_ptr="*" + acc, m_ptr="*" + acc, total_ptr="*" + acc,
                      dx_ptr="*" + dt, C="i32"), c)
            for opts in [(True, True, True, True, True, True), (False,) * 6]:
                names = ("HAS_W", "HAS_SMASK", "HAS_CAP", "SMOOTH", "ZLOSS", "GRAD")
                build(K.ce_fwd_kernel, dict(x_ptr="*" + dt, t_ptr="*i64", w_ptr="*" + acc,
                      smask_ptr="*u8", loss_ptr="*" + acc, dw_ptr="*" + acc, g_ptr="*" + dt,
                      C="i32", ignore_index="i32", T="fp64", CAP="fp64", KEEP="fp64",
                      LS_C="fp64", ZL="fp64"),
                      dict(zip(names, opts), BLOCK=4096, CDT=cdt, INTERP=False))
            build(K.scale_rows_kernel, dict(g_ptr="*" + dt, scale_ptr="*" + acc,
                  out_ptr="*" + dt, C="i32"), dict(BLOCK=4096))
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = _run_python(code, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
