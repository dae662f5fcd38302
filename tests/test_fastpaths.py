"""Which path runs: the NumPy and torch-CPU fast paths (stablemath/_fastpaths.py) take
float32 inputs with finite slice maxima, hand every other input to the generic kernels,
and are turned off by STABLEMATH_DISABLE_FASTPATHS=1. (Their values are held to the
SPEC by the whole suite, which the nox sessions run with and without them.)"""

from __future__ import annotations

import math
import os
import sys

import _reference as ref
import numpy as np
import pytest
from conftest import backends_named, spy_kernels

import stablemath as sm
from stablemath import _fastpaths, _kernels

FAST = backends_named("numpy", "torch")
pytestmark = pytest.mark.skipif(not FAST, reason="numpy/torch not selected")
FUNCS = ["softmax", "log_softmax", "logsumexp"]


def _fast_backend(backend):
    if backend.name == "torch":
        if str(backend.asarray([0.0]).device) != "cpu":
            pytest.skip("the torch fast path is for CPU tensors")
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("under TRITON_INTERPRET=1 the Triton kernels take CPU tensors")
    return backend


@pytest.fixture(params=FAST, ids=[b.name for b in FAST])
def fb(request):
    return _fast_backend(request.param)


@pytest.fixture(params=backends_named("torch"), ids=lambda b: b.name)
def tb(request):
    """The torch backend alone (autograd), on the terms of ``fb``."""
    return _fast_backend(request.param)


@pytest.fixture
def generic_calls(monkeypatch):
    """Count the calls of the generic kernels."""
    return spy_kernels(monkeypatch, FUNCS)


def _call(fb, func, row, dtype="float32", **kw):
    return getattr(sm, func)(fb.asarray(np.array(row), dtype=dtype), **kw)


@pytest.mark.parametrize("func", FUNCS)
def test_float32_takes_the_fast_path(fb, func, generic_calls, monkeypatch):
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    _call(fb, func, [[1.0, 2.0, -math.inf], [0.0, 0.0, 3.0]])
    _call(fb, func, [[1.0, 2.0, -math.inf], [0.0, 0.0, 3.0]], axis=0)
    assert generic_calls == []


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize(
    ("row", "dtype", "kw"),
    [
        ([[1.0, math.inf, 0.0]], "float32", {}),  # +inf maximum
        ([[-math.inf, -math.inf]], "float32", {}),  # all -inf
        ([[1.0, math.nan]], "float32", {}),  # NaN
        ([[1.0, 2.0]], "float64", {}),  # float64: no exact shift in a wider dtype
        ([[1.0, 2.0]], "float32", {"axis": (0, 1)}),  # several axes
        ([[1.0, 2.0]], "float32", {"axis": None}),
    ],
)
def test_other_inputs_take_the_generic_path(fb, func, row, dtype, kw, generic_calls, monkeypatch):
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    _call(fb, func, row, dtype, **kw)
    assert generic_calls == [func]


def test_options_take_the_generic_path(fb, generic_calls, monkeypatch):
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    x = fb.asarray(np.array([[1.0, 2.0, 3.0]]), dtype="float32")
    mask = fb.asarray(np.array([[True, False, True]]))
    sm.softmax(x, where=mask)
    sm.log_softmax(x, dtype=fb.dtype("float64"))
    sm.logsumexp(x, b=x)
    sm.logsumexp(x, return_sign=True)
    assert generic_calls == ["softmax", "log_softmax", "logsumexp", "logsumexp"]


@pytest.mark.parametrize("func", FUNCS)
def test_switch_turns_the_fast_paths_off(fb, func, generic_calls, monkeypatch):
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    _call(fb, func, [[1.0, 2.0, 3.0]])
    assert generic_calls == [func]


def test_switch_turns_the_cross_entropy_fast_paths_off(fb, generic_ce_calls, monkeypatch):
    """The switch holds for the small tensors that the fast path asks about first."""
    monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
    _ce(fb, [[1.0, 2.0, 3.0]], [0])
    assert generic_ce_calls == ["cross_entropy"]


def test_tensors_off_the_cpu_never_reach_the_kernels(monkeypatch):
    """A small tensor on another device than the CPU (``meta``: a shape, no memory;
    its ``data_ptr`` is 0) goes to the generic path, which gives a result of the same
    device and shape; no kernel is asked for."""
    if not backends_named("torch"):
        pytest.skip("torch not selected")
    import torch

    from stablemath import _cpu_team

    def refuse(kernel, element):
        raise AssertionError(f"{kernel.__name__} asked for a tensor off the CPU")

    monkeypatch.setattr(_cpu_team, "at_address", refuse)
    monkeypatch.setattr(_fastpaths, "_AT", {})
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    x = torch.zeros(2, 10, device="meta")
    t = torch.zeros(2, dtype=torch.int64, device="meta")
    for res, shape in [
        (sm.softmax(x), (2, 10)),
        (sm.log_softmax(x), (2, 10)),
        (sm.logsumexp(x, axis=-1), (2,)),
        (sm.cross_entropy(x, t), ()),
        (sm.cross_entropy(x, t, reduction="none"), (2,)),
    ]:
        assert res.device.type == "meta"
        assert tuple(res.shape) == shape


