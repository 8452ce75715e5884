"""Griffe extension for the API reference: docstrings as written in beyondgrad, shown well.

* Sphinx cross-reference roles (``:class:`~beyondgrad.linops.KFAC```, ``:func:`eigsh```) become
  inline code (``KFAC``, ``eigsh``); mkdocstrings' Markdown would print the role literally.
* A Google-style ``Args:`` item naming several parameters at once
  (``lr, momentum, weight_decay: the update``) becomes one item per parameter with the same
  description; griffe would otherwise take the group for one unknown parameter.

Used by ``mkdocs.yml`` (``extensions:`` of the mkdocstrings Python handler); it changes only
what the documentation site shows, never the docstrings themselves.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+):(.*)$")


def plain(match: re.Match[str]) -> str:
    """``:role:`~a.b``` -> ```b```, ``:role:`a.b``` -> ```a.b```."""
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def indent(line: str) -> int:
    """Leading spaces of a line."""
    return len(line) - len(line.lstrip())


def split_grouped(text: str) -> str:
    """One ``Args:`` item per parameter where an item names several."""
    lines = text.splitlines()
    out: list[str] = []
    section: int | None = None  # indentation of the current Args-like header
    i = 0
    while i < len(lines):
        line = lines[i]
        if SECTION.match(line):
            section = indent(line)
        elif line.strip() and section is not None and indent(line) <= section:
            section = None
        grouped = GROUPED.match(line) if section is not None else None
        if grouped is None:
            out.append(line)
            i += 1
            continue
        pad, names, first = grouped.groups()
        block = [first]
        i += 1
        while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > len(pad)):
            block.append(lines[i])
            i += 1
        for name in re.split(r"\s*,\s*", names):
            out.append(f"{pad}{name}:{block[0]}")
            out.extend(block[1:])
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite every loaded docstring (roles as inline code, grouped parameters split)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of each object griffe loads."""
        if obj.docstring is not None:
            obj.docstring.value = split_grouped(ROLE.sub(plain, obj.docstring.value))
