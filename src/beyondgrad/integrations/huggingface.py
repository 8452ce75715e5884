"""Hugging Face ``transformers``: the Cockpit as a ``Trainer`` callback, one line.

::

    from beyondgrad.integrations.huggingface import CockpitCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[CockpitCallback("economy")])

The model computes its training loss with a loss module called as ``loss_fn(logits, labels)``
inside its ``forward`` (found as the attribute ``loss_fn`` or as the model's only ``torch.nn``
loss module, else pass ``loss_fn=``); models that call ``F.cross_entropy`` directly have no
module to watch. A beyondgrad optimizer passed as ``Trainer(optimizers=(opt, scheduler))`` gets
its forward pass recorded (``optimizer.capture()``), closed as soon as the loss exists.

Per step the Cockpit's context opens at ``on_step_begin`` and closes when the backward pass
has finished (a callback queued on autograd's engine when the backward starts), so it reads
the gradient before the Trainer clips it (``max_grad_norm``). The Cockpit's records go to
``log_dir`` (default ``<args.output_dir>/cockpit``); ``tensorboard=``/``wandb=`` as for the
Cockpit. One process, no gradient accumulation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from .base import CockpitCallbackBase


class CockpitCallback(CockpitCallbackBase, TrainerCallback):
    """Attach a :class:`~beyondgrad.cockpit.Cockpit` to a ``transformers.Trainer``.

    Args:
        config: the Cockpit's instruments (``"economy"``, ``"business"``, ``"full"`` or names).
        loss_fn: the loss module, or its attribute name on the model (default: found, see
            the module docstring).
        log_dir: where the Cockpit writes ``cockpit.jsonl`` and its dashboard (default
            ``<args.output_dir>/cockpit``).
        **cockpit_options: passed to :class:`~beyondgrad.cockpit.Cockpit` (``schedule``,
            ``plot_every``, ``tensorboard``, ``wandb``, ...).
    """

    def __init__(
        self,
        config: Any = "economy",
        loss_fn: nn.Module | str | None = None,
        log_dir: str | Path | None = None,
        **cockpit_options: Any,
    ):
        super().__init__(config, loss_fn, log_dir, **cockpit_options)
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the Cockpit for the Trainer's model (once)."""
        if args.gradient_accumulation_steps != 1:
            raise RuntimeError("the Cockpit callback needs gradient_accumulation_steps=1")
        if self.cockpit is None:
            self.attach(kwargs["model"], Path(args.output_dir) / "cockpit")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Open the step before the forward pass."""
        if self._tracker is None or self._loss_module is None:
            return
        optimizer = kwargs.get("optimizer")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self._tracker.begin(state.global_step, optimizer)
        self._remove_hook()  # registered after the step's own hooks: it runs last
        self._handle = self._loss_module.register_forward_hook(self._on_loss)

    def _on_loss(self, module: nn.Module, args: tuple, loss: Tensor) -> None:
        if not torch.is_grad_enabled() or self._tracker is None:
            return
        self._remove_hook()
        self._tracker.forward_done()
        if loss.requires_grad:
            loss.register_hook(self._on_backward_start)

    def _on_backward_start(self, grad: Tensor) -> None:
        engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        if self._tracker is not None:
            self._tracker.end()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """A step whose backward did not reach the loss hook is closed here."""
        if self._tracker is not None:
            self._tracker.end()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Close a step left open and the Cockpit (final dashboard if asked)."""
        self._remove_hook()
        if self._tracker is not None:
            self._tracker.abort()
        if self.cockpit is not None:
            self.cockpit.close()

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


__all__ = ["CockpitCallback"]