def test_switch_is_read_at_each_call(monkeypatch):
    """The switches are read from the environment as it is at the call (the cheap read
    of stablemath/_lib/_env.py), after every change through os.environ, and
    through os.environ.get where the environment has no dictionary of its own."""
    from stablemath._lib import _env

    name = "STABLEMATH_TEST_SWITCH"
    monkeypatch.delenv(name, raising=False)
    seen = [_env.flag(name)]
    for value in ("1", "0", "", "1"):
        monkeypatch.setenv(name, value)
        seen.append(_env.flag(name))
    os.environ.pop(name)
    seen.append(_env.flag(name))
    assert seen == [False, True, False, False, True, False]
    monkeypatch.setattr(os, "environ", {name: "1"})  # no _data: os.environ.get
    assert _env.flag(name) and not _env.flag(name, "2")


def test_either_switch_is_read_at_each_call(monkeypatch):
    """The pair of switches the fast paths read at each call (``_env.either``, whose
    closure holds the environment's dictionary): each one alone, both, neither, after
    changes through os.environ made after the closure was."""
    from stablemath._lib import _env

    one, two = "STABLEMATH_TEST_ONE", "STABLEMATH_TEST_TWO"
    for name in (one, two):
        monkeypatch.delenv(name, raising=False)
    either = _env.either(one, two)
    seen = [either()]
    for a, b in [("1", None), (None, "1"), ("1", "1"), ("0", "2"), (None, None)]:
        for name, value in ((one, a), (two, b)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        seen.append(either())
    assert seen == [False, True, True, True, False, False]


@pytest.mark.parametrize("func", FUNCS)
def test_paths_agree(fb, func, monkeypatch):
    """Same values on both paths, to within an ulp of float32 (both are within an ulp
    or two of the exact value, SPEC §3.5), across scales, ties and -inf entries."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 50)) * rng.choice([0.1, 1, 30, 300], (64, 1))).astype(np.float32)
    x[:8, :3] = x[:8, 3:4]  # ties at the maximum
    x[8:16, ::7] = -np.inf
    x[16, :] = 0.0
    x[17, 1:] = -200.0  # one dominant term
    got = {}
    for mode in ("", "1"):
        monkeypatch.setenv(_fastpaths.DISABLE_ENV, mode)
        got[mode] = fb.to_numpy(_call(fb, func, x)).astype(np.float64)
    fast, generic = got[""], got["1"]
    np.testing.assert_array_equal(np.isfinite(fast), np.isfinite(generic))
    finite = np.isfinite(fast)
    spacing = np.spacing(np.abs(generic[finite]).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(fast[finite] - generic[finite]) <= 2 * spacing)
    np.testing.assert_array_equal(fast[~finite], generic[~finite])


@pytest.fixture
def generic_ce_calls(monkeypatch):
    calls = []
    real = _kernels.cross_entropy

    def spy(*args, **kwargs):
        calls.append("cross_entropy")
        return real(*args, **kwargs)

    monkeypatch.setattr(_kernels, "cross_entropy", spy)
    return calls


def _ce(fb, row, target, **kw):
    x = fb.asarray(np.array(row), dtype="float32")
    return sm.cross_entropy(x, fb.asarray(np.array(target)), **kw)


def test_cross_entropy_fast_path(fb, generic_ce_calls, monkeypatch):
    """float32 hard targets with torch's own options take the fast path: the compiled
    kernel (NumPy, torch outside autodiff) or torch's loss in float64."""
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    w = fb.asarray(np.array([1.0, 2.0, 0.5]), dtype="float32")
    rows = [[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]]
    for reduction in ("none", "sum", "mean"):
        _ce(fb, rows, [0, 2], reduction=reduction, weight=w, label_smoothing=0.1)
    _ce(fb, [[[1.0, 2.0], [3.0, 0.0], [0.5, 0.5]]], [[1, 2]], axis=1, ignore_index=2)
    _ce(fb, [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]], [0, -100], reduction="none")
    _ce(fb, rows, [0, 2], temperature=2.0, z_loss=1e-4, weight=w)  # options torch lacks
    x = fb.asarray(np.array(rows), dtype="float32")
    if fb.name == "torch":
        sm.cross_entropy(x.requires_grad_(True), fb.asarray(np.array([0, 2])), weight=w)
        sm.cross_entropy(x, fb.asarray(np.array([0, 2])), temperature=0.5, z_loss=1e-3)
    assert generic_ce_calls == []


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 4.0])
def test_cross_entropy_temperature_and_z_loss_on_the_kernel(
    fb, reduction, temperature, generic_ce_calls, monkeypatch
):
    """A temperature and the z-loss run on the compiled kernel (NumPy, torch outside
    autograd), with class weights, smoothing and ignored samples: the loss is the
    float64 definition (tests/_reference.py) of ``x / T`` rounded once to float32."""
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((60, 11)) * 5).astype(np.float32)
    t = rng.integers(0, 11, 60)
    t[::6] = -100
    w = rng.uniform(0.5, 2.0, 11).astype(np.float32)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-2}
    got = sm.cross_entropy(
        fb.asarray(x), fb.asarray(t), weight=fb.asarray(w), temperature=temperature, **kw
    )
    want = ref.np_cross_entropy(x.astype(np.float64) / temperature, t, weight=w, **kw)
    got = np.asarray(got.numpy() if fb.name == "torch" else got, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=2 * 2.0**-24, atol=0)
    assert generic_ce_calls == []


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cross_entropy_softcap_on_the_kernel(fb, reduction, generic_ce_calls, monkeypatch):
    """A soft-cap runs on the compiled kernel (NumPy, torch outside autograd), with
    the other options, and takes rows the uncapped kernel refuses (+-inf logits, an
    all -inf row: the cap makes them +-softcap): the loss is the float64 definition
    (tests/_reference.py) of ``softcap tanh(x / softcap) / T`` rounded once."""
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((60, 11)) * 40).astype(np.float32)
    x[1, 3], x[2, 0], x[3] = np.inf, -np.inf, -np.inf
    t = rng.integers(0, 11, 60)
    t[::6] = -100
    t[2] = 0  # the target at -inf
    w = rng.uniform(0.5, 2.0, 11).astype(np.float32)
    kw = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3}
    got = sm.cross_entropy(
        fb.asarray(x), fb.asarray(t), weight=fb.asarray(w), temperature=0.8, softcap=25.0, **kw
    )
    capped = 25.0 * np.tanh(x.astype(np.float64) / 25.0)
    want = ref.np_cross_entropy(capped / 0.8, t, weight=w, **kw)
    got = np.asarray(got.numpy() if fb.name == "torch" else got, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=2 * 2.0**-24, atol=0)
    assert generic_ce_calls == []


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    "mask", [[[True, False, True]], [[True, True, False], [False, True, True]]]
)
def test_cross_entropy_where_on_the_fast_path(fb, reduction, mask, generic_ce_calls, monkeypatch):
    """A per-sample mask takes the fast path: its False samples count exactly as
    ignored ones (SPEC), as the generic kernels give them: with class weights and
    smoothing, a broadcast mask, ``ignore_index`` a class, an out-of-range target
    under the mask (not checked, as there), all samples masked (a mean of 0); under
    autograd (torch) the gradient too."""
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 4)) * 3
    w = fb.asarray(np.array([1.0, 2.0, 0.5, 1.5]), dtype="float32")
    cases = [
        ([[0, 3, 1], [2, 2, 0]], {}),
        ([[0, 3, 1], [2, 2, 0]], {"weight": w, "label_smoothing": 0.2}),
        ([[0, 3, 1], [2, 2, 0]], {"ignore_index": 2}),
    ]
    out_of_range = np.array(cases[0][0])
    masked = np.argwhere(~np.broadcast_to(np.array(mask), (2, 3)))[0]
    out_of_range[tuple(masked)] = 9
    cases.append((out_of_range.tolist(), {}))
    where = fb.asarray(np.array(mask))
    for target, kw in cases:
        xa = fb.asarray(x, dtype="float32")
        t = fb.asarray(np.array(target))
        if fb.name == "torch":
            xa.requires_grad_(True)

        def run(xa=xa, t=t, kw=kw):
            loss = sm.cross_entropy(xa, t, where=where, reduction=reduction, **kw)
            grad = None
            if fb.name == "torch":
                (grad,) = fb.module.autograd.grad(loss.sum(), xa)
            return loss, grad

        loss, grad = run()
        assert generic_ce_calls == []
        monkeypatch.setenv(_fastpaths.DISABLE_ENV, "1")
        want, want_grad = run()
        monkeypatch.delenv(_fastpaths.DISABLE_ENV)
        assert generic_ce_calls == ["cross_entropy"]
        generic_ce_calls.clear()
        np.testing.assert_allclose(fb.to_numpy(loss), fb.to_numpy(want), rtol=3e-7, atol=1e-30)
        if grad is not None:
            np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), rtol=1e-6, atol=1e-8)
    nothing = fb.asarray(np.zeros((2, 3), dtype=bool))
    xa = fb.asarray(x, dtype="float32")
    t = fb.asarray(np.array(cases[0][0]))
    # (a mean over no sample: the generic kernels' 0, with a zero gradient)
    assert float(fb.to_numpy(sm.cross_entropy(xa, t, where=nothing))) == 0.0


