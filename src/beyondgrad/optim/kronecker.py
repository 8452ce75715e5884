"""What KFAC and SINGD share: layers preconditioned by Kronecker factors of the engine's
curvature statistics.

A layer (Linear, convolution, ...; a joint bias) is preconditioned when the engine has a
Kronecker rule for it that the method accepts, it is the only user of its parameters, and its
weight and bias sit in one param group with ``precondition=True``; every other parameter goes
to the AdamW fallback (``routing()``). On statistics steps ``capture()`` asks the engine for
the layer's raw Kronecker sums (input side ``A``, output side ``B``; see
:class:`~beyondgrad.KFAC` for the curvature conventions), accumulates them over the blocks
before the step and averages them over samples and ranks at the step
(:class:`~beyondgrad.optim.statistics.KroneckerAccumulator`). A layer the engine gives no
Kronecker block in the first captured pass (e.g. applied functionally by its parent) goes to
the fallback.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ._engine import (
    KroneckerRecording,
    KroneckerSums,
    kronecker_quantity,
    record_kronecker_sums,
)
from .base import CurvatureOptimizer
from .routing import NO_STATISTICS, kronecker_layers
from .statistics import KroneckerAccumulator


class KroneckerOptimizer(CurvatureOptimizer):
    """Base of :class:`~beyondgrad.optim.KFAC` and :class:`~beyondgrad.optim.SINGD`.

    Args:
        model, params, defaults, loss_fn, seed: as for :class:`CurvatureOptimizer`.
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"`` curvature statistics.
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers with a shared axis.
        mc_samples: Monte-Carlo samples per data point (``"mc"``).
        statistics_dtype: form the Kronecker sums from copies of the layer inputs and output
            gradients in this floating dtype (e.g. ``torch.bfloat16``), kept in the
            gradients' dtype; ``None``: exact (see :meth:`beyondgrad.engine.Statistics.
            take_kronecker`).
        statistics_from_backward: the empirical Fisher's statistics from the ordinary
            ``loss.backward()`` (no pass of their own; the gradients of everything
            backpropagated, an auxiliary loss added to ``loss`` included); ``False``: from
            ``loss_fn``'s output alone, by a backward pass of their own.

    Attributes:
        quantity: the engine quantity that produces the statistics.
    """

    rules: tuple[str, ...] = ()
    """The engine rules whose layers the method preconditions."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Iterable[Any] | None,
        defaults: dict[str, Any],
        fisher_type: str,
        kfac_approx: str,
        mc_samples: int,
        seed: int,
        statistics_dtype: torch.dtype | None = None,
        statistics_from_backward: bool = True,
    ):
        self.statistics_from_backward = statistics_from_backward
        self.statistics_dtype = check_dtype("statistics_dtype", statistics_dtype)
        self.quantity = kronecker_quantity(fisher_type, kfac_approx, mc_samples)
        super().__init__(model, params, defaults, loss_fn, seed)
        self._accumulator = KroneckerAccumulator()
        self._pending: list[KroneckerRecording] = []  # empirical: waiting for the backward
        self._take_layers(*kronecker_layers(self.model, self.rules, self._accept))

    @staticmethod
    def _accept(module: nn.Module) -> str | None:
        """A reason to refuse a module the rules accept, or None."""
        return None

    def _statistics_due(self) -> bool:
        """Whether ``capture`` collects statistics at this step."""
        raise NotImplementedError

    def _take_layers(self, layers: dict[str, tuple[str, ...]], refused: dict[str, str]) -> None:
        """Precondition these layers (module name -> weight and bias names) when all their
        parameters are optimized in one group with ``precondition=True``; route the rest."""
        self._refused = dict(refused)
        named = dict(self.model.named_parameters())
        taken: dict[str, str] = {}
        for name, pnames in layers.items():
            members = [named[n] for n in pnames]
            groups = {self._group_index.get(id(p)) for p in members}
            if len(groups) != 1 or None in groups:
                for n in pnames:
                    self._refused[n] = "its layer's weight and bias are not in one param group"
                continue
            if not self.group_of(members[0])["precondition"]:
                continue
            self.layers[name] = {"params": pnames}
            taken.update({n: f"Kronecker factors of layer '{name}'" for n in pnames})
        self._route(taken)

    @contextmanager
    def _record(self) -> Iterator[None]:
        if not self.layers or not self._statistics_due():
            yield
            return
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(
            self.seed * 1_000_003 + self.steps * 101 + self._accumulator.calls
        )
        owner = type(self).__name__
        with record_kronecker_sums(
            self.model,
            self.loss_fn,
            self.quantity,
            generator,
            owner,
            self.layers,
            self.statistics_dtype,
            self.statistics_from_backward,
        ) as recording:
            yield
        if recording.deferred:  # empirical Fisher: added when the ordinary backward ends
            recording.sink = self._add_statistics
            self._pending.append(recording)
        else:
            self._add_statistics(recording.sums)

    def _add_statistics(self, sums: dict[str, KroneckerSums]) -> None:
        if self.steps == 0 and self._accumulator.calls == 0:
            for name in [n for n in self.layers if n not in sums]:
                self._drop_layer(name, NO_STATISTICS)
        ours = {n: s for n, s in sums.items() if n in self.layers}
        self._accumulator.add(ours)
        for name, s in ours.items():
            self.layers[name].setdefault("order", s.order)
            self.layers[name].setdefault("weight_perm", s.weight_perm)

    def _collect_statistics(self) -> dict[str, tuple[Tensor, Tensor]]:
        pending, self._pending = self._pending, []
        done = [r for r in pending if r.backpropagated]
        for recording in pending:  # never backpropagated: no gradient, no statistics
            if not recording.backpropagated:
                recording.discard()
        if pending and not done:
            raise RuntimeError(
                f"{type(self).__name__}(fisher_type='empirical') takes its statistics from the "
                "ordinary backward pass, but no loss.backward() reached the loss of the "
                "capture() block(s) before step()"
            )
        return self._accumulator.consume(self.layers, type(self).__name__)


def check_dtype(name: str, dtype: torch.dtype | None) -> torch.dtype | None:
    """``dtype`` if it is None or a floating torch dtype, else a ValueError naming ``name``."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{name} must be None or a floating dtype, got {dtype!r}")
    return dtype


__all__ = ["KroneckerOptimizer", "check_dtype"]
