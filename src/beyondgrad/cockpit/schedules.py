"""Tracking schedules: callables ``step -> bool``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def every(k: int, offset: int = 0) -> Callable[[int], bool]:
    """Track steps ``offset, offset + k, offset + 2k, ...``."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return lambda step: step >= offset and (step - offset) % k == 0


def logarithmic(start: int, end: int, steps: int) -> Callable[[int], bool]:
    """Track about ``steps`` steps spaced logarithmically between ``start`` and ``end``
    (dense early in training, sparse later); always includes ``start``."""
    if not (0 <= start < end) or steps < 1:
        raise ValueError("need 0 <= start < end and steps >= 1")
    points = np.unique(np.round(np.geomspace(start + 1, end + 1, steps) - 1).astype(int))
    tracked = frozenset(int(p) for p in points) | {start}
    return lambda step: step in tracked


__all__ = ["every", "logarithmic"]