@pytest.mark.parametrize("bad", [3, -1, 7, -101])
@pytest.mark.parametrize("route", ["plain", "none", "weight", "autograd", "torch.func"])
def test_cross_entropy_fast_path_checks_targets(fb, bad, route, generic_ce_calls, monkeypatch):
    """The fast paths read the targets before the kernel indexes the logits with them
    (the facade leaves that to them): a target outside [0, C) that is not ignore_index
    goes to the generic path, whose check raises the ValueError of SPEC §4, whatever
    the route: the compiled kernel, with or without autograd, or torch's float64 loss
    (under ``torch.func.grad``)."""
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    x = fb.asarray(np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]), dtype="float32")
    kw = {}
    if route == "none":
        kw["reduction"] = "none"
    if route == "weight":
        kw["weight"] = fb.asarray(np.array([1.0, 2.0, 0.5]), dtype="float32")
    if route in ("autograd", "torch.func") and fb.name != "torch":
        pytest.skip("autograd is torch's")

    def loss(t, **more):
        if route == "torch.func":
            f = lambda v: sm.cross_entropy(v, t, **kw, **more)  # noqa: E731
            return fb.module.func.grad(f)(x)
        v = x.requires_grad_(True) if route == "autograd" else x
        return sm.cross_entropy(v, t, **kw, **more)

    for dtype in ("int64", "int32"):
        t = fb.asarray(np.array([0, bad]), dtype=dtype)
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            loss(t)
        # the same values are fine where the bad one is the ignored class
        assert np.all(np.isfinite(fb.to_numpy(loss(t, ignore_index=bad))))
    if route != "torch.func":  # inside a torch.func transform the generic kernel runs
        assert generic_ce_calls == []  # it never ran: its check raised


