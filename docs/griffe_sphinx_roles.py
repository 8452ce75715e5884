"""Griffe extension for the API reference: Sphinx cross-reference roles in docstrings
(``:class:`~beyondgrad.linops.KFAC```, ``:func:`eigsh```) are shown as inline code
(``KFAC``, ``eigsh``); mkdocstrings' Markdown would otherwise print the role literally.

Used by ``mkdocs.yml`` (``extensions:`` of the mkdocstrings Python handler); it changes only
what the documentation site shows, never the docstrings themselves.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")


def plain(match: re.Match[str]) -> str:
    """``:role:`~a.b``` -> ```b```, ``:role:`a.b``` -> ```a.b```."""
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles as inline code in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of each object griffe loads."""
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(plain, obj.docstring.value)
