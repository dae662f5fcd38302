"""The ``torch.autograd.Function`` of each derivative rule of
:func:`stablemath._lib._compat.with_derivative`.

Imported on the first call with a torch tensor, never by ``import stablemath``. The
classes are built here, at import, because ``torch.compile`` cannot trace a class
statement inside the function it compiles (an import it runs for real).

Each rule gets two classes: one with forward mode (``jvp``, for ``torch.func.jvp`` and
``torch.autograd.forward_ad``) for eager code, and one without it for code traced by
``torch.compile``, whose Dynamo refuses any ``Function`` that defines ``jvp`` (a graph
break, an error under ``fullgraph=True``). Reverse mode is the same in both.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as xp
import torch

from ._compat import RULES


def _function(value: Any, jvp: Any, vjp: Any) -> tuple[type[torch.autograd.Function], ...]:
    class Derivative(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x: Any, live: Any, axes: tuple[int, ...]) -> Any:
            return value(x, live, axes, xp=xp)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            x, live, axes = inputs
            ctx.axes = axes
            ctx.save_for_backward(x, live)
            ctx.save_for_forward(x, live)

        @staticmethod
        def backward(ctx: Any, *cotangents: Any) -> Any:
            x, live = ctx.saved_tensors
            return vjp(x, live, ctx.axes, *cotangents, xp=xp), None, None

    class ForwardModeDerivative(Derivative):
        @staticmethod
        def jvp(ctx: Any, dx: Any, *_: Any) -> Any:
            x, live = ctx.saved_tensors
            return jvp(x, live, ctx.axes, dx, xp=xp)

    return ForwardModeDerivative, Derivative


# rule name -> (class for eager code, class for code that torch.compile traces)
FUNCTIONS = {name: _function(*rule) for name, rule in RULES.items()}