@pytest.mark.parametrize("func", [*FUNCS, "cross_entropy"])
def test_torch_func_transforms_on_fast_path_dtypes(tb, func, monkeypatch):
    """torch.func.grad, vjp and vmap of float32 CPU tensors, and a float32 tensor from
    outside used inside a transform: NumPy cannot read the memory of any tensor there,
    so the compiled kernels must not run (cross_entropy raised "Cannot access data
    pointer of Tensor that doesn't have storage" under torch.func.grad). The results
    are those of torch.autograd on the same inputs."""
    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=gen)
    t = torch.tensor([4, 0, 2])
    w = torch.randn(5, generator=gen)  # weights the function's output with

    def f(v):
        if func == "cross_entropy":
            return sm.cross_entropy(v * w, t, reduction="sum")
        out = getattr(sm, func)(v * w)
        return (out * torch.arange(out.numel()).reshape(out.shape)).sum()

    xa = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(f(xa), xa)
    torch.testing.assert_close(torch.func.grad(f)(x), want, rtol=1e-6, atol=1e-7)
    _, vjp = torch.func.vjp(f, x)
    torch.testing.assert_close(vjp(torch.tensor(1.0))[0], want, rtol=1e-6, atol=1e-7)

    def g(scale):  # x itself is not transformed, only used inside the transform
        if func == "cross_entropy":
            direct = sm.cross_entropy(x, t, reduction="sum")
        else:
            direct = (getattr(sm, func)(x) ** 2).sum()
        return direct * scale + f(x * scale)

    wa = torch.tensor(1.5, requires_grad=True)
    (want_s,) = torch.autograd.grad(g(wa), wa)
    torch.testing.assert_close(torch.func.grad(g)(torch.tensor(1.5)), want_s, rtol=1e-5, atol=1e-6)
    scales = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(torch.func.vmap(g)(scales), torch.stack([g(s) for s in scales]))


@pytest.mark.parametrize(
    ("row", "target", "kw"),
    [
        ([[1.0, -math.inf, 0.0]], [1], {}),  # -inf at the target: +inf
        ([[math.inf, 1.0, 0.0]], [0], {}),  # +inf logit
        ([[1.0, 2.0, 0.0]], [-100], {}),  # all ignored: 0, not torch's NaN
        ([[1.0, math.nan, 0.0]], [0], {"softcap": 30.0}),  # NaN: NaN, capped or not
        ([[1.0, 2.0, 0.0]], [0], {"temperature": 1e-300, "z_loss": 1e-4}),  # z lse**2 = inf
        ([[1.0, 2.0, 0.0]], [2], {"temperature": 1e-308}),  # (m - x_t) / T = inf
        ([[1.0, 2.0, 0.0]], [0], {"where": False}),  # all masked: 0 (a mask is fast)
    ],
)
def test_cross_entropy_generic_cases(fb, row, target, kw, generic_ce_calls, monkeypatch):
    """The cases the fast paths hand back, with and without autograd. (A temperature
    of 1e-300 overflows the generic kernel's ``x / T`` as well, which NumPy warns of.)"""
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    if kw.get("where") is False:
        kw = {"where": fb.asarray(np.array([False]))}
    with np.errstate(over="ignore"):
        _ce(fb, row, target, **kw)
    assert generic_ce_calls == ["cross_entropy"]
    if fb.name == "torch":  # torch's float64 loss
        x = fb.asarray(np.array(row), dtype="float32").requires_grad_(True)
        sm.cross_entropy(x, fb.asarray(np.array(target)), **kw)
        assert generic_ce_calls == ["cross_entropy"] * 2


def test_confident_cross_entropy(fb, generic_ce_calls, monkeypatch):
    """A loss below 2**-20 (SPEC §3.5): the compiled kernel forms it to full relative
    precision itself, with autograd too, and for bfloat16 (below its range: 0)."""
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    x = fb.asarray(np.array([[100.0, 1.0, 0.0]]), dtype="float32")
    t = fb.asarray(np.array([0]))
    exact = math.log1p(math.exp(-99) + math.exp(-100))  # 1.383e-43, a float32 subnormal
    assert float(fb.to_numpy(sm.cross_entropy(x, t))) == float(np.float32(exact))
    assert generic_ce_calls == []
    if fb.name == "torch":
        loss = sm.cross_entropy(x.requires_grad_(True), t)
        assert float(loss.detach()) == float(np.float32(exact))
        assert generic_ce_calls == []
        bf16 = fb.module.bfloat16
        loss = sm.cross_entropy(x.detach().to(bf16).requires_grad_(True), t)
        assert loss.dtype == bf16
        assert float(loss.detach()) == float(fb.module.tensor(exact).to(bf16)) == 0.0
        assert generic_ce_calls == []


CE_OPTIONS = [
    {},
    {"reduction": "sum", "label_smoothing": 0.2},
    {"reduction": "none", "ignore_index": 1},
    {"weight": True, "label_smoothing": 0.1, "ignore_index": 2},
    {"weight": True, "reduction": "none"},
    {"temperature": 2.5, "z_loss": 1e-2},
    {"weight": True, "label_smoothing": 0.1, "temperature": 0.7, "z_loss": 1e-3},
    {"weight": True, "reduction": "none", "z_loss": 1e-2, "ignore_index": 3},
    {"softcap": 5.0},
    {"weight": True, "label_smoothing": 0.1, "temperature": 0.7, "z_loss": 1e-3, "softcap": 3.0},
]


