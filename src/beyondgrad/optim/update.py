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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def descend_many_(
    params: Sequence[Tensor],
    directions: Sequence[Tensor],
    group: dict[str, Any],
    states: Sequence[dict[str, Any]],
    lr_scale: float = 1.0,
) -> None:
    """Move the parameters of one param group (in place) against their directions: decoupled
    weight decay, momentum, step (see the module docstring), with ``torch._foreach``
    operations (a few kernel launches for all of them instead of a few per parameter).

    Args:
        params: the parameters.
        directions: their directions, in the same order.
        group: their param group.
        states: their optimizer states.
        lr_scale: multiplies the group's ``lr`` (the warm-up factor).
    """
    if not params:
        return
    lr, wd, mu = group["lr"] * lr_scale, group["weight_decay"], group["momentum"]
    params = list(params)
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    steps = list(directions)
    if mu:
        if group.get("grafting") == "adam":  # Adam's first moment (see the module docstring)
            steps = torch._foreach_mul(steps, 1 - mu)
        old = [(s["momentum_buffer"], d) for s, d in zip(states, steps) if "momentum_buffer" in s]
        if old:
            buffers = [b for b, _ in old]
            torch._foreach_mul_(buffers, mu)
            torch._foreach_add_(buffers, [d for _, d in old])
        for s, d in zip(states, steps):
            if "momentum_buffer" not in s:
                s["momentum_buffer"] = d.clone()
        steps = [s["momentum_buffer"] for s in states]
    steps = [d if d.dtype == p.dtype else d.to(p.dtype) for p, d in zip(params, steps)]
    torch._foreach_add_(params, steps, alpha=-lr)


__all__ = ["descend_many_"]
