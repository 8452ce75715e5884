"""The one place where :mod:`beyondgrad.linops` reaches into the engine: the model call, loss
checks, and the engine's :class:`~beyondgrad.engine.Statistics` (per-row gradient forms and raw
Kronecker sums, rescaled here to sums over a batch's samples)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..engine import SamplesCoupledError, check_samples_independent, compute
from ..engine import call_model as engine_call_model
from ..engine.attribution import node_kinds
from ..engine.backprop import per_vector_faster
from ..engine.losses import check_loss_fn, check_target, reduction_factor
from ..factors import DiagonalFactors, KroneckerFactors
from ..forms import Form, OuterForm
from ..quantities import KFAC as KFACQuantity
from ..quantities import DiagGGN, DiagHessian, Quantity

__all__ = [
    "DiagGGN",
    "DiagHessian",
    "Form",
    "KFACQuantity",
    "batch_diagonal",
    "batch_forms",
    "batch_kronecker",
    "call_model",
    "call_model_with",
    "check_loss_fn",
    "check_target",
    "graph_kinds",
    "kronecker_rotated_second_moment",
    "per_vector_graph",
    "random_graph",
    "reduction_factor",
    "samples_coupled",
]

#: the vectors each Fisher type backpropagates
_KINDS = {"type-2": ("exact", 0), "mc": ("mc", None), "empirical": ("grad", 1)}


def call_model(model: nn.Module, X: Any) -> Any:
    """``model(X)``, ``model(*X)`` or ``model(**X)`` as :func:`beyondgrad.compute` calls it."""
    return engine_call_model(model, X)


def call_model_with(model: nn.Module, params: dict[str, Tensor], X: Any) -> Any:
    """:func:`call_model` with some parameters replaced (``torch.func.functional_call``)."""
    if isinstance(X, dict):
        return torch.func.functional_call(model, params, (), X)
    args = tuple(X) if isinstance(X, (tuple, list)) else (X,)
    return torch.func.functional_call(model, params, args)


def graph_kinds(output: Any) -> set[str]:
    """The autograd node type names of ``output``'s graph (empty for a non-tensor)."""
    return node_kinds(output) if isinstance(output, Tensor) else set()


def per_vector_graph(kinds: set[str]) -> bool:
    """Whether products with ``k`` vectors through a graph with these node kinds run faster
    as ``k`` plain backward passes than as one vectorized pass (convolutions, batch and group
    norm: their vmap batching rules are slower than plain passes, see
    :func:`beyondgrad.engine.backprop.per_vector_faster`)."""
    return per_vector_faster(kinds)


def random_graph(kinds: set[str]) -> bool:
    """Whether a graph with these node kinds drew random numbers (dropout, ``bernoulli``): a
    second forward pass would draw others."""
    return any(word in kind for kind in kinds for word in ("Dropout", "Bernoulli", "Rand"))


def samples_coupled(model: nn.Module) -> str | None:
    """Why the samples of ``model`` are coupled (BatchNorm with batch statistics, ...), in the
    engine's words, or None when they are independent."""
    try:
        check_samples_independent(model)
    except SamplesCoupledError as err:
        return str(err)
    return None


def batch_forms(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Any,
    y: Tensor,
    fisher_type: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Form], float]:
    """One batch's per-row gradient forms for ``fisher_type`` and the factor that turns
    ``sum_r g_r g_r^T`` into that curvature of the batch loss (``1 / R`` for the empirical
    Fisher, whose rows are the loss-gradient rows ``R grad l_n``; 1 otherwise)."""
    name, count = _KINDS[fisher_type]
    kind = (name, mc_samples if count is None else count)
    stats = compute(model, loss_fn, X, y, vectors=[kind], generator=generator).stats
    assert stats is not None
    scale = 1.0 / stats.reduction_factor if fisher_type == "empirical" else 1.0
    return stats.forms(kind), scale


def batch_diagonal(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Any,
    y: Tensor,
    quantity: Quantity,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One batch's parameter-shaped diagonal ``quantity`` (``DiagGGN``, ``DiagHessian``)."""
    return compute(model, loss_fn, X, y, quantity, generator=generator)[quantity]  # type: ignore[return-value]


def batch_kronecker(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Any,
    y: Tensor,
    num_samples: int,
    quantity: KFACQuantity,
    generator: torch.Generator | None = None,
    outputs: list[tuple[Tensor, int, int]] | None = None,
) -> dict[str, KroneckerFactors | DiagonalFactors]:
    """One batch's KFAC blocks as *sums over its samples*: ``A`` (the engine's average over
    the ``num_samples`` samples) times ``num_samples``; ``B`` and diagonals times
    ``num_samples`` for ``reduction="mean"`` (they carry the batch's ``1/N``), as they are for
    ``"sum"``. Dividing the sums over all batches by the number of samples (``A``; ``B`` for
    mean losses) gives the data set's KFAC. ``outputs``: appended the batch's loss (detached,
    as ``loss_fn`` reduces it), the model output's leading dimension and its entries."""
    res = compute(model, loss_fn, X, y, quantity, generator=generator)
    if outputs is not None:
        outputs.append((res.loss, res.output.shape[0], res.output.numel()))
    stats = res.stats
    assert stats is not None
    # the blocks' B are on the loss's scale already (the empirical Fisher's extra R removed)
    b_scale = float(num_samples) if loss_fn.reduction == "mean" else 1.0  # type: ignore[union-attr]
    out: dict[str, KroneckerFactors | DiagonalFactors] = {}
    for name, block in res[quantity].items():
        if isinstance(block, KroneckerFactors):
            if block.bias == "separate":
                raise NotImplementedError("linops: Kronecker blocks with bias='separate'")
            # this call's blocks own their storage (KFAC normalized the sums in place)
            out[name] = KroneckerFactors(
                block.A.mul_(num_samples), block.B.mul_(b_scale), block.order, block.params,
                block.bias, block.fisher_type, block.kfac_approx, block.R, block.num_data,
                None, block.weight_perm,
            )  # fmt: skip
        else:
            scale = float(num_samples) if loss_fn.reduction == "mean" else 1.0  # type: ignore[union-attr]
            diag = {n: v * scale for n, v in block.diagonal.items()}
            out[name] = DiagonalFactors(diag, block.fisher_type, block.R, block.num_data)
    return out


def kronecker_rotated_second_moment(
    form: Form, q_input: Tensor, q_output: Tensor, joint_bias: bool
) -> Tensor | None:
    """``sum_r (Q_out^T g_r Q_in)^2`` ``[O, I(+1)]`` for a weight form with Kronecker
    structure (layer inputs ``A`` and output gradients ``G``), by rotating inputs and output
    gradients instead of the per-row gradients; ``None`` if the form has no such structure.
    ``joint_bias``: the bias is the last input column (inputs augmented by a constant 1)."""
    if not isinstance(form, OuterForm):
        return None
    A, G = form.A, form.G
    if joint_bias:
        A = torch.cat([A, A.new_ones(*A.shape[:-1], 1)], -1)
    rotated = OuterForm(A @ q_input, G @ q_output, (G.shape[-1], A.shape[-1]), form.vectors)
    return rotated.sum_grad_squared()
