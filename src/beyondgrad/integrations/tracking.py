"""What both trainer callbacks share: the loss module of a model, and the open contexts of
one tracked step (the Cockpit's, and a beyondgrad optimizer's forward capture)."""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from ..cockpit import Cockpit


def find_loss_fn(model: nn.Module, loss_fn: nn.Module | str | None = None) -> nn.Module:
    """The loss module the Cockpit watches.

    Args:
        model: the trained module (a ``LightningModule``, a ``transformers`` model, ...).
        loss_fn: the loss module itself, the name of the model's attribute holding it, or
            None: the attribute ``loss_fn``, else the model's only ``torch.nn`` loss module.

    Returns:
        The loss module (``reduction="mean"`` or ``"sum"``), called by the model's training
        step as ``loss_fn(output, target)``.

    Raises:
        ValueError: none, or several candidates (pass ``loss_fn=``).
    """
    if isinstance(loss_fn, nn.Module):
        return loss_fn
    if isinstance(loss_fn, str):
        found = getattr(model, loss_fn, None)
        if not isinstance(found, nn.Module):
            raise ValueError(f"the model has no loss module attribute {loss_fn!r}")
        return found
    if isinstance(getattr(model, "loss_fn", None), nn.Module):
        return model.loss_fn  # type: ignore[return-value]
    losses = [m for m in model.modules() if isinstance(m, nn.modules.loss._Loss)]
    if len(losses) != 1:
        raise ValueError(
            f"found {len(losses)} torch.nn loss modules in the model; the Cockpit watches the "
            "loss module that the training step calls as loss_fn(output, target): pass "
            "loss_fn= (the module or the name of its attribute)"
        )
    return losses[0]


def scalars(record: dict[str, Any] | None, prefix: str = "cockpit/") -> dict[str, float]:
    """The finite numbers of a Cockpit record (``step`` left out), keys prefixed."""
    if not record:
        return {}
    return {
        f"{prefix}{k}": float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
    }


class StepTracker:
    """The open contexts of one trainer step: :meth:`begin` before the forward pass,
    :meth:`forward_done` once the loss exists (closes a beyondgrad optimizer's capture),
    :meth:`end` after the backward pass (the Cockpit measures), :meth:`abort` on an error.

    Args:
        cockpit: the Cockpit of the trained model.
    """

    def __init__(self, cockpit: Cockpit):
        self.cockpit = cockpit
        self._step: ExitStack | None = None
        self._capture: ExitStack | None = None
        #: the record of the last step that ended (updated in place with UpdateSize once the
        #: optimizer has stepped); None before the first
        self.last: dict[str, Any] | None = None
        self._open: dict[str, Any] | None = None

    def begin(self, step: int, optimizer: torch.optim.Optimizer | None) -> None:
        """Open the step's contexts (a step still open is aborted first)."""
        self.abort()
        stack = ExitStack()
        self._open = stack.enter_context(self.cockpit(step, optimizer=optimizer))
        self._step = stack
        if optimizer is not None and hasattr(optimizer, "capture"):
            capture = ExitStack()
            capture.enter_context(optimizer.capture())
            self._capture = capture

    def forward_done(self) -> None:
        """Close a beyondgrad optimizer's capture (its curvature pass runs now)."""
        capture, self._capture = self._capture, None
        if capture is not None:
            capture.close()

    def end(self) -> None:
        """Close the Cockpit's context after the backward pass (the instruments are read)."""
        self.forward_done()
        stack, self._step = self._step, None
        if stack is not None:
            stack.close()
            if self._open is not None:
                self.last = self._open
        self._open = None

    def abort(self) -> None:
        """Drop a step left open (an exception in the trainer); nothing is recorded."""
        error = RuntimeError("the trainer step was aborted")
        for name in ("_capture", "_step"):
            stack = getattr(self, name)
            setattr(self, name, None)
            if stack is not None:
                stack.__exit__(RuntimeError, error, None)
        self._open = None


__all__ = ["StepTracker", "find_loss_fn", "scalars"]
