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
        """The sum of the form's rows: the parameter's gradient.

        Args:
            form: the parameter's form (whole batch).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            Parameter-shaped tensor, on the loss's scale (reduction included).
        """
        return form.grad()

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict[str, Tensor] | None = None
    ) -> dict[str, Any]:
        """``{name: gradient}`` for every served parameter (zeros where unreached).

        Args:
            stats: the engine's statistics of the batch (its autograd gradients).
            prepared: unused.
            out: unused.

        Returns:
            ``{parameter name: parameter-shaped gradient}`` over the whole batch.
        """
        return {name: stats.gradient(name) for name in stats.parameters}


@dataclass(frozen=True)
class BatchGrad(Quantity):
    """Per-sample gradients ``[N, *shape]``; they sum to :class:`Grad`."""

    order: ClassVar[int] = 0
    reuses_out: ClassVar[bool] = True

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The form's rows: the per-sample gradients.

        Args:
            form: the parameter's form (restricted to the subsample).
            ctx: batch size and loss reduction (unused).
            out: a ``[N, *shape]`` tensor of a previous result the rows may be written into.

        Returns:
            ``[N, *shape]`` (``N``: the (sub)samples); they sum to the gradient.
        """
        return form.batch_grad(out)


@dataclass(frozen=True)
class BatchL2(Quantity):
    """Squared L2 norms of the per-sample gradients of each parameter, ``[N]``. Sum over
    parameters for the norm of the whole per-sample gradient. Computed without materializing
    per-sample gradients where that is cheaper (Gram trick)."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """Squared row norms.

        Args:
            form: the parameter's form (restricted to the subsample).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            ``[N]``, the squared L2 norm of each per-sample gradient of this parameter.
        """
        return form.batch_l2()


@dataclass(frozen=True)
class BatchDot(Quantity):
    """Inner products ``<g_n, g_m>`` of per-sample gradients of each parameter, ``[N, N]``."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The Gram matrix of the rows.

        Args:
            form: the parameter's form (restricted to the subsample).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            ``[N, N]`` with entries ``<g_n, g_m>``.
        """
        return form.batch_dot()


@dataclass(frozen=True)
class SumGradSquared(Quantity):
    """``sum_n g_n ** 2`` (element-wise), parameter-shaped: the second moment used by Adam-like
    methods; divided by the loss reduction factor ``R`` it is the empirical-Fisher diagonal
    ``R sum_n (grad l_n)^2`` (KFAC-tutorial convention)."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """Sum of squared rows.

        Args:
            form: the parameter's form (restricted to the subsample).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            Parameter-shaped ``sum_n g_n ** 2`` (element-wise).
        """
        return form.sum_grad_squared()


#: the uncentred variance is kept where it exceeds this many times its typical round-off
#: (``eps * sqrt(S)`` of the second moment): a relative error of about 1e-3 at most
CANCELLATION_MARGIN = 2.0**10


@dataclass(frozen=True)
class Variance(Quantity):
    """Element-wise variance of the individual gradients across the samples, parameter-shaped.

    The individual gradient of sample ``n`` is ``c * g_n`` with ``c = N`` for
    ``reduction="mean"`` (so it is the gradient of the per-sample loss, and their mean is the
    batch gradient) and ``c = 1`` for ``"sum"``. Biased (1/S) estimator over the S (sub)samples.
    Computed as ``c^2 sum_n g_n^2 / S - (c gbar)^2`` with ``gbar = sum_n g_n / S`` from the
    squared sums (no per-sample rows: about the cost of ``SumGradSquared``) where that is
    accurate; where the spread is tiny against the mean (an entry below
    ``CANCELLATION_MARGIN * eps * sqrt(S)`` times the second moment, or negative from
    round-off) the parameter is recomputed in the centred form ``c^2 / S sum_n (g_n - gbar)^2``
    from its rows, formed in chunks of samples (at most about ``2^24`` elements at a time).
    """

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The variance from the squared sums, or centred from the rows where cancellation
        could dominate (see the class docstring).

        Args:
            form: the parameter's form (restricted to the subsample).
            ctx: batch size ``N`` and loss reduction (sets ``c``).
            out: ignored; a new tensor is returned.

        Returns:
            Parameter-shaped biased variance (see the class docstring for ``c``).
        """
        c = float(ctx.num_samples) if ctx.reduction == "mean" else 1.0
        S = form.num_samples
        if not form.materialized:
            uncentred = _uncentred_variance(form, c, S)
            if uncentred is not None:
                return uncentred
        mean = form.grad() / S
        if form.materialized:
            return (form.batch_grad() - mean).square_().sum(0).mul_(c * c / S)
        total = torch.zeros_like(mean)
        step = max(1, CHUNK_ELEMENTS // max(1, mean.numel()))
        for start in range(0, S, step):
            index = torch.arange(start, min(S, start + step), device=mean.device)
            total += (form.select(index).batch_grad() - mean).square_().sum(0)
        return total.mul_(c * c / S)


def _uncentred_variance(form: Form, c: float, S: int) -> Tensor | None:
    """``c^2 sum g^2 / S - (c sum g / S)^2`` in the form's dtype, or ``None`` where an entry is
    below the round-off margin (one host synchronization; no temporary beyond the result)."""
    grad = form.grad()
    second = form.sum_grad_squared().to(grad.dtype)  # memoized by the form: read only
    var = torch.addcmul(second, grad, grad, value=-1.0 / S)  # sum g^2 - (sum g)^2 / S
    margin = CANCELLATION_MARGIN * torch.finfo(grad.dtype).eps * S**0.5
    low = bool(var.sub_(second, alpha=margin).min() < 0) if var.numel() else False
    if low:
        return None
    return var.add_(second, alpha=margin).mul_(c * c / S)
