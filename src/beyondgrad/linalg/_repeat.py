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
