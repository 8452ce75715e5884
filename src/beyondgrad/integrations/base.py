"""The part both trainer callbacks share: their constructor, and building the Cockpit for the
trainer's model (the loss module found, the log directory defaulted, the step tracker).

Framework-free: :mod:`~beyondgrad.integrations.lightning` and
:mod:`~beyondgrad.integrations.huggingface` mix it into their framework's callback class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..cockpit import Cockpit
from .tracking import StepTracker, find_loss_fn


class CockpitCallbackBase:
    """A trainer callback that attaches a :class:`~beyondgrad.cockpit.Cockpit`.

    Args:
        config: the Cockpit's instruments (``"economy"``, ``"business"``, ``"full"`` or names).
        loss_fn: the loss module, or its attribute name on the model (default: the attribute
            ``loss_fn``, else the model's only ``torch.nn`` loss module; see
            :func:`~beyondgrad.integrations.tracking.find_loss_fn`).
        log_dir: where the Cockpit writes ``cockpit.jsonl`` and its dashboard (default: the
            trainer's directory, see :meth:`attach`).
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
        super().__init__()
        self.config, self.loss_fn, self.log_dir = config, loss_fn, log_dir
        self.options = cockpit_options
        self.cockpit: Cockpit | None = None
        self._tracker: StepTracker | None = None
        self._loss_module: nn.Module | None = None

    def attach(self, model: nn.Module, default_log_dir: str | Path) -> Cockpit:
        """Build the Cockpit for ``model`` and its step tracker.

        Args:
            model: the trained model (its training step calls the loss module).
            default_log_dir: the log directory when none was given.

        Returns:
            The new Cockpit (also :attr:`cockpit`).

        Raises:
            ValueError: the loss module cannot be found (pass ``loss_fn=``).
        """
        self._loss_module = find_loss_fn(model, self.loss_fn)
        log_dir = self.log_dir if self.log_dir is not None else default_log_dir
        self.cockpit = Cockpit(
            model, self._loss_module, self.config, log_dir=log_dir, **self.options
        )
        self._tracker = StepTracker(self.cockpit)
        return self.cockpit


__all__ = ["CockpitCallbackBase"]