def _torch_ce64(x64, t, axis=-1, temperature=1.0, z_loss=0.0, softcap=None, **kw):
    """torch's cross-entropy of ``x64 / temperature`` (float64; soft-capped first,
    ``softcap * tanh(x64 / softcap)``, for a ``softcap``), plus ``z_loss`` times the
    squared logsumexp of each sample that is not ignored; a mean divides by the total
    weight of those samples, as torch's does."""
    torch = sys.modules["torch"]
    x64 = torch.movedim(x64, axis, -1)
    if softcap is not None:
        x64 = softcap * torch.tanh(x64 / softcap)
    x64 = x64 / temperature
    reduction = kw.pop("reduction", "mean")
    per = torch.nn.functional.cross_entropy(x64, t, reduction="none", **kw)
    kept = t != kw.get("ignore_index", -100)
    per = per + torch.where(kept, z_loss * torch.logsumexp(x64, dim=-1) ** 2, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    w = kw.get("weight")
    picked = torch.ones_like(per) if w is None else w[t.clamp(0, x64.shape[-1] - 1)]
    return per.sum() / torch.where(kept, picked, 0.0).sum()


@pytest.mark.parametrize("kw", CE_OPTIONS)
@pytest.mark.parametrize("axis", [-1, 0])
def test_cross_entropy_kernel_gradient(tb, kw, axis, generic_ce_calls, monkeypatch):
    """torch float32 with autograd: loss and gradient from one kernel pass, against
    torch's float64 loss and its autograd gradient, for a random upstream gradient;
    a retained graph gives it a second time (then from torch's float64 ops)."""
    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 7, generator=gen) * 3).requires_grad_(True)
    t = torch.randint(0, 7, (40,), generator=gen)
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(7, generator=gen) + 0.5
    xa = x if axis == -1 else x.T
    loss = sm.cross_entropy(xa, t, axis=axis, **kw)
    assert type(loss.grad_fn).__name__ == "PrecomputedGradBackward"
    up = torch.randn(loss.shape, generator=gen)
    (got,) = torch.autograd.grad(loss, x, up, retain_graph=True)
    (again,) = torch.autograd.grad(loss, x, up)
    x64 = x.detach().double().requires_grad_(True)
    kw64 = {k: v.double() if k == "weight" else v for k, v in kw.items()}
    want = _torch_ce64(x64, t, **kw64)
    (want_grad,) = torch.autograd.grad(want, x64, up.double())
    np.testing.assert_allclose(loss.detach().numpy(), want.detach().numpy(), rtol=2e-7, atol=1e-30)
    np.testing.assert_allclose(got.numpy(), want_grad.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(again.numpy(), want_grad.numpy(), rtol=1e-6, atol=1e-8)
    assert generic_ce_calls == []


@pytest.mark.parametrize("shape", [(1, 10), (300, 200)])
@pytest.mark.parametrize("c_apply", [True, False])
def test_the_gradient_is_attached_with_or_without_torchs_c_apply(
    tb, shape, c_apply, generic_ce_calls, monkeypatch
):
    """The kernel's loss and gradient are attached by torch's C ``apply`` (the
    method beneath ``Function.apply``) on the small and the larger path; a torch
    without that method gets ``Function.apply``, with the same results."""
    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    monkeypatch.setattr(_fastpaths, "_PRECOMPUTED", None)
    if not c_apply:
        monkeypatch.delattr(torch._C, "_FunctionBase")
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(*shape, generator=gen) * 3).requires_grad_(True)
    t = torch.randint(0, shape[1], shape[:1], generator=gen)
    loss = sm.cross_entropy(x, t)
    (got,) = torch.autograd.grad(loss, x)
    apply = _fastpaths._PRECOMPUTED
    assert type(loss.grad_fn).__name__ == "PrecomputedGradBackward"
    python_apply = getattr(apply, "__func__", None) is torch.autograd.Function.apply.__func__
    assert python_apply != c_apply
    x64 = x.detach().double().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(x64, t)
    (want_grad,) = torch.autograd.grad(want, x64)
    np.testing.assert_allclose(loss.detach().numpy(), want.detach().numpy(), rtol=2e-7)
    np.testing.assert_allclose(got.numpy(), want_grad.numpy(), rtol=1e-6, atol=1e-8)
    assert generic_ce_calls == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("grad", [False, True])
