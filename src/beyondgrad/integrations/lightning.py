"""PyTorch Lightning: the Cockpit as a callback, one line.

::

    from beyondgrad.integrations.lightning import CockpitCallback

    trainer = lightning.Trainer(callbacks=[CockpitCallback("economy")], ...)

The ``LightningModule`` computes its training loss with a loss module
(``self.loss_fn(self(x), y)``; found as the attribute ``loss_fn`` or as the model's only
``torch.nn`` loss module, else pass ``loss_fn=``). A beyondgrad optimizer returned by
``configure_optimizers`` (``bg.optim.KFAC(self, self.loss_fn)``, SINGD, SIRFShampoo) works: the
callback records its forward pass (``optimizer.capture()``) as a hand-written loop would.
Per step: the Cockpit's context opens at ``on_train_batch_start`` and closes at
``on_after_backward`` (before gradient clipping); its numbers go to ``log_dir`` (default
``<trainer.log_dir>/cockpit``) and, with ``log_to_trainer=True``, to the trainer's loggers as
``cockpit/<name>``. The Cockpit's state is saved in Lightning checkpoints (``state_dict``), so a
resumed fit logs what an uninterrupted one logs. Automatic optimization, one optimizer, no
gradient accumulation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .base import CockpitCallbackBase
from .tracking import scalars

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl  # type: ignore[no-redef]


class CockpitCallback(CockpitCallbackBase, pl.Callback):
    """Attach a :class:`~beyondgrad.cockpit.Cockpit` to a Lightning fit.

    Args:
        config: the Cockpit's instruments (``"economy"``, ``"business"``, ``"full"`` or names).
        loss_fn: the loss module, or its attribute name on the ``LightningModule`` (default:
            found, see the module docstring).
        log_dir: where the Cockpit writes ``cockpit.jsonl`` and its dashboard (default
            ``<trainer.log_dir>/cockpit``).
        log_to_trainer: also send each step's numbers to the trainer's loggers.
        **cockpit_options: passed to :class:`~beyondgrad.cockpit.Cockpit` (``schedule``,
            ``plot_every``, ``tensorboard``, ``wandb``, ...).
    """

    def __init__(
        self,
        config: Any = "economy",
        loss_fn: nn.Module | str | None = None,
        log_dir: str | Path | None = None,
        log_to_trainer: bool = True,
        **cockpit_options: Any,
    ):
        super().__init__(config, loss_fn, log_dir, **cockpit_options)
        self.log_to_trainer = log_to_trainer
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Build the Cockpit for a fit (once), restoring a checkpointed state."""
        if stage != "fit" or self.cockpit is not None:
            return
        cockpit = self.attach(
            pl_module, Path(trainer.log_dir or trainer.default_root_dir) / "cockpit"
        )
        if self._pending_state is not None:
            cockpit.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Open the step: the Cockpit (and a beyondgrad optimizer's capture) record the
        forward pass."""
        if self._tracker is None:
            return
        if trainer.accumulate_grad_batches != 1 or not pl_module.automatic_optimization:
            raise RuntimeError(
                "CockpitCallback needs automatic optimization without gradient accumulation"
            )
        self._forward(trainer)
        pl_module.zero_grad(set_to_none=True)  # Lightning zeroes them before the backward too
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._tracker.begin(trainer.global_step, optimizer)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        """The loss exists: a beyondgrad optimizer's capture runs its curvature pass."""
        if self._tracker is not None:
            self._tracker.forward_done()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        """The backward pass is done: the Cockpit reads its instruments."""
        if self._tracker is not None:
            self._tracker.end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close a step left open."""
        if self._tracker is not None:
            self._tracker.abort()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Send the last step's numbers; close the Cockpit (final dashboard if asked)."""
        if self._tracker is not None:
            self._forward(trainer)
        if self.cockpit is not None:
            self.cockpit.close()

    def _forward(self, trainer: Any) -> None:
        tracker = self._tracker
        if not self.log_to_trainer or tracker is None or tracker.last is None:
            return
        values, step = scalars(tracker.last), tracker.last["step"]
        tracker.last = None
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    def state_dict(self) -> dict[str, Any]:
        """The Cockpit's state (saved in Lightning checkpoints)."""
        if self.cockpit is not None:
            return {"cockpit": self.cockpit.state_dict()}
        return {"cockpit": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied when the Cockpit is built, if it is not yet)."""
        state = state_dict.get("cockpit")
        if state is None:
            return
        if self.cockpit is not None:
            self.cockpit.load_state_dict(state)
        else:
            self._pending_state = state


__all__ = ["CockpitCallback"]
