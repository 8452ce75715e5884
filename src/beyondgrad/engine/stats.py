"""The engine's product: :class:`Statistics` of one batch, what every quantity reduces.

Per parameter, the merged per-row gradient forms (:mod:`beyondgrad.forms`) for each kind of
backpropagated vectors; per module, the raw (unnormalized) Kronecker sums of its calls; the loss,
its reduction, the reduction factor ``R`` and the sample count ``N``; the subsampling. Forms and
Kronecker sums are built lazily, on first request, and cached: a quantity that reads only
Kronecker sums never builds forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .. import result_pool
from ..forms import Form, SampleForm, merge_forms
from ..rules.kronecker import KronStats
from .backprop import GRAD, Backprop, CallGradients, VectorKind
from .capture import Layer
from .samples import rule_input


@dataclass(frozen=True)
class Needs:
    """What a quantity asks the engine for.

    Attributes:
        kinds: vector kinds to backpropagate (``("grad", 1)``, ``("exact", 0)``, ``("mc", M)``).
        gradient: the ordinary batch gradient (from autograd where that is cheapest).
        kronecker_only: only layers with Kronecker statistics need output gradients.
        max_vectors: for ``("exact", 0)``: refuse when a sample has more outputs than this.
        independent_samples: whether the quantity is exact only for a model whose samples do
            not interact (it reads per-sample rows, e.g. squares them); such quantities raise
            :class:`~beyondgrad.engine.session.SamplesCoupledError` on a model that couples
            them. ``None`` (default): whenever vectors are backpropagated for more than
            Kronecker sums. An approximation defined by its procedure (KFAC with its diagonal
            fallback) may declare ``False``.
        inside: the quantity also backpropagates vectors from inside the network (its
            ``prepare`` step, e.g. the Hessian diagonal's residual terms); layer outputs shared
            by all samples then keep the masked per-sample pass (see
            :mod:`beyondgrad.engine.samples`).
    """

    kinds: tuple[VectorKind, ...] = ()
    gradient: bool = False
    kronecker_only: bool = False
    max_vectors: int | None = None
    independent_samples: bool | None = None
    inside: bool = False

    @property
    def reads_rows(self) -> bool:
        """:attr:`independent_samples`, resolved."""
        if self.independent_samples is not None:
            return self.independent_samples
        return bool(self.kinds) and not self.kronecker_only


@dataclass(frozen=True)
class ReduceContext:
    """What per-parameter reductions may need besides the form: the batch size ``N`` of the
    loss and its reduction (``"mean"`` or ``"sum"``)."""

    num_samples: int
    reduction: str


@dataclass
class Statistics:
    """Everything the engine extracted from one forward and backward pass.

    Attributes:
        loss: the scalar loss (detached).
        output: the model output (detached), ``[N, ...]``.
        num_samples: ``N``, the length of the sample axis.
        reduction: the loss reduction, ``"mean"`` or ``"sum"``.
        reduction_factor: ``R`` with ``loss = R * sum_n l_n`` (``1/N`` or ``1/(N S)`` for a
            mean, 1 for a sum).
        subsampling: the sample indices of per-sample forms, or ``None`` (all samples).
        kinds: the vector kinds that were backpropagated.
        rules: per parameter name, the rule that serves it (``"linear"``, ``"generic"``, ...).
        model: the model the batch ran through.
        layers: the recorded layers (modules with their calls, parameters and rule).
        backprop: the recorded graph that builds the per-parameter forms.
        call_gradients: per vector kind, the output gradients of every recorded call.
        parameter_gradients: ``{id(parameter): batch gradient}`` from autograd, where the
            ordinary gradient was requested.
    """

    loss: Tensor
    output: Tensor
    num_samples: int
    reduction: str
    reduction_factor: float
    subsampling: Tensor | None
    kinds: tuple[VectorKind, ...]
    rules: dict[str, str]
    model: nn.Module
    layers: list[Layer]
    backprop: Backprop
    call_gradients: dict[VectorKind, CallGradients]
    parameter_gradients: dict[int, Tensor] = field(default_factory=dict)
    _forms: dict[VectorKind, dict[int, list[Form]]] = field(default_factory=dict)
    _merged: dict[tuple, Form | None] = field(default_factory=dict)
    _kron: dict[tuple, KronStats | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._params = dict(self.model.named_parameters())
        self._names = {id(p): n for n, p in self._params.items()}
        self._layers = {u.name: u for u in self.layers if u.params}

    @property
    def context(self) -> ReduceContext:
        """``(N, reduction)`` for per-parameter reductions."""
        return ReduceContext(self.num_samples, self.reduction)

    @property
    def parameters(self) -> list[str]:
        """Names of the parameters served by a rule, in ``model.named_parameters()`` order."""
        return [n for n in self._params if n in self.rules]

    def parameter(self, name: str) -> nn.Parameter:
        """The parameter called ``name``."""
        return self._params[name]

    # -- forms ---------------------------------------------------------------------------------
    def form(self, name: str, kind: VectorKind = GRAD, per_sample: bool = False) -> Form | None:
        """The merged form of parameter ``name`` for vectors ``kind`` (``None`` when no
        recorded call reached it). ``per_sample=True``: restricted to :attr:`subsampling`."""
        key = (name, kind, per_sample and self.subsampling is not None)
        if key not in self._merged:
            self._merged[key] = self._build_form(name, kind, key[2])
        return self._merged[key]

    def forms(self, kind: VectorKind = GRAD, per_sample: bool = False) -> dict[str, Form]:
        """:meth:`form` of every parameter reached.

        Args:
            kind: the vector kind (``("grad", 1)``, ``("exact", 0)``, ``("mc", M)``).
            per_sample: restrict to :attr:`subsampling`.

        Returns:
            ``{parameter name: form}``, without the parameters no call reached.
        """
        out = {n: self.form(n, kind, per_sample) for n in self.parameters}
        return {n: f for n, f in out.items() if f is not None}

    def zero_form(self, name: str, per_sample: bool = False) -> Form:
        """A form of zero rows (one vector) for a parameter that no call reached.

        Args:
            name: the parameter name.
            per_sample: ``S`` rows for the subsample, else ``N``.

        Returns:
            A form of ``S`` (or ``N``) zero rows of the parameter's shape.
        """
        p = self._params[name]
        S = self.num_samples
        if per_sample and self.subsampling is not None:
            S = len(self.subsampling)
        return SampleForm(result_pool.zeros((S, *p.shape), p))

    def gradient(self, name: str) -> Tensor:
        """The batch gradient of the loss w.r.t. parameter ``name`` (zeros if unreached)."""
        p = self._params[name]
        g = self.parameter_gradients.get(id(p))
        if g is None and GRAD in self.call_gradients:
            form = self.form(name, GRAD)
            g = form.grad() if form is not None else None
        return g if g is not None else torch.zeros_like(p)

    def _build_form(self, name: str, kind: VectorKind, select: bool) -> Form | None:
        if select:
            full = self.form(name, kind)
            return None if full is None else full.select(self.subsampling)  # type: ignore[arg-type]
        if kind not in self.call_gradients:
            raise KeyError(f"vectors {kind} were not backpropagated; available: {self.kinds}")
        if kind not in self._forms:
            self._forms[kind] = self.backprop.forms(self.call_gradients[kind])
        p = self._params[name]
        parts = self._forms[kind].get(id(p))
        if not parts:
            return None
        merged = merge_forms(parts)
        if kind == GRAD and id(p) in self.parameter_gradients:
            merged.provide("grad", self.parameter_gradients[id(p)])
        return merged

    # -- modules and Kronecker sums ------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Names of the modules that own served parameters, in ``named_modules`` order."""
        return list(self._layers)

    def module_parameters(self, module: str) -> dict[str, str]:
        """``{name relative to the module: full parameter name}`` for ``module``."""
        names = self._names
        return {local: names[id(p)] for local, p in self._layers[module].params.items()}

    def has_kronecker(self, module: str) -> bool:
        """Whether ``module``'s rule has Kronecker statistics (Linear, convolutions, Embedding)."""
        unit = self._layers[module]
        return unit.rule is not None and unit.rule.kronecker is not None and "weight" in unit.params

    def rule_name(self, module: str) -> str:
        """The rule serving ``module``."""
        return self._layers[module].rule_name

    def kronecker(
        self, module: str, kind: VectorKind, kfac_approx: str = "expand"
    ) -> KronStats | None:
        """The raw Kronecker sums of ``module`` over its calls for vectors ``kind``:
        ``A_sum`` ``[G, I(+1), I(+1)]`` with its ``count`` (``A = A_sum / count``) and
        ``B_sum`` ``[G, O, O]`` (the vectors carry the loss's reduction factor, so ``B_sum``
        is on the loss's scale for ``exact``/``mc`` and carries ``R`` twice for ``grad``).
        ``None`` when no call of the module reached the loss.

        Args:
            module: the module name (must have Kronecker statistics, see
                :meth:`has_kronecker`).
            kind: the vector kind.
            kfac_approx: ``"expand"`` (a weight-sharing axis counts as data) or ``"reduce"``
                (inputs averaged and output gradients summed over it first).

        Returns:
            The module's :class:`~beyondgrad.rules.kronecker.KronStats`, or ``None``.
        """
        key = (module, kind, kfac_approx)
        if key not in self._kron:
            self._kron[key] = self._kronecker_sums(module, kind, kfac_approx)
        return self._kron[key]

    def take_kronecker(
        self,
        module: str,
        kind: VectorKind,
        kfac_approx: str = "expand",
        compute_dtype: torch.dtype | None = None,
    ) -> KronStats | None:
        """:meth:`kronecker` for a consumer that normalizes the sums in place (no second copy
        of every factor): sums computed for the caller alone, not cached (a later
        :meth:`kronecker` computes them again); where :meth:`kronecker` already served them,
        a copy (whoever holds those keeps raw sums).

        Args:
            module: the module name.
            kind: the vector kind.
            kfac_approx: ``"expand"`` or ``"reduce"``.
            compute_dtype: form the sums from copies of the layer inputs and output gradients
                in this dtype (e.g. ``torch.bfloat16``: several times faster products on
                hardware with bf16 units, entries rounded to about 3 significant digits),
                returned in the gradients' dtype; ``None``: in their own dtype (exact).

        Returns:
            The module's :class:`~beyondgrad.rules.kronecker.KronStats` (the caller's to
            modify), or ``None``.
        """
        cached = self._kron.get((module, kind, kfac_approx))
        if compute_dtype is not None:
            return self._kronecker_sums(module, kind, kfac_approx, compute_dtype)
        if cached is None:
            return self._kronecker_sums(module, kind, kfac_approx)
        return replace(cached, A_sum=cached.A_sum.clone(), B_sum=cached.B_sum.clone())

    def _kronecker_sums(
        self,
        module: str,
        kind: VectorKind,
        approx: str,
        compute_dtype: torch.dtype | None = None,
    ) -> KronStats | None:
        if not self.has_kronecker(module):
            raise ValueError(f"module '{module}' has no Kronecker statistics")
        unit, N = self._layers[module], self.num_samples
        kron: Callable = unit.rule.kronecker  # type: ignore[union-attr,assignment]
        grads = self.call_gradients.get(kind)
        if grads is None:
            raise KeyError(f"vectors {kind} were not backpropagated; available: {self.kinds}")
        total = None
        for call in unit.calls:
            g = grads.get(id(call), [None])[0]
            if g is None:
                continue
            K = g.shape[0]
            x, g = rule_input(call, N), g.reshape(K * N, *g.shape[2:])
            if compute_dtype is not None and compute_dtype != g.dtype:
                # kept in the wider of the data's and the compute dtype (never narrowed)
                a_dtype = torch.promote_types(
                    x.dtype if x.is_floating_point() else g.dtype, compute_dtype
                )
                b_dtype = torch.promote_types(g.dtype, compute_dtype)
                x = x.to(compute_dtype) if x.is_floating_point() else x  # not indices
                part = kron(unit.module, x, g.to(compute_dtype), K, approx)
                part = replace(part, A_sum=part.A_sum.to(a_dtype), B_sum=part.B_sum.to(b_dtype))
            else:
                part = kron(unit.module, x, g, K, approx)
            total = part if total is None else total + part
        return total