def test_half_precision_cross_entropy_on_the_kernel(
    tb, dtype, grad, generic_ce_calls, monkeypatch
):
    """bfloat16 and float16 logits, widened to float32 for the kernel: the loss (and
    the gradient, in the logits' dtype) are torch's float64 ones rounded to that dtype,
    to within one rounding of it."""
    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    gen = torch.Generator().manual_seed(1)
    half = getattr(torch, dtype)
    x = (torch.randn(40, 7, generator=gen) * 3).to(half).requires_grad_(grad)
    t = torch.randint(0, 7, (40,), generator=gen)
    w = torch.rand(7, generator=gen) + 0.5
    loss = sm.cross_entropy(x, t, weight=w, label_smoothing=0.1, reduction="none")
    assert loss.dtype == half
    x64 = x.detach().double().requires_grad_(True)
    want = torch.nn.functional.cross_entropy(
        x64, t, weight=w.double(), label_smoothing=0.1, reduction="none"
    )
    eps = float(torch.finfo(half).eps)
    np.testing.assert_allclose(loss.detach().double().numpy(), want.detach().numpy(), rtol=eps)
    if grad:
        assert type(loss.grad_fn).__name__ == "PrecomputedGradBackward"
        up = torch.randn(40, generator=gen)
        (got,) = torch.autograd.grad(loss, x, up.to(half))
        assert got.dtype == half
        (want_grad,) = torch.autograd.grad(want, x64, up.to(half).double())
        np.testing.assert_allclose(
            got.double().numpy(), want_grad.numpy(), rtol=eps, atol=eps * 1e-2
        )
    assert generic_ce_calls == []


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_gradient_of_the_weights(tb, reduction, monkeypatch):
    """A weight that requires grad gets its gradient (from the generic kernel: torch's
    own loss refuses one, and the fast path raised its RuntimeError before)."""
    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, generator=gen, requires_grad=True)
    t = torch.tensor([0, 3, 1, 1, -100, 2])
    w = (torch.rand(4, generator=gen) + 0.5).requires_grad_(True)
    loss = sm.cross_entropy(x, t, weight=w, reduction=reduction)
    up = torch.randn(loss.shape, generator=gen)
    gx, gw = torch.autograd.grad(loss, (x, w), up)
    # the reference, in float64 torch ops: w[t] (-log_softmax(x)[t]), its mean over w[t]
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    kept = t != -100
    tk = torch.where(kept, t, 0)
    nll = -torch.log_softmax(x64, -1).gather(1, tk[:, None])[:, 0]
    per = torch.where(kept, w64[tk] * nll, 0.0)
    want = {
        "none": per,
        "sum": per.sum(),
        "mean": per.sum() / torch.where(kept, w64[tk], 0.0).sum(),
    }
    wx, ww = torch.autograd.grad(want[reduction], (x64, w64), up.double())
    np.testing.assert_allclose(loss.detach().numpy(), want[reduction].detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(gx.numpy(), wx.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw.numpy(), ww.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "extra", [{}, {"temperature": 0.7, "z_loss": 1e-2}, {"softcap": 2.0, "temperature": 0.7}]
)
def test_cross_entropy_kernel_second_derivative(tb, extra, monkeypatch):
    """create_graph: the backward is torch's differentiable one, so Hessians match."""
    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]])
    t = torch.tensor([2, 0])
    w = torch.tensor([1.0, 2.0, 0.5])

    def ours(v):
        return sm.cross_entropy(v, t, weight=w, label_smoothing=0.1, **extra)

    def theirs(v):
        return _torch_ce64(v, t, weight=w, label_smoothing=0.1, **extra)

    h = torch.autograd.functional.hessian(ours, x)
    np.testing.assert_allclose(
        h.numpy(), torch.autograd.functional.hessian(theirs, x).numpy(), atol=1e-6
    )
    assert h.abs().sum() > 0


@pytest.fixture
def kernel_runs(monkeypatch):
    """Count the runs of the compiled row kernels (stablemath/_cpu_kernels.py) that the
    fast paths ask for: through the NumPy runner, through torch's team (which runs
    small arrays itself; a large one it may hand to the NumPy runner, counted twice),
    and by address for small torch tensors (also listed in ``runs.by_address``)."""
    from stablemath import _cpu_kernels, _cpu_team

    class Runs(list):
        by_address: list

    runs = Runs()
    runs.by_address = []

    def spying(real):
        def spy(kernel, *args):
            runs.append(kernel.__name__)
            return real(kernel, *args)

        return spy

    at_address = _cpu_team.at_address

    def spying_at_address(kernel, element):
        real = at_address(kernel, element)

        def spy(*args):
            runs.append(kernel.__name__)
            runs.by_address.append(kernel.__name__)
            return real(*args)

        return spy

    monkeypatch.setattr(_cpu_kernels, "run_rows", spying(_cpu_kernels.run_rows))
    monkeypatch.setattr(_fastpaths, "_TEAM", spying(_cpu_team.run_rows))
    monkeypatch.setattr(_cpu_team, "at_address", spying_at_address)
    monkeypatch.setattr(_fastpaths, "_AT", {})
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    return runs


def test_compiled_kernels_take_numpy_float32_and_float16(kernel_runs):
    if not backends_named("numpy"):
        pytest.skip("numpy not selected")
    x = np.array([[1.0, 2.0, -np.inf]], dtype=np.float32)
    for dtype in (np.float32, np.float16):
        y = sm.softmax(x.astype(dtype), axis=0)
        assert y.dtype == dtype
        sm.log_softmax(x.astype(dtype))
        sm.logsumexp(x.astype(dtype), keepdims=True)
    assert kernel_runs == ["softmax_rows", "log_softmax_rows", "logsumexp_rows"] * 2


