"""The parameter update shared by every preconditioned parameter.

``p <- p (1 - lr wd) - lr buf`` with ``buf <- momentum buf + direction`` (heavy-ball momentum,
torch's SGD convention: the first direction initializes the buffer; no momentum: ``buf =
direction``); ``lr``, ``weight_decay`` and ``momentum`` are read from the parameter's param
group at every step, so LR schedulers and loaded checkpoints take effect.

With Adam grafting (``grafting="adam"``) the direction already has Adam's step length, so the
momentum is Adam's first moment: an exponential average ``buf <- momentum buf + (1 - momentum)
direction`` (not bias-corrected: the first steps are shorter, a built-in warm-up). Heavy-ball
momentum there would lengthen the steady-state step ``1 / (1 - momentum)``-fold (10x at 0.9) and
diverged on the deep autoencoder task.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .averages import decayed_sum_


def descend_(
    p: Tensor,
    direction: Tensor,
    group: dict[str, Any],
    state: dict[str, Any],
    lr_scale: float = 1.0,
) -> None:
    """Move ``p`` (in place) against ``direction``: decoupled weight decay, momentum, step.

    Args:
        p: the parameter.
        direction: the (preconditioned, grafted, clipped) direction, shaped like ``p``.
        group: its param group (``lr``, ``weight_decay``, ``momentum``).
        state: its optimizer state (the momentum keeps ``momentum_buffer`` there).
        lr_scale: multiplies the group's ``lr`` (the warm-up factor).
    """
    lr, wd, mu = group["lr"] * lr_scale, group["weight_decay"], group["momentum"]
    if wd:
        p.mul_(1 - lr * wd)
    if mu:
        if group.get("grafting") == "adam":  # Adam's first moment (see the module docstring)
            direction = direction * (1 - mu)
        direction = state["momentum_buffer"] = decayed_sum_(
            state.get("momentum_buffer"), direction, mu
        )
    p.add_(direction.to(p.dtype), alpha=-lr)


__all__ = ["descend_"]
