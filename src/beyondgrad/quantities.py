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

from .forms import Form


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

    @property
    def vectors(self) -> tuple[str, int]:
        """Which output-space vectors the engine backpropagates for it: ``("grad", 1)`` (the
        loss gradient), ``("exact", 0)`` (loss-Hessian square-root columns) or ``("mc", M)``."""
        return ("grad", 1)


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
    methods; divided by the loss reduction factor ``R`` it is the empirical-Fisher diagonal
    ``R sum_n (grad l_n)^2`` (KFAC-tutorial convention)."""

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


@dataclass(frozen=True)
class _Curvature(Quantity):
    """Base of the GGN-family quantities. ``mc_samples=None``: exact, the type-2 Fisher (the
    GGN), backpropagating one loss-Hessian square-root column per model output per sample;
    ``mc_samples=M``: the Monte-Carlo Fisher from M sampled labels per sample (seeded by the
    ``generator`` passed to ``compute``; quantities with the same M share their draws).
    ``max_vectors``: exact quantities refuse (with a clear error suggesting MC) when a sample
    has more outputs than this, e.g. a vocabulary times a sequence length."""

    mc_samples: int | None = None
    max_vectors: int = 256

    def __post_init__(self) -> None:
        if self.mc_samples is not None and (
            not isinstance(self.mc_samples, int) or self.mc_samples < 1
        ):
            raise ValueError(f"mc_samples must be None or a positive int, got {self.mc_samples!r}")

    @property
    def vectors(self) -> tuple[str, int]:
        return ("exact", 0) if self.mc_samples is None else ("mc", self.mc_samples)


@dataclass(frozen=True)
class DiagGGN(_Curvature):
    """Diagonal of the GGN (exact, ``mc_samples=None``) or of the MC Fisher, parameter-shaped:
    ``sum_{n,k} g_{k,n}^2`` for the backpropagated vectors ``k`` (reduction included)."""

    per_sample: ClassVar[bool] = False

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.sum_grad_squared()


@dataclass(frozen=True)
class BatchDiagGGN(_Curvature):
    """Per-sample GGN (or MC Fisher) diagonals, ``[N, *shape]``; they sum to :class:`DiagGGN`."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.batch_sum_grad_squared()


@dataclass(frozen=True)
class SqrtGGN(_Curvature):
    """The GGN factor ``V`` with ``GGN = V V^T`` (the basis of ViViT), per parameter
    ``[K, N, *shape]``: K = outputs per sample (exact) or ``mc_samples`` (MC). Flattening the
    first two axes and the parameters, ``V^T V`` is the Gram matrix of the GGN."""

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        return form.batch_grad().reshape(form.vectors, form.num_samples, *form.shape)


@dataclass(frozen=True)
class GGNEigen(_Curvature):
    """ViViT: exact eigenpairs of the GGN (or MC Fisher) from the Gram matrix of its factor,
    with per-sample first/second directional derivatives and the damped Newton step along
    them (:class:`~beyondgrad.vivit.GGNEigenResult`).

    ``top_k``: keep the leading eigenpairs (default: all nonzero ones). ``param_groups``:
    tuples of parameter names, one eigenproblem each (default: the whole model, key
    ``"model"``; groups are keyed ``"group0"``, ...). With ``subsampling`` (and MC) the GGN is
    that of the selected samples' rows (unchanged scale): a cheaper approximation. The result
    maps each group key to a ``GGNEigenResult``.
    """

    top_k: int | None = None
    param_groups: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class DiagHessian(Quantity):
    """The exact diagonal of the Hessian, parameter-shaped, for models whose nonlinearities
    are element-wise (activations such as tanh, sigmoid, ELU, softplus, GELU; piecewise-linear
    ops; residual adds; pooling; products of factors with disjoint parameters): the GGN
    diagonal plus the residual terms of every element-wise nonlinearity, backpropagated
    through the same engine (so residual networks work). Any other nonlinearity between the
    parameters and the output (LayerNorm, attention, gating) raises an error naming it.
    ``max_vectors`` bounds both the loss-Hessian vectors and the ``2 x units`` residual
    vectors of each nonlinearity per sample.

    ``method="hesscale"``: the HesScale approximation instead (a heuristic, exact only for the
    last layer; ``nn.Sequential`` of Linear/Tanh/Sigmoid/ReLU/Flatten; needs ``bg.compute``):
    about the cost of one backward pass, no error bound."""

    max_vectors: int = 4096
    method: str = "exact"
    per_sample: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.method not in ("exact", "hesscale"):
            raise ValueError(f"method must be 'exact' or 'hesscale', got {self.method!r}")

    @property
    def vectors(self) -> tuple[str, int]:
        return ("exact", 0)

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """The GGN part; the engine adds the residual terms."""
        return form.sum_grad_squared()


@dataclass(frozen=True)
class Forms(Quantity):
    """Library-internal escape hatch: the merged per-row gradient form of each parameter
    (:mod:`beyondgrad.rules.forms`) for the vectors ``kind`` (``("grad", 1)``,
    ``("exact", 0)``, ``("mc", M)``), for algorithms that contract them further (EKFAC)."""

    kind: tuple[str, int] = ("grad", 1)
    max_vectors: int = 256
    per_sample: ClassVar[bool] = False

    @property
    def vectors(self) -> tuple[str, int]:
        return self.kind

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Form:  # type: ignore[override]
        return form


FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
KFAC_APPROX = ("expand", "reduce")


@dataclass(frozen=True)
class KFAC(Quantity):
    """Kronecker-factored curvature, one block per module (keyed by module name):
    :class:`~beyondgrad.factors.KroneckerFactors` for Linear, Conv1/2/3d, ConvTranspose1/2/3d
    and Embedding layers, :class:`~beyondgrad.factors.DiagonalFactors` (the diagonal of the
    same curvature)
    for every other layer with parameters.

    ``fisher_type``: ``"type-2"`` (exact loss-Hessian vectors: KFLR / the GGN), ``"mc"``
    (``mc_samples`` sampled labels), ``"empirical"`` (the observed labels' gradients),
    ``"forward-only"`` (``B = I``). ``kfac_approx``: ``"expand"`` treats a weight-sharing axis
    (sequence positions, conv positions) as data; ``"reduce"`` averages inputs and sums output
    gradients over it first (conv inputs via index patterns, never unfolding). ``bias``:
    ``"joint"`` (the bias extends ``A``) or ``"separate"``. ``diagonal_fallback=False``: skip
    layers without Kronecker structure (no block, and no backward work for them). Scales: see
    :mod:`beyondgrad.factors`.
    """

    fisher_type: str = "mc"
    kfac_approx: str = "expand"
    mc_samples: int = 1
    bias: str = "joint"
    max_vectors: int = 256
    diagonal_fallback: bool = True

    per_sample: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {self.fisher_type!r}")
        if self.kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {self.kfac_approx!r}")
        if self.bias not in ("joint", "separate"):
            raise ValueError(f"bias must be 'joint' or 'separate', got {self.bias!r}")
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {self.mc_samples!r}")

    @property
    def vectors(self) -> tuple[str, int]:
        return {"type-2": ("exact", 0), "mc": ("mc", self.mc_samples)}.get(
            self.fisher_type, ("grad", 1)
        )


FIRST_ORDER: tuple[type[Quantity], ...] = (
    Grad,
    BatchGrad,
    BatchL2,
    BatchDot,
    SumGradSquared,
    Variance,
)

SECOND_ORDER: tuple[type[Quantity], ...] = (DiagGGN, BatchDiagGGN, SqrtGGN, KFAC, GGNEigen)