def test_compiled_kernels_take_torch_tensors_no_autodiff_sees(kernel_runs):
    """Only plain CPU tensors outside autograd and torch.func (float32, and half
    precision through float32): elsewhere the kernels' values would be invisible to the
    derivative, and torch's own float64 ops run instead."""
    if not backends_named("numpy") or not backends_named("torch"):
        pytest.skip("torch not selected")
    torch = pytest.importorskip("torch")
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    sm.softmax(x)
    w = x.clone().requires_grad_(True)
    with torch.no_grad():
        sm.log_softmax(w)
    assert kernel_runs == ["softmax_rows", "log_softmax_rows"]
    y = sm.logsumexp(w)  # autograd records: torch ops
    assert y.grad_fn is not None
    torch.func.grad(lambda v: sm.logsumexp(v).sum())(x)
    for func in FUNCS:  # torch.func.vmap of float32 tensors used to fail on .item()
        f = getattr(sm, func)
        torch.testing.assert_close(torch.func.vmap(f)(x), f(x.double()).float())
    with torch.autograd.forward_ad.dual_level():
        sm.softmax(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)))
    assert kernel_runs == ["softmax_rows", "log_softmax_rows"]
    for dtype in (torch.bfloat16, torch.float16):  # widened to float32, rounded back
        y = sm.softmax(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y, torch.softmax(x.double(), -1).to(dtype), rtol=0, atol=0)
        sm.softmax(x.to(dtype).requires_grad_(True))  # autograd: torch's ops
    assert kernel_runs == ["softmax_rows", "log_softmax_rows"] + ["softmax_rows"] * 2


def test_small_torch_tensors_of_any_layout(kernel_runs):
    """Small tensors reach the kernels by their memory's address (``data_ptr``), not
    through a NumPy view: what that address means must be right for every layout. A
    view that starts inside its storage, more than two dimensions, a 1-D tensor, one
    with no rows, transposed and sliced tensors (not contiguous: through a copy), a
    negated view (its memory holds -x) and a Parameter all give torch's float64 result,
    rounded."""
    if not backends_named("numpy") or not backends_named("torch"):
        pytest.skip("torch not selected")
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(6, 7, generator=gen) * 5
    cases = {
        "offset": big[2:5],
        "3-d": big[:6].reshape(2, 3, 7),
        "1-d": big[3],
        "no rows": big[:0],
        "transposed": big.t(),
        "sliced": big[:, 1:],
        "negated": torch._neg_view(big),
        "parameter": torch.nn.Parameter(big, requires_grad=False),
    }
    native = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}
    for name, x in cases.items():
        wide = x.detach().double()
        for func, f in native.items():
            got = getattr(sm, func)(x)
            assert got.shape == x.shape and got.dtype == torch.float32, (name, func)
            want = f(wide, -1).float()
            torch.testing.assert_close(got, want, rtol=1.2e-7, atol=0, msg=(name, func))
        for keepdims in (False, True):
            got = sm.logsumexp(x, keepdims=keepdims)
            want = torch.logsumexp(wide, -1, keepdim=keepdims).float()
            assert got.shape == want.shape, (name, keepdims)
            torch.testing.assert_close(got, want, rtol=1.2e-7, atol=0, msg=(name, keepdims))
    # the kernels took all but the negated view, which torch's ops take; by address
    # all but that and the two that are not contiguous
    each = ["softmax_rows", "log_softmax_rows", "logsumexp_rows", "logsumexp_rows"]
    assert kernel_runs == each * (len(cases) - 1)
    assert kernel_runs.by_address == each * (len(cases) - 3)


def test_small_torch_cross_entropy_of_any_layout(kernel_runs):
    """Cross-entropy of small tensors reads logits and int64 targets at their
    addresses too, and checks the targets' shape without torch.Size slices: every
    layout must give the float64 reference (loss and gradient), a wrong target shape
    the generic path's error, and other target dtypes the other paths."""
    if not backends_named("numpy") or not backends_named("torch"):
        pytest.skip("torch not selected")
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(12)
    big = torch.randn(6, 7, generator=gen) * 5
    labels = torch.randint(0, 7, (12,), generator=gen)
    cases = {
        "plain": (big, labels[:6]),
        "offsets": (big[2:5], labels[5:8]),
        "3-d": (big.reshape(2, 3, 7), labels[:6].reshape(2, 3)),
        "1-d": (big[4], labels[9]),
        "transposed logits": (big.t(), labels[:7]),
        "sliced targets": (big, labels[::2]),
        "int32 targets": (big, labels[:6].int()),
        "negated targets": (big, torch._neg_view(-labels[:6])),
    }

    def reference(x, t, reduction):
        logp = torch.log_softmax(x.double(), -1)
        nll = -logp.gather(-1, t.long().unsqueeze(-1)).squeeze(-1)
        return {"mean": nll.mean(), "sum": nll.sum(), "none": nll}[reduction]

    for name, (x, t) in cases.items():
        for reduction in ("mean", "sum", "none"):
            got = sm.cross_entropy(x, t, reduction=reduction)
            want = reference(x, t, reduction).float()
            assert got.dtype == torch.float32 and got.shape == want.shape, (name, reduction)
            torch.testing.assert_close(got, want, rtol=1.2e-7, atol=0, msg=(name, reduction))
        xg, xw = x.detach().clone().requires_grad_(True), x.detach().double().requires_grad_(True)
        sm.cross_entropy(xg, t).backward()
        reference(xw, t, "mean").backward()
        torch.testing.assert_close(xg.grad, xw.grad.float(), rtol=1e-6, atol=1e-9, msg=name)
    # 3 reductions and a gradient each: all by address but for the transposed logits
    # (a copy), the sliced and the int32 targets; the negated ones take the generic path
    assert kernel_runs == ["cross_entropy_rows"] * 4 * (len(cases) - 1)
    assert kernel_runs.by_address == ["cross_entropy_rows"] * 4 * (len(cases) - 4)
    with pytest.raises(ValueError, match="target"):
        sm.cross_entropy(big[:6].reshape(2, 3, 7), labels[:6].reshape(3, 2))


