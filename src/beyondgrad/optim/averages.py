"""Moving averages: the one recurrence behind KFAC's factor averages, the Riemannian momenta of
SINGD and SIRFShampoo, and the parameter momentum of every optimizer here.

``avg <- decay * avg + weight * new``; two conventions:

- :func:`ema_` (``weight = 1 - decay``, a convex combination): KFAC's ``A <- ema A + (1 - ema)
  A_batch``, SIRFShampoo's ``m <- alpha2 m + (1 - alpha2) step``. Without a previous average
  the first value initializes it (no zero bias).
- :func:`decayed_sum` / :func:`decayed_sum_` (any ``weight``, default 1): SINGD's
  ``m <- alpha1 m + step`` and heavy-ball momentum ``buf <- mu buf + d`` (torch's SGD
  convention: the first value initializes the buffer).

The trailing underscore marks the in-place versions (the state tensor is updated and
returned); the others return a new tensor and leave their inputs alone, which lets a caller
check the result before it replaces any state.
"""

from __future__ import annotations

from torch import Tensor


def ema_(avg: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """Exponential moving average, in place: ``avg <- decay avg + (1 - decay) new``.

    Args:
        avg: the current average (updated in place), or None for the first value.
        new: the new value, shaped like ``avg``.
        decay: in ``[0, 1)``; 0 keeps only ``new``.

    Returns:
        ``avg`` updated, or a copy of ``new`` when ``avg`` is None.
    """
    if avg is None:
        return new.clone()
    return avg.lerp_(new.to(avg.dtype), 1 - decay)


def decayed_sum(avg: Tensor, new: Tensor, decay: float, weight: float = 1.0) -> Tensor:
    """``decay avg + weight new`` as a new tensor (``avg`` is left unchanged).

    Args:
        avg: the current value.
        new: shaped like ``avg``.
        decay: factor on the old value.
        weight: factor on the new value (1: momentum; ``1 - decay``: a moving average).

    Returns:
        The updated value (a new tensor).
    """
    return avg * decay + (new if weight == 1.0 else new * weight)


def decayed_sum_(avg: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """Heavy-ball momentum in place: ``avg <- decay avg + new`` (the first value initializes).

    Args:
        avg: the buffer (updated in place), or None for the first value.
        new: shaped like ``avg``.
        decay: the momentum.

    Returns:
        ``avg`` updated, or a copy of ``new`` when ``avg`` is None.
    """
    if avg is None:
        return new.clone()
    return avg.mul_(decay).add_(new)


__all__ = ["decayed_sum", "decayed_sum_", "ema_"]
