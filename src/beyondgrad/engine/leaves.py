"""``tree_flatten`` without its cost in the common case: a model called with tensors only.

The engine flattens the arguments of every recorded call several times per pass (their
versions, shapes, the cache key of the call). ``torch.utils._pytree.tree_flatten`` costs about
10 microseconds even for ``((x,), {})``; these helpers take a shortcut when every argument is
a tensor and there are no keyword arguments, and fall back to ``tree_flatten`` otherwise, with
the same leaves in the same order.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten


def _tensors_only(args: Any) -> bool:
    return type(args) is tuple and all(isinstance(a, Tensor) for a in args)


def call_leaves(args: tuple, kwargs: dict) -> list[Any]:
    """``tree_flatten((args, kwargs))[0]``: the leaves of a call's arguments.

    Args:
        args: the positional arguments.
        kwargs: the keyword arguments.

    Returns:
        The leaves in ``tree_flatten`` order.
    """
    if not kwargs and _tensors_only(args):
        return list(args)
    return tree_flatten((args, kwargs))[0]


def call_structure(args: tuple, kwargs: dict) -> tuple[list[Any], str]:
    """The leaves of a call's arguments and a string naming their structure (equal for two
    calls exactly when ``tree_flatten`` gives them equal specs).

    Args:
        args: the positional arguments.
        kwargs: the keyword arguments.

    Returns:
        ``(leaves, structure)``.
    """
    if not kwargs and _tensors_only(args):
        return list(args), f"tensors:{len(args)}"
    leaves, spec = tree_flatten((args, kwargs))
    return leaves, str(spec)


def leaves(tree: Any) -> list[Any]:
    """``tree_flatten(tree)[0]``, with shortcuts for a tensor and a tuple or list of tensors.

    Args:
        tree: any pytree.

    Returns:
        Its leaves in ``tree_flatten`` order.
    """
    if isinstance(tree, Tensor):
        return [tree]
    if type(tree) in (tuple, list) and all(isinstance(t, Tensor) for t in tree):
        return list(tree)
    return tree_flatten(tree)[0]


__all__ = ["call_leaves", "call_structure", "leaves"]