@pytest.mark.parametrize(
    ("dtype", "widened"), [("bfloat16", False), ("float16", False), ("float16", True)]
)
@pytest.mark.parametrize("shape", [(5, 7), (300, 500)])  # calling thread; torch's team
def test_half_precision_tensors_are_read_by_the_kernels(tb, shape, dtype, widened, monkeypatch):
    """bfloat16 and float16 tensors go to the kernels as their bits, with no float32
    copy before or after: the results are bit for bit those of the float32 tensor's,
    rounded to the dtype (the route they took before: widened by torch, then rounded
    by torch), with -inf entries, a temperature, another axis, and cross-entropy's
    gradient. (float16 only where the CPU converts it, as on the CI machine; where it
    does not, ``widened``, float16 is widened by torch, with the same results.)"""
    from stablemath import _cpu_kernels, _cpu_team

    if dtype == "float16" and not _cpu_kernels.FLOAT16_CONVERSIONS:
        pytest.fail("this CPU has no float16 conversions: the test needs one that has")
    if widened:
        monkeypatch.setattr(_cpu_kernels, "FLOAT16_CONVERSIONS", False)

    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    rows = []

    def spy(kernel, x, *args):
        rows.append(x.dtype)
        return _cpu_team.run_rows(kernel, x, *args)

    at_address = _cpu_team.at_address

    def spying_at_address(kernel, element):  # small tensors, read by address
        real = at_address(kernel, element)

        def spy(*args):
            rows.append(np.dtype(element))
            return real(*args)

        return spy

    monkeypatch.setattr(_fastpaths, "_TEAM", spy)
    monkeypatch.setattr(_cpu_team, "at_address", spying_at_address)
    monkeypatch.setattr(_fastpaths, "_AT", {})
    monkeypatch.setattr(_fastpaths, "_ELEMENTS", {})
    gen = torch.Generator().manual_seed(4)
    half = getattr(torch, dtype)
    x = (torch.randn(shape, generator=gen) * 6).to(half)
    x[::3, ::4] = -math.inf
    x32 = x.float()
    for func, kw in [
        ("softmax", {}),
        ("softmax", {"temperature": 0.7, "axis": 0}),
        ("log_softmax", {}),
        ("log_softmax", {"axis": 0}),
        ("logsumexp", {}),
        ("logsumexp", {"axis": 0, "keepdims": True}),
    ]:
        got = getattr(sm, func)(x, **kw)
        assert got.dtype == half
        assert torch.equal(got, getattr(sm, func)(x32, **kw).to(half)), (func, kw)
    finite = torch.where(torch.isinf(x), torch.tensor(-30.0, dtype=half), x)
    t = torch.randint(0, shape[1], (shape[0],), generator=gen)
    for kw in [{}, {"reduction": "none", "label_smoothing": 0.1}]:
        want = sm.cross_entropy(finite.float(), t, **kw).to(half)
        assert torch.equal(sm.cross_entropy(finite, t, **kw), want)
    xg, xf = finite.clone().requires_grad_(True), finite.float().requires_grad_(True)
    sm.cross_entropy(xg, t).backward()
    sm.cross_entropy(xf, t).backward()
    assert xg.grad.dtype == half and torch.equal(xg.grad, xf.grad.to(half))
    # every bfloat16 call ran the kernels on the bits, every float32 one on float32
    bits, f32 = np.dtype(np.uint16 if dtype == "bfloat16" else np.int16), np.dtype(np.float32)
    if widened:
        bits = f32
    assert rows == [bits, f32] * 6 + [f32, bits] * 2 + [bits, f32]


def test_bfloat16_class_weights(tb, monkeypatch):
    """A bfloat16 weight tensor (NumPy cannot view it: it raised TypeError) is used in
    float64, as any other weight."""
    torch = tb.module
    monkeypatch.delenv(_fastpaths.DISABLE_ENV, raising=False)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    t = torch.tensor([0, 2])
    w = torch.tensor([1.0, 2.0, 0.5]).to(torch.bfloat16)  # exact in bfloat16
    want = torch.nn.functional.cross_entropy(x.double(), t, weight=w.double())
    for logits in (x, x.to(torch.bfloat16)):
        got = sm.cross_entropy(logits, t, weight=w)
        np.testing.assert_allclose(float(got), float(want), rtol=float(torch.finfo(got.dtype).eps))
    # targets of two axes (the kernels take them flattened: they raised Numba's
    # TypingError on this path), and logits under autograd
    x2, t2 = torch.stack([x, x.flip(0)]), torch.stack([t, t.flip(0)])
    want = torch.nn.functional.cross_entropy(x2.double().movedim(-1, 1), t2, weight=w.double())
    for logits in (x2, x2.to(torch.bfloat16).requires_grad_(True)):
        got = sm.cross_entropy(logits, t2, weight=w).detach()
        np.testing.assert_allclose(float(got), float(want), rtol=float(torch.finfo(got.dtype).eps))
