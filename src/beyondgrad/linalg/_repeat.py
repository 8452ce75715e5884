"""Run an algorithm inside its operator's ``repeated_products()`` context."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def repeated(A: Any) -> Any:
    """``A.repeated_products()`` if ``A`` has it (a beyondgrad operator), else a no-op."""
    enter = getattr(A, "repeated_products", None)
    return enter() if callable(enter) else nullcontext()


def with_repeated_products(fn: F) -> F:
    """Decorator: call ``fn(A, ...)`` inside ``repeated(A)``."""

    @functools.wraps(fn)
    def wrapper(A: Any, *args: Any, **kwargs: Any) -> Any:
        with repeated(A):
            return fn(A, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def require_square(A: Any, who: str) -> int:
    """``n`` for an operator of shape ``(n, n)``; a clear error otherwise."""
    shape = tuple(getattr(A, "shape", ()))
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"{who} needs a square (symmetric) operator of shape (n, n), got shape {shape} "
            "(for a rectangular J, use J.T @ J or J @ J.T)"
        )
    return int(shape[0])
