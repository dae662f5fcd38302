"""Everything that knows which array library it is talking to.

This is the one module that imports ``array_api_compat`` and the one place where a
backend is named. The math in :mod:`stablemath._kernels` only calls ``xp.*`` functions
of the array API standard; whatever the standard cannot express lives here, each with
the reason it is needed:

* resolving the namespace of the inputs (lists and Python scalars use NumPy, as SciPy
  does; arrays of two libraries in one call are an error naming both);
* deciding whether an array's *values* may be inspected (to raise on a bad target):
  not for JAX tracers, Dask's lazy arrays, or inside ``torch.compile``, where a
  ``bool(xp.any(...))`` is a graph break or impossible;
* turning NumPy's 0-d results, which NumPy hands back as ``np.float64`` scalars, into
  0-d arrays, so that every reduction returns an array of the caller's library;
* attaching a derivative rule written by hand to a function
  (:func:`with_derivative`): the standard has no autodiff, so the rule is wired into
  ``torch.autograd.Function`` and ``jax.custom_jvp`` here.

No backend library is imported here: each is recognised by the module of the array's
type, so ``import stablemath`` imports neither torch nor JAX.
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "array_namespace",
    "can_inspect_values",
    "device",
    "ensure_array",
    "finish",
    "library_name",
    "numpy_view",
    "plain_tensor",
    "widest_float",
    "with_derivative",
]


def _torch_tensor_type() -> type | None:
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def device(x: Any) -> Any:
    """The device of ``x`` (``array_api_compat.device``; torch's attribute is read
    directly, which ``torch.compile`` traces without warnings, and a NumPy array's is
    ``"cpu"`` without a call: the kernels ask for it a dozen times per call, which on
    a small array cost more than the arithmetic). None for a JAX array sharded over
    several devices (see below)."""
    if type(x) is np.ndarray:
        return "cpu"
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        return x.device
    found = array_api_compat.device(x)
    if getattr(found, "num_devices", 1) > 1:
        # a JAX array sharded over several devices has its sharding for a device,
        # with which no array of another shape can be made (an eager softmax of such
        # an array raised IndexError); None makes uncommitted arrays, which JAX
        # places beside the sharded one
        return None
    return found


def library_name(obj: Any) -> str:
    """The name of the library an array comes from (``"torch"``, ``"numpy"``, ...)."""
    if array_api_compat.is_numpy_array(obj):
        return "numpy"
    if array_api_compat.is_torch_array(obj):
        return "torch"
    if array_api_compat.is_jax_array(obj):
        return "jax"
    if array_api_compat.is_dask_array(obj):
        return "dask"
    if array_api_compat.is_cupy_array(obj):
        return "cupy"
    return type(obj).__module__.split(".")[0]


# array type -> (namespace, library name), resolved once per type: it keeps the call
# overhead small and array-api-compat's cached helpers out of torch.compile traces
_NAMESPACES: dict[type, tuple[Any, str]] = {}


def _lookup(obj: Any) -> tuple[Any, str] | None:
    """``(namespace, library name)`` of an array; None for anything else."""
    hit = _NAMESPACES.get(type(obj))
    if hit is not None:
        return hit
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(obj, tensor):
        import array_api_compat.torch as torch_xp

        hit = (torch_xp, "torch")
    elif isinstance(obj, np.generic) or not array_api_compat.is_array_api_obj(obj):
        return None
    else:
        hit = (array_api_compat.array_namespace(obj), library_name(obj))
    _NAMESPACES[type(obj)] = hit
    return hit


def array_namespace(*args: Any) -> tuple[Any, list[Any]]:
    """Resolve the array API namespace of ``args`` and return it with the arrays.

    ``None`` entries pass through unchanged. Lists, tuples and Python or NumPy scalars
    are converted with the namespace of the array arguments, or with NumPy when no
    argument is an array (the convention of :mod:`scipy.special`).

    Raises
    ------
    TypeError
        If the arrays come from two different libraries.
    """
    found = []
    for a in args:
        hit = None if a is None else _lookup(a)
        if hit is not None:
            found.append((a, hit))
    if not found:
        xp = _lookup(np.empty(0))[0]
        return xp, [None if a is None else np.asarray(a) for a in args]
    first, (xp, lib) = found[0]
    if len(found) == 1 and all(a is None or a is first for a in args):
        return xp, list(args)  # the common call: one array, nothing to convert
    for other, (other_xp, other_lib) in found[1:]:
        if other_xp is not xp and other_lib != lib:
            msg = (
                f"arrays from two different libraries in one call: {lib} "
                f"({type(first).__name__}) and {other_lib} ({type(other).__name__}); "
                "convert them to one library first"
            )
            raise TypeError(msg)
    dev = device(first)
    out = [a if a is None or _lookup(a) is not None else xp.asarray(a, device=dev) for a in args]
    return xp, out


def can_inspect_values(x: Any) -> bool:
    """Whether the concrete values of ``x`` can be read without tracing problems.

    ``array_api_compat.is_lazy_array`` is True for every JAX array, concrete ones too,
    so it cannot answer this; the tracer type, Dask's laziness and torch's compiler
    state do.
    """
    hit = _lookup(x)
    lib = "numpy" if hit is None else hit[1]
    if lib == "dask":
        return False
    if lib == "jax":
        return not isinstance(x, sys.modules["jax"].core.Tracer)
    if lib == "torch":
        torch = sys.modules["torch"]
        if torch.compiler.is_compiling() or x.is_meta:
            return False
        # torch.func.vmap cannot read one value of a batch (.item()); grad and jvp can
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(x):
            if functorch.is_batchedtensor(x):
                return False
            x = functorch.get_unwrapped(x)
        return True
    return True


_PLAIN: tuple[Any, ...] = ()


def _plain_parts() -> tuple[Any, ...]:
    """What :func:`plain_tensor` asks torch, looked up once: the attribute chains
    cost 30-60 ns each, on a path whose whole budget for a 1x10 call is a few us."""
    global _PLAIN
    torch = sys.modules["torch"]
    functorch = torch._C._functorch
    _PLAIN = (
        torch.Tensor,
        torch.nn.Parameter,
        torch.is_grad_enabled,
        functorch.maybe_current_level,
        functorch.is_functorch_wrapped_tensor,
        torch.autograd.forward_ad,
        torch.strided,
    )
    return _PLAIN


def plain_tensor(x: Any, other: Any = None, *, attaches_grad: bool = False) -> bool:
    """Whether computing on the memory of the torch CPU tensor ``x`` outside torch
    loses nothing: False where ``x`` takes part in autograd (``requires_grad`` with
    grad mode on; allowed with ``attaches_grad``, when the caller attaches the
    derivative itself), is wrapped by a ``torch.func`` transform (``grad``, ``vmap``,
    ``jvp``) or used inside one, may carry a forward-mode tangent (inside
    ``torch.autograd.forward_ad.dual_level``), is a subclass other than
    ``Parameter``, or is not a plain strided tensor (a negated view). The caller has
    checked the device and that no compiler traces. ``other``, a tensor that takes no
    part in autograd (integer targets), is asked the same questions, in one call."""
    tensor, parameter, grad_mode, level, wrapped, forward_ad, strided = _PLAIN or _plain_parts()
    cls = type(x)
    if cls is not tensor and cls is not parameter:
        return False
    if x.requires_grad and not attaches_grad and grad_mode():
        return False
    # inside a transform even a tensor from outside it has no memory to read
    if level() is not None or wrapped(x):
        return False
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return False
    if other is not None:
        cls = type(other)
        if (cls is not tensor and cls is not parameter) or wrapped(other):
            return False
        if other.layout is not strided or other.is_neg():
            return False
    return x.layout is strided and not x.is_neg()


def numpy_view(
    x: Any, *, attaches_grad: bool = False, half_bits: bool = False
) -> np.ndarray | None:
    """A NumPy array sharing the memory of the torch CPU tensor ``x``, or None where
    :func:`plain_tensor` says that computing outside torch would lose something.

    NumPy has no bfloat16: such a tensor gives None, or with ``half_bits`` its bits as
    a uint16 array; with ``half_bits`` a float16 tensor gives its bits as int16 (for
    the compiled kernels, which read both kinds of bits themselves)."""
    if not plain_tensor(x, attaches_grad=attaches_grad):
        return None
    torch = sys.modules["torch"]
    dtype = x.dtype  # (torch's dtypes are singletons: `is` is their equality)
    if dtype is torch.bfloat16:
        return x.detach().view(torch.int16).numpy().view(np.uint16) if half_bits else None
    if dtype is torch.float16 and half_bits:
        return x.detach().view(torch.int16).numpy()
    return (x.detach() if x.requires_grad else x).numpy()


_WIDEST: dict[tuple[str, str], Any] = {}


def widest_float(xp: Any, device: Any) -> Any:
    """float64 where the namespace offers it on ``device``, else float32. Asking the
    namespace's info object costs torch 8 us a call, so the answer is kept per
    namespace and device; not for JAX, where ``jax_enable_x64`` may change it at any
    time."""
    key = (getattr(xp, "__name__", repr(xp)), str(device))
    cached = _WIDEST.get(key)
    if cached is not None:
        return cached
    info = xp.__array_namespace_info__()
    wide = info.dtypes(device=device, kind="real floating").get("float64", xp.float32)
    if "jax" not in key[0]:
        _WIDEST[key] = wide
    return wide


def finish(result: Any, dtype: Any, xp: Any) -> Any:
    """Cast ``result`` to the output ``dtype`` and return it as an array.

    Rounding a float64 result to float32 overflows to ``+-inf`` exactly where the true
    value is beyond the float32 range (SPEC §3.2): that is the answer, so the "overflow
    encountered in cast" warning of NumPy (and of the libraries computing with it:
    array-api-strict eagerly, Dask when the graph runs) is silenced for this cast.
    """
    if result.dtype == dtype:
        return ensure_array(result, xp)
    # a tuple, not np.ndarray | np.generic: torch.compile cannot trace that union
    if isinstance(result, (np.ndarray, np.generic)):
        return ensure_array(_cast_quietly(result, dtype), xp)
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(result, tensor):
        # (before library_name: torch.compile warns of array-api-compat's cached helpers)
        return xp.astype(result, dtype)
    lib = library_name(result)
    if lib == "dask":
        return result.map_blocks(_cast_quietly, dtype, dtype=dtype)
    if lib == "array_api_strict":
        with np.errstate(over="ignore"):
            return xp.astype(result, dtype)
    return ensure_array(xp.astype(result, dtype), xp)


def _cast_quietly(block: Any, dtype: Any) -> Any:
    with np.errstate(over="ignore"):
        return block.astype(dtype)


def ensure_array(result: Any, xp: Any) -> Any:
    """Return NumPy's scalar results as 0-d arrays; every other result unchanged."""
    if isinstance(result, np.generic):
        return np.asarray(result)
    return result


