"""The environment switches that the fast paths read at every call
(``STABLEMATH_DISABLE_FASTPATHS``, ``TRITON_INTERPRET``), so that a test or a user may
change them at run time. (The Triton package reads its own with ``os.environ``: it is
traced by ``torch.compile``, and is not on the path of a 1x10 CPU call.)

``os.environ.get`` costs 0.6-1 us (the key is encoded and the value decoded through
the ``Mapping`` machinery, Python 3.11); two reads were a third of the call overhead
of a 1x10 softmax on a torch tensor. :func:`flag` looks the encoded name up in the
dictionary that ``os.environ`` keeps in step with the environment (``_data``, present
in CPython since 3.2; assignments and deletions through ``os.environ`` update it):
0.13 us a call, the lookup itself 20 ns. It falls back to ``os.environ.get`` where that
dictionary is absent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["either", "flag"]

_ENCODED: dict[tuple[str, str], tuple[Any, Any]] = {}


def flag(name: str, value: str = "1") -> bool:
    """Whether the environment variable ``name`` is set to ``value`` now."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        return os.environ.get(name) == value
    key = _ENCODED.get((name, value)) or _encoded(name, value)
    return data.get(key[0]) == key[1]


def either(first: str, second: str) -> Callable[[], bool]:
    """A function that tells whether ``first`` or ``second`` is set to ``"1"`` now: the
    encoded names and the dictionary's ``get`` held in a closure, 0.08 us a call where
    two calls of :func:`flag` cost 0.26 (the call and the lookups cost more than the
    reads). It reads the dictionary of the ``os.environ`` of its making, which every
    change through ``os.environ`` updates in place."""
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        return lambda: flag(first) or flag(second)
    one, one_set = _ENCODED.get((first, "1")) or _encoded(first, "1")
    two, two_set = _ENCODED.get((second, "1")) or _encoded(second, "1")
    get = data.get

    def read() -> bool:
        return get(one) == one_set or get(two) == two_set

    return read


def _encoded(name: str, value: str) -> tuple[Any, Any]:
    key = _ENCODED[name, value] = (os.environ.encodekey(name), os.environ.encodevalue(value))
    return key
