"""A griffe extension (loaded by mkdocstrings, see mkdocs.yml) that renders the few
reStructuredText constructs of stablemath's numpydoc docstrings as Markdown, so that
the docstrings stay as they are (they are also read by ``help()`` and Sphinx users):

- ``.. math::`` followed by an indented block becomes a ``$$ ... $$`` display (MathJax
  through pymdownx.arithmatex);
- ``:math:`...``` becomes inline ``$...$``;
- ``:func:`name``` and ``:mod:`name``` become code; a public stablemath function becomes
  a link to its entry in the API reference.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

PUBLIC = {"logsumexp", "softmax", "log_softmax", "cross_entropy", "nll_loss"}
_ROLE = re.compile(r":(?:func|mod|class|meth|obj):`~?([^`]+)`")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")


def _role(match: re.Match[str]) -> str:
    name = match[1]
    short = name.removeprefix("stablemath.")
    if short in PUBLIC:
        return f"[`{short}`][stablemath.{short}]"
    return f"`{name}`"


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != ".. math::":
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        formula = textwrap.dedent("\n".join(body)).strip("\n")
        out += [f"{indent}$$", *(indent + f for f in formula.splitlines()), f"{indent}$$", ""]
    return "\n".join(out)


def rst_to_markdown(text: str) -> str:
    text = _math_blocks(text)
    text = _INLINE_MATH.sub(lambda m: f"${m[1]}$", text)
    return _ROLE.sub(_role, text)


class RstToMarkdown(griffe.Extension):
    """Rewrite each docstring once, when griffe loads the object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
