"""The update of a tracked step: ``theta_{t+1} - theta_t``, measured after ``optimizer.step()``
(a step post-hook) or at the next tracked step, and Alpha's start point along it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._engine import Rows
from .reductions import directional


@dataclass
class Armed:
    """A tracked step waiting for its update: its record, the parameters before the update,
    and (for Alpha) its per-sample rows and loss terms."""

    record: dict[str, Any]
    before: dict[str, Tensor]
    rows: dict[str, Rows] | None
    losses: Tensor | None
    c: float


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
    ) -> None:
        """Snapshot the parameters before the update of the step of ``record``."""
        self.armed = Armed(record, self.snapshot(), rows, losses, c)

    def resolve(self, step: int | None) -> Update | None:
        """Measure the armed step's update (None if none is armed, or if ``step`` is not
        the step right after it: the parameters moved more than one step)."""
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
            start = {
                "step": armed.record["step"],
                "direction": delta,
                "losses": armed.losses,
                "derivatives": directional(armed.rows, delta) * armed.c,
            }
        return Update(armed.record, delta, dict(zip(names, sizes.tolist())), start)


__all__ = ["Update", "UpdateTracker"]
