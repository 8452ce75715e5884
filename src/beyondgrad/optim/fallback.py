"""The AdamW fallback: the update of every parameter an optimizer does not precondition.

Parameters the method has no rule for (norm layers, tied weights, 0-d tensors, ...) and every
parameter of a group with ``precondition=False`` are trained by AdamW inside the same
optimizer (decoupled weight decay, bias correction), with the group's ``adam_lr``,
``adam_betas``, ``adam_eps`` and ``weight_decay``. ``adam_lr`` follows LR schedulers: it is
scaled by ``lr / initial_lr`` (``initial_lr`` is written by torch's schedulers).

State per parameter: ``exp_avg``, ``exp_avg_sq`` (the parameter's dtype) and ``adam_step``, a
Python int (never cast to the parameter dtype by ``load_state_dict``: a bfloat16 counter
would stop at 256).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

ADAMW_DEFAULTS: dict[str, Any] = {
    "adam_lr": 1e-3,
    "adam_betas": (0.9, 0.999),
    "adam_eps": 1e-8,
    "precondition": True,
}
"""Param-group defaults of the fallback (and the routing flag ``precondition``)."""


def fallback_lr(group: dict[str, Any]) -> float:
    """The group's ``adam_lr`` scaled by the schedule of its ``lr`` (``lr / initial_lr``)."""
    scale = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
    return group["adam_lr"] * scale


def adamw_many_(
    params: list[Tensor],
    group: dict[str, Any],
    states: list[dict[str, Any]],
    lr_scale: float = 1.0,
) -> None:
    """One AdamW step (decoupled weight decay, bias correction) of the parameters of one
    param group, in place, from their ``.grad``, with ``torch._foreach`` operations per step
    count.

    Args:
        params: the parameters (with gradients).
        group: their param group.
        states: their optimizer states (created on the first call).
        lr_scale: multiplies the learning rate (the warm-up factor).
    """
    lr = fallback_lr(group) * lr_scale
    beta1, beta2 = group["adam_betas"]
    by_step: dict[int, list[int]] = {}
    for i, (p, state) in enumerate(zip(params, states)):
        if "exp_avg" not in state:
            state["adam_step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["adam_step"] = t = int(state["adam_step"]) + 1
        by_step.setdefault(t, []).append(i)
    for t, members in by_step.items():
        ps = [params[i] for i in members]
        grads = [p.grad for p in ps]
        avg = [states[i]["exp_avg"] for i in members]
        avg_sq = [states[i]["exp_avg_sq"] for i in members]
        torch._foreach_lerp_(avg, grads, 1 - beta1)
        torch._foreach_mul_(avg_sq, beta2)
        torch._foreach_addcmul_(avg_sq, grads, grads, value=1 - beta2)
        denom = torch._foreach_div(avg_sq, 1 - beta2**t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["adam_eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(ps, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(ps, avg, denom, value=-lr / (1 - beta1**t))


def step_counter_as_int(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a saved per-parameter state whose step counters are Python ints (older
    checkpoints stored tensors, which ``load_state_dict`` would cast to the parameter dtype)."""
    out = dict(state)
    for key in ("adam_step", "graft_step"):
        if isinstance(out.get(key), Tensor):
            out[key] = int(out[key].item())
    return out


def check_adamw(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for invalid fallback settings of a group."""
    if group["adam_lr"] < 0:
        raise ValueError(f"adam_lr must be non-negative, got {group['adam_lr']}")


__all__ = [
    "ADAMW_DEFAULTS",
    "adamw_many_",
    "check_adamw",
    "fallback_lr",
    "step_counter_as_int",
]
