"""Quantities: what users ask ``bg.compute`` for.

Each quantity reduces a parameter's per-sample gradient form (:mod:`beyondgrad.rules.forms`) to
one tensor. Conventions (API):

* A *sample* is a slice along the leading axis of the model input; other axes (sequence
  positions, spatial positions) are *shared*: their contributions are summed into the sample's
  gradient.
* Per-sample gradients ``g_n`` refer to the loss as ``loss_fn`` defines it, reduction included:
  ``sum_n g_n == grad`` (with ``reduction="mean"`` each ``g_n`` carries the factor 1/N).
* With ``subsampling``, per-sample quantities (everything but :class:`Grad`) use only the
  selected samples (in the given order); :class:`Grad` always uses the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .rules.forms import Form


@dataclass(frozen=True)
class ReduceContext:
    """What reductions may need besides the form: the batch size ``N`` of the loss and its
    reduction (``"mean"`` or ``"sum"``)."""

    num_samples: int
    reduction: str


class Quantity:
    """Base class. ``per_sample``: whether it is computed from individual samples (and so
    subject to ``subsampling`` and to the checks that samples are independent)."""

    per_sample: ClassVar[bool] = True

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The quantity for one parameter; ``out``: a tensor the result may be written into."""
        raise NotImplementedError

    @property
    def key(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Grad(Quantity):
    """The gradient of the loss, parameter-shaped (always over the whole batch)."""

    per_sample: ClassVar[bool] = False

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.grad()


@dataclass(frozen=True)
class BatchGrad(Quantity):
    """Per-sample gradients ``[N, *shape]``; they sum to :class:`Grad`."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.batch_grad(out)


@dataclass(frozen=True)
class BatchL2(Quantity):
    """Squared L2 norms of the per-sample gradients of each parameter, ``[N]``. Sum over
    parameters for the norm of the whole per-sample gradient. Computed without materializing
    per-sample gradients where that is cheaper (Gram trick)."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.batch_l2()


@dataclass(frozen=True)
class BatchDot(Quantity):
    """Inner products ``<g_n, g_m>`` of per-sample gradients of each parameter, ``[N, N]``."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.batch_dot()


@dataclass(frozen=True)
class SumGradSquared(Quantity):
    """``sum_n g_n ** 2`` (element-wise), parameter-shaped: the second moment used by Adam-like
    methods and the diagonal of the empirical Fisher of the loss."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.sum_grad_squared()


@dataclass(frozen=True)
class Variance(Quantity):
    """Element-wise variance of the individual gradients across the samples, parameter-shaped.

    The individual gradient of sample ``n`` is ``c * g_n`` with ``c = N`` for
    ``reduction="mean"`` (so it is the gradient of the per-sample loss, and their mean is the
    batch gradient) and ``c = 1`` for ``"sum"``. Biased (1/S) estimator over the S (sub)samples:
    ``c^2 * sum_n g_n^2 / S - (c * sum_n g_n / S)^2``, clamped at 0 against round-off.
    """

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        c = float(ctx.num_samples) if ctx.reduction == "mean" else 1.0
        S = form.num_samples
        var = form.sum_grad_squared().mul(c * c / S)
        g = form.grad()
        return var.addcmul_(g, g, value=-((c / S) ** 2)).clamp_min_(0)


FIRST_ORDER: tuple[type[Quantity], ...] = (
    Grad,
    BatchGrad,
    BatchL2,
    BatchDot,
    SumGradSquared,
    Variance,
)
