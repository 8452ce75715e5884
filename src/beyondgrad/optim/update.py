"""The parameter update shared by every preconditioned parameter.

``p <- p (1 - lr wd) - lr buf`` with ``buf <- momentum buf + direction`` (heavy-ball momentum,
torch's SGD convention: the first direction initializes the buffer; no momentum: ``buf =
direction``); ``lr``, ``weight_decay`` and ``momentum`` are read from the parameter's param
group at every step, so LR schedulers and loaded checkpoints take effect.
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
        direction = state["momentum_buffer"] = decayed_sum_(
            state.get("momentum_buffer"), direction, mu
        )
    p.add_(direction.to(p.dtype), alpha=-lr)


__all__ = ["descend_"]
