"""First-order quantities: the gradient, per-sample gradients and their statistics, all from
the loss-gradient vectors (``("grad", 1)``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..engine import Needs, ReduceContext, Statistics
from ..forms import Form
from ..forms.base import CHUNK_ELEMENTS
from .base import Quantity


@dataclass(frozen=True)
class Grad(Quantity):
    """The gradient of the loss, parameter-shaped (always over the whole batch); from autograd
    where that is cheapest."""

    per_sample: ClassVar[bool] = False

    def needs(self) -> Needs:
        """Only the ordinary gradient."""
        return Needs(gradient=True)

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The sum of the form's rows."""
        return form.grad()

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict[str, Tensor] | None = None
    ) -> dict[str, Any]:
        """``{name: gradient}`` for every served parameter (zeros where unreached)."""
        return {name: stats.gradient(name) for name in stats.parameters}


@dataclass(frozen=True)
class BatchGrad(Quantity):
    """Per-sample gradients ``[N, *shape]``; they sum to :class:`Grad`."""

    order: ClassVar[int] = 0
    reuses_out: ClassVar[bool] = True

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The form's rows."""
        return form.batch_grad(out)


@dataclass(frozen=True)
class BatchL2(Quantity):
    """Squared L2 norms of the per-sample gradients of each parameter, ``[N]``. Sum over
    parameters for the norm of the whole per-sample gradient. Computed without materializing
    per-sample gradients where that is cheaper (Gram trick)."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """Squared row norms."""
        return form.batch_l2()


@dataclass(frozen=True)
class BatchDot(Quantity):
    """Inner products ``<g_n, g_m>`` of per-sample gradients of each parameter, ``[N, N]``."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The Gram matrix of the rows."""
        return form.batch_dot()


@dataclass(frozen=True)
class SumGradSquared(Quantity):
    """``sum_n g_n ** 2`` (element-wise), parameter-shaped: the second moment used by Adam-like
    methods; divided by the loss reduction factor ``R`` it is the empirical-Fisher diagonal
    ``R sum_n (grad l_n)^2`` (KFAC-tutorial convention)."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """Sum of squared rows."""
        return form.sum_grad_squared()


@dataclass(frozen=True)
class Variance(Quantity):
    """Element-wise variance of the individual gradients across the samples, parameter-shaped.

    The individual gradient of sample ``n`` is ``c * g_n`` with ``c = N`` for
    ``reduction="mean"`` (so it is the gradient of the per-sample loss, and their mean is the
    batch gradient) and ``c = 1`` for ``"sum"``. Biased (1/S) estimator over the S (sub)samples, in
    the centred form ``c^2 / S * sum_n (g_n - gbar)^2`` with ``gbar = sum_n g_n / S`` (no
    cancellation when the spread is tiny compared with the mean). The rows are formed in chunks
    of samples (at most about ``2^24`` elements at a time).
    """

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """Centred second moment of the rows (one vector per sample)."""
        c = float(ctx.num_samples) if ctx.reduction == "mean" else 1.0
        S = form.num_samples
        mean = form.grad() / S
        if form.materialized:
            return (form.batch_grad() - mean).square_().sum(0).mul_(c * c / S)
        total = torch.zeros_like(mean)
        step = max(1, CHUNK_ELEMENTS // max(1, mean.numel()))
        for start in range(0, S, step):
            index = torch.arange(start, min(S, start + step), device=mean.device)
            total += (form.select(index).batch_grad() - mean).square_().sum(0)
        return total.mul_(c * c / S)
