"""The quantity plug-in interface.

A quantity declares what it needs from the engine (:meth:`Quantity.needs`: which vectors to
backpropagate, whether the ordinary gradient is wanted) and reduces the engine's
:class:`~beyondgrad.engine.Statistics` (:meth:`Quantity.compute`). Most quantities are one
reduction of a parameter's form (:meth:`Quantity.reduce`); the default :meth:`compute` applies it
to every parameter. Adding a quantity is one subclass in one file plus its export; the engine
never changes.

Conventions (API):

* A *sample* is a slice along the leading axis of the model input; other axes (sequence
  positions, spatial positions) are *shared*: their contributions are summed into the sample's
  gradient.
* Per-sample gradients ``g_n`` refer to the loss as ``loss_fn`` defines it, reduction included:
  ``sum_n g_n == grad`` (with ``reduction="mean"`` each ``g_n`` carries the factor 1/N).
* With ``subsampling``, per-sample quantities use only the selected samples (in the given
  order); :class:`~beyondgrad.Grad` always uses the whole batch.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from ..engine import GRAD, Backprop, Needs, ReduceContext, Statistics, VectorKind
from ..forms import Form

__all__ = ["Needs", "Quantity", "ReduceContext"]


class Quantity:
    """Base class of every quantity.

    Class attributes:
        per_sample: computed from individual samples (subject to ``subsampling`` and to the
            checks that samples are independent).
        order: reduction order within one result (lower first; per-sample gradients go
            first so that the other reductions read the materialized rows).
        reuses_out: whether ``compute(..., out=previous_result)`` may write into the previous
            result's tensors.
    """

    per_sample: ClassVar[bool] = True
    order: ClassVar[int] = 1
    reuses_out: ClassVar[bool] = False

    @property
    def key(self) -> str:
        """The quantity's name (its class name)."""
        return type(self).__name__

    @property
    def vectors(self) -> VectorKind:
        """Which output-space vectors the engine backpropagates for it: ``("grad", 1)`` (the
        loss gradient), ``("exact", 0)`` (loss-Hessian square-root columns) or ``("mc", M)``."""
        return GRAD

    @property
    def separate_pass(self) -> bool:
        """Whether it runs its own pass over ``(model, loss_fn, X, y)`` instead of reducing
        the engine's statistics (see :meth:`compute_separately`)."""
        return False

    def needs(self) -> Needs:
        """What the engine must provide (default: the form of :attr:`vectors`)."""
        return Needs(kinds=(self.vectors,), max_vectors=getattr(self, "max_vectors", None))

    def prepare(self, graph: Backprop, loss: Tensor, output: Tensor, names: dict[int, str]) -> Any:
        """Optional work on the live graph before the engine's main backward pass (e.g. the
        residual terms of the Hessian diagonal). Whatever it returns reaches :meth:`compute`
        as ``prepared``. Default: nothing.

        Args:
            graph: the recorded graph of the batch.
            loss: the scalar loss (its graph is retained).
            output: the model output.
            names: ``{id(parameter): name}``.

        Returns:
            Anything; passed to :meth:`compute` as ``prepared``.
        """
        return None

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The quantity for one parameter from its form.

        Args:
            form: the parameter's merged form (restricted to the subsample if per-sample).
            ctx: batch size and loss reduction.
            out: a tensor the result may be written into.
        """
        raise NotImplementedError

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict[str, Tensor] | None = None
    ) -> dict[str, Any]:
        """The quantity for every parameter served, ``{parameter name: tensor}``: applies
        :meth:`reduce` to each parameter's form (zeros for parameters the loss does not reach).

        Args:
            stats: the engine's statistics of the batch.
            prepared: what :meth:`prepare` returned.
            out: the previous result of this quantity (its tensors may be overwritten when
                :attr:`reuses_out`).
        """
        values: dict[str, Any] = {}
        ctx = stats.context
        for name in stats.parameters:
            form = stats.form(name, self.vectors, self.per_sample)
            if form is None:
                values[name] = self.reduce(stats.zero_form(name, self.per_sample), ctx)
                continue
            buffer = _buffer(out, name, form, stats.parameter(name)) if self.reuses_out else None
            values[name] = self.reduce(form, ctx, buffer)
        return values

    def compute_separately(
        self, model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor
    ) -> dict[str, Tensor]:
        """For :attr:`separate_pass` quantities: the values from their own pass.

        Args:
            model: the model.
            loss_fn: the loss module.
            X: the input batch.
            y: the targets.

        Returns:
            ``{parameter name: tensor}``, as :meth:`compute` would return.
        """
        raise NotImplementedError


def _buffer(out: dict[str, Tensor] | None, name: str, form: Form, param: Tensor) -> Tensor | None:
    """The tensor of a previous result that may receive parameter ``name``'s rows."""
    if out is None:
        return None
    buf = out.get(name)
    shape = (form.rows, *param.shape)
    if buf is None or buf.shape != shape or buf.dtype != param.dtype or buf.device != param.device:
        return None
    return buf