# name -> (value, jvp, vjp) of every rule made by with_derivative; _torch_autograd
# builds its torch.autograd.Function classes from this when it is first imported
RULES: dict[str, tuple[Any, Any, Any]] = {}


def with_derivative(value: Any, jvp: Any, vjp: Any) -> Any:
    """``value(x, live, axes, *, xp)``, returning a tuple of arrays, with its
    derivative with respect to ``x`` given by hand.

    ``jvp(x, live, axes, dx, *, xp)`` returns the tangents of the outputs along
    ``dx``; ``vjp(x, live, axes, *cotangents, xp)`` returns the cotangent of ``x``;
    both are written with ``xp`` functions (so they are differentiable in turn, for
    second derivatives). ``live`` (a boolean mask or None) and the tuple ``axes`` have
    no derivative.

    * PyTorch: a ``torch.autograd.Function`` (:mod:`._torch_autograd`) with
      ``backward`` (reverse mode, double backward), ``jvp`` (forward mode) and a
      generated vmap rule (``torch.func``); under ``torch.compile(fullgraph=True)`` it
      traces without the forward mode, which Dynamo cannot trace.
    * JAX: ``jax.custom_jvp`` (``jax.grad``, ``jvp``, ``jit``, ``vmap``; JAX transposes
      the linear ``jvp`` for reverse mode, so ``vjp`` is not needed).
    * Libraries without autodiff (NumPy, CuPy, Dask, array-api-strict) call ``value``.
    """
    name = f"{value.__module__}.{value.__qualname__}"
    RULES[name] = (value, jvp, vjp)
    jax_fn = None  # the jax.custom_jvp, made on the first JAX call

    def call(x: Any, live: Any, axes: tuple[int, ...], *, xp: Any) -> Any:
        hit = _lookup(x)
        lib = None if hit is None else hit[1]
        if lib == "torch":
            # a module import, not a class statement: torch.compile runs imports for
            # real but cannot trace the definition of a class
            from . import _torch_autograd

            eager, traced = _torch_autograd.FUNCTIONS[name]
            compiling = sys.modules["torch"].compiler.is_compiling()
            return (traced if compiling else eager).apply(x, live, axes)
        if lib == "jax":
            nonlocal jax_fn
            if jax_fn is None:
                jax_fn = _jax_custom_jvp(value, jvp)
            return jax_fn(x, live, axes)
        return value(x, live, axes, xp=xp)

    return call


def _jax_custom_jvp(value: Any, jvp: Any) -> Any:
    import jax
    import jax.numpy as xp

    def primal(x: Any, live: Any, axes: tuple[int, ...]) -> Any:
        return value(x, live, axes, xp=xp)

    fn = jax.custom_jvp(primal, nondiff_argnums=(2,))

    def rule(axes: tuple[int, ...], primals: Any, tangents: Any) -> Any:
        x, live = primals
        return value(x, live, axes, xp=xp), jvp(x, live, axes, tangents[0], xp=xp)

    fn.defjvp(rule)
    return fn
