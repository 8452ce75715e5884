"""The update of a tracked step: ``theta_{t+1} - theta_t``, measured after ``optimizer.step()``
(a step post-hook) or at the next tracked step, and Alpha's start point along it.

Alpha's start point needs the per-sample directional derivatives ``g_n . s`` along the update
``s``. In general they are projections of the per-sample rows onto ``s`` (one GEMM per layer).
When the step is known to be ``s = -lr * grad`` (plain :class:`torch.optim.SGD`: no momentum,
weight decay or ``maximize``, one learning rate, applied to the very gradients the rows sum to)
they are ``-lr * g_n . grad``, the gradient tests' dot products, and no projection is formed
(:class:`GradStep`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._engine import Rows, dense_layers
from .reductions import directional


def plain_sgd_lr(optimizer: Any, params: list[Tensor]) -> float | None:
    """The learning rate ``lr`` when ``optimizer.step()`` moves each of ``params`` by exactly
    ``-lr * p.grad``: a :class:`torch.optim.SGD` (not a subclass) without momentum, weight
    decay or ``maximize``, holding every one of ``params`` at one learning rate; else None."""
    if type(optimizer) is not torch.optim.SGD:
        return None
    rates, held = set(), set()
    for group in optimizer.param_groups:
        if group.get("momentum", 0) or group.get("weight_decay", 0) or group.get("maximize"):
            return None
        held.update(id(p) for p in group["params"])
        rates.add(float(group["lr"]))
    if len(rates) != 1 or any(id(p) not in held for p in params):
        return None
    return rates.pop()


@dataclass
class GradStep:
    """Alpha's start derivatives for an update that turns out to be ``-lr * grad``.

    Args:
        along_grad: ``c * r_n . grad`` per sample (``[B]``, float64; ``r_n`` the unscaled
            rows, ``grad`` their sum, the loss gradient), i.e. the derivatives along
            ``grad`` in the scaling of Alpha's derivatives.
        grads: ``(parameter, its .grad, that tensor's version)`` when the rows were read:
            the step must use exactly these, unmodified (no clipping, no accumulation).
    """

    along_grad: Tensor
    grads: list[tuple[Tensor, Tensor, int]]
    #: the learning rate once :meth:`derivatives` confirmed the step
    lr: float | None = None

    def derivatives(self, optimizer: Any) -> Tensor | None:
        """``-lr * along_grad`` if ``optimizer``'s last step was ``-lr * grad``, else None."""
        if optimizer is None:
            return None
        lr = plain_sgd_lr(optimizer, [p for p, _, _ in self.grads])
        if lr is None or any(p.grad is not g or g._version != v for p, g, v in self.grads):
            return None
        self.lr = lr
        return self.along_grad * -lr


@dataclass
class Armed:
    """A tracked step waiting for its update: its record, the parameters before the update,
    and (for Alpha) its per-sample rows and loss terms, and the shortcut for a gradient
    step."""

    record: dict[str, Any]
    before: dict[str, Tensor]
    rows: dict[str, Rows] | None
    losses: Tensor | None
    c: float
    grad_step: GradStep | None = None


@dataclass
class Update:
    """A measured update: per parameter the step ``delta`` and its norm; Alpha's start point
    (per-sample loss terms and directional derivatives along ``delta``) when armed for it."""

    record: dict[str, Any]
    delta: dict[str, Tensor]
    norms: dict[str, float]
    alpha_start: dict[str, Any] | None


class UpdateTracker:
    """Parameter snapshots in two reused buffer sets (fresh large allocations cost page
    faults every step; two because the previous update stays in use as Alpha's direction
    until the next tracked step has been measured)."""

    def __init__(self, params: dict[str, Tensor]):
        self.params = params
        self._buffers: list[dict[str, Tensor] | None] = [None, None]
        self._flip = 0
        self.armed: Armed | None = None

    def snapshot(self) -> dict[str, Tensor]:
        """The current parameters, copied into the next buffer set."""
        self._flip = 1 - self._flip
        buf = self._buffers[self._flip]
        if buf is None or any(
            buf[n].shape != p.shape or buf[n].dtype != p.dtype or buf[n].device != p.device
            for n, p in self.params.items()
        ):
            buf = {
                n: torch.empty_like(p, memory_format=torch.contiguous_format)
                for n, p in self.params.items()
            }
            self._buffers[self._flip] = buf
        torch._foreach_copy_(
            [buf[n] for n in self.params], [p.detach() for p in self.params.values()]
        )
        return buf

    def arm(
        self,
        record: dict[str, Any],
        rows: dict[str, Rows] | None,
        losses: Tensor | None,
        c: float,
        grad_step: GradStep | None = None,
    ) -> None:
        """Snapshot the parameters before the update of the step of ``record``."""
        self.armed = Armed(record, self.snapshot(), rows, losses, c, grad_step)

    def resolve(self, step: int | None, optimizer: Any = None) -> Update | None:
        """Measure the armed step's update (None if none is armed, or if ``step`` is not
        the step right after it: the parameters moved more than one step); ``optimizer``:
        the one whose step just ran (its gradient step spares Alpha's projections)."""
        armed, self.armed = self.armed, None
        if armed is None:
            return None
        if step is not None and step != armed.record["step"] + 1:
            return None
        names = list(self.params)
        diffs = [armed.before[n] for n in names]  # before - after, negated, in place
        torch._foreach_sub_(diffs, [self.params[n].detach() for n in names])
        torch._foreach_neg_(diffs)
        sizes = torch.stack(torch._foreach_norm(diffs)).double().cpu()
        delta = dict(zip(names, diffs))
        start = None
        if armed.rows is not None:
            shortcut = armed.grad_step
            derivatives = None if shortcut is None else shortcut.derivatives(optimizer)
            if derivatives is None:
                derivatives = directional(armed.rows, delta) * armed.c
            start = {
                "step": armed.record["step"],
                "direction": delta,
                "losses": armed.losses,
                "derivatives": derivatives,
            }
            if shortcut is not None and shortcut.lr is not None:  # delta = -lr * sum of rows
                kept = [layer.keep() for layer in dense_layers(armed.rows)]
                start.update(rows=kept, lr=shortcut.lr)
        return Update(armed.record, delta, dict(zip(names, sizes.tolist())), start)


__all__ = ["Armed", "GradStep", "Update", "UpdateTracker", "plain_sgd_lr"]
