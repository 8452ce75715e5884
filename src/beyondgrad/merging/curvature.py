"""The curvature merging and pruning read from the engine: diagonal Fishers per parameter,
Kronecker-factored (KFAC) Fishers and input Gram matrices (the KFAC ``A`` factors) per Linear /
convolution layer, over a data set.

Conventions (both functions):

* ``data`` is an iterable of ``(X, y)`` batches (a ``DataLoader``, a list) or one ``(X, y)``
  pair of tensors (:func:`as_batches`).
* Everything is an average over the ``N`` examples of the data set: the loss is taken with
  ``reduction="sum"`` (a copy of ``loss_fn``), so each example contributes its own loss ``l_n``
  once, and the sums over batches are divided by ``N`` (the Gram matrices by their row count).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import group as dist_group
from ..engine import GRAD, compute
from ..quantities import KFAC, DiagGGN, SumGradSquared

FISHERS = ("empirical", "mc", "type-2")


def as_batches(data: Any) -> list[tuple[Any, Tensor]]:
    """The batches of ``data`` as a list.

    Args:
        data: one ``(X, y)`` pair of tensors, or an iterable of ``(X, y)`` batches (e.g. a
            ``torch.utils.data.DataLoader``).

    Returns:
        ``[(X, y), ...]``.

    Raises:
        ValueError: ``data`` holds no batch.
    """
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        batches = [data]
    else:
        batches = [(X, y) for X, y in data]
    if not batches:
        raise ValueError("data holds no batch")
    return batches


def sum_loss(loss_fn: nn.Module) -> nn.Module:
    """A shallow copy of ``loss_fn`` with ``reduction="sum"`` (``loss_fn`` is untouched).

    Args:
        loss_fn: a supported loss module (``bg.SUPPORTED_LOSSES``).

    Returns:
        The copy.
    """
    out = copy.copy(loss_fn)
    out.reduction = "sum"  # type: ignore[assignment]
    return out


def mean_loss(model: nn.Module, loss_fn: nn.Module, data: Any) -> float:
    """The mean per-example loss of ``model`` over ``data``, in evaluation mode, no gradients
    (the scoring rule of :func:`~beyondgrad.pruning.select_damping` and
    :func:`~beyondgrad.merging.select_weights`).

    Args:
        model: the model (scored under ``model.eval()``; its training flags are restored
            afterwards, so Dropout is off and BatchNorm reads and keeps its running statistics).
        loss_fn: its loss (applied with reduction ``"sum"``, divided by the example count).
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.

    Returns:
        The mean loss, a float.
    """
    dist_group.refuse_rank_local("bg.pruning.mean_loss")  # no reduction over ranks
    total, count, fn = 0.0, 0, sum_loss(loss_fn)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            for X, y in as_batches(data):
                total += float(fn(model(X), y))
                count += y.shape[0]
    finally:
        for m, mode in modes:
            m.training = mode
    return total / count


def _fisher_quantity(fisher: str, mc_samples: int) -> Any:
    if fisher == "empirical":
        return SumGradSquared()
    if fisher == "mc":
        return DiagGGN(mc_samples=mc_samples)
    if fisher == "type-2":
        return DiagGGN()
    raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")


def diagonal_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    fisher: str = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The diagonal Fisher of the mean per-example loss over ``data``, per parameter.

    ``F = (1/N) sum_n diag(C_n)`` with ``C_n`` the curvature of example ``n``'s own loss
    ``l_n``: ``"empirical"``: ``grad l_n ** 2`` (``bg.SumGradSquared``, the observed labels);
    ``"mc"``: the MC Fisher with ``mc_samples`` labels sampled from the model per example
    (``bg.DiagGGN(mc_samples=...)``); ``"type-2"``: the exact GGN diagonal (``bg.DiagGGN()``).

    Args:
        model: any model the engine serves.
        loss_fn: its loss (MSE, cross-entropy, BCE with logits); its reduction is ignored.
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.
        fisher: ``"empirical"``, ``"mc"`` or ``"type-2"``.
        mc_samples: labels sampled per example for ``"mc"``.
        generator: the random source for ``"mc"``.

    Returns:
        ``{parameter name: F}``, each of the parameter's shape (trainable parameters only).
    """
    dist_group.refuse_rank_local("bg.merging.diagonal_fisher")
    quantity = _fisher_quantity(fisher, mc_samples)
    loss_sum, total, count = sum_loss(loss_fn), {}, 0
    for X, y in as_batches(data):
        res = compute(model, loss_sum, X, y, quantity, generator=generator)
        for name, value in res[quantity].items():
            total[name] = total[name] + value if name in total else value.clone()
        count += y.shape[0]
    return {name: value / count for name, value in total.items()}


@dataclass
class Gram:
    """The input Gram matrix of one layer over a data set.

    Attributes:
        matrix: ``(1/count) sum_r a_r a_r^T`` ``[I(+1), I(+1)]`` over the ``count`` input rows
            ``a_r`` of the layer (Linear: one row per example and leading position; conv: one
            unfolded patch per example and output position), augmented by a constant 1 (last
            row/column) when the layer has a trainable bias: the KFAC ``A`` factor
            (``bg.KFAC(kfac_approx="expand")``).
        count: the number of input rows.
        weight: the weight's parameter name.
        bias: the bias's parameter name, or ``None``.
    """

    matrix: Tensor
    count: int
    weight: str
    bias: str | None


def input_grams(model: nn.Module, loss_fn: nn.Module, data: Any) -> dict[str, Gram]:
    """The input Gram matrices (KFAC ``A`` factors) of every Linear and (ungrouped,
    non-transposed) convolution layer of ``model`` over ``data``.

    Args:
        model: any model the engine serves.
        loss_fn: its loss (needed to run the engine; the Grams do not depend on it).
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.

    Returns:
        ``{module name: Gram}`` (see :class:`Gram` for the scaling; the weight is read as
        ``[O, I]`` with a conv weight ``[O, C, *K]`` as ``[O, C * prod(K)]``).
    """
    dist_group.refuse_rank_local("bg.merging.input_grams")
    quantity = KFAC(fisher_type="forward-only", diagonal_fallback=False, keep_sums=True)
    sums: dict[str, tuple[Tensor, int, tuple[str, ...]]] = {}
    for X, y in as_batches(data):
        res = compute(model, sum_loss(loss_fn), X, y, quantity)
        for module, block in res[quantity].items():
            if not _plain_layer(model.get_submodule(module), block):
                continue
            raw = res.stats.kronecker(module, GRAD, "expand")  # type: ignore[union-attr]
            A, c, _ = sums.get(module, (0.0, 0, block.params))
            sums[module] = (A + raw.A_sum[0], c + raw.count, block.params)
    return {
        m: Gram(A / c, c, params[0], params[1] if len(params) > 1 else None)
        for m, (A, c, params) in sums.items()
    }


def _plain_layer(module: nn.Module, block: Any) -> bool:
    """A Linear or an ungrouped, non-transposed convolution (a plain ``[O, I]`` block)."""
    if isinstance(module, nn.Linear):
        return True
    conv = isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    return conv and module.groups == 1 and block.A.ndim == 2 and block.weight_perm is None


@dataclass
class KroneckerFisher:
    """The Kronecker-factored (KFAC) Fisher of one layer over a data set: ``F ~ B kron A``
    on the row-major ``[W | b]`` ``[O, I(+1)]`` block.

    Attributes:
        A: ``(1/count) sum_r a_r a_r^T`` ``[I(+1), I(+1)]``, the input Gram (as in :class:`Gram`).
        B: ``(1/N) sum_n sum_v g_{n,v} g_{n,v}^T`` ``[O, O]`` over the ``N`` examples and
            their backpropagated output-gradient vectors (type-2, MC or empirical).
        weight: the weight's parameter name.
        bias: the bias's parameter name, or ``None``.
    """

    A: Tensor
    B: Tensor
    weight: str
    bias: str | None


def kronecker_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    fisher: str = "type-2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, KroneckerFisher], dict[str, Tensor]]:
    """The KFAC Fisher (``bg.KFAC``, KFAC-expand) of the mean per-example loss over ``data``
    for every Linear and ungrouped convolution layer, and the diagonal Fisher of the same type
    for every other parameter.

    Args:
        model: any model the engine serves.
        loss_fn: its loss (MSE, cross-entropy, BCE with logits); its reduction is ignored.
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.
        fisher: ``"empirical"``, ``"mc"`` or ``"type-2"``.
        mc_samples: labels sampled per example for ``"mc"``.
        generator: the random source for ``"mc"``.

    Returns:
        ``({module name: KroneckerFisher}, {parameter name: diagonal Fisher})``; the second
        holds the parameters of the other modules (parameter-shaped, mean over examples).
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    dist_group.refuse_rank_local("bg.merging.kronecker_fisher")
    quantity = KFAC(fisher_type=fisher, mc_samples=mc_samples, keep_sums=True)  # read below
    sums: dict[str, list[Any]] = {}
    diag: dict[str, Tensor] = {}
    count = 0
    for X, y in as_batches(data):
        res = compute(model, sum_loss(loss_fn), X, y, quantity, generator=generator)
        for module, block in res[quantity].items():
            if hasattr(block, "diagonal"):  # DiagonalFactors: no Kronecker structure
                for name, value in block.diagonal.items():
                    diag[name] = diag[name] + value if name in diag else value.clone()
                continue
            if not _plain_layer(model.get_submodule(module), block):
                raise ValueError(
                    f"module '{module}' has no plain [O, I] Kronecker block: use the diagonal"
                )
            raw = res.stats.kronecker(module, quantity.vectors, "expand")  # type: ignore[union-attr]
            A, c, B, p = sums.get(module, [0.0, 0, 0.0, block.params])
            sums[module] = [A + raw.A_sum[0], c + raw.count, B + raw.B_sum[0], p]
        count += y.shape[0]
    blocks = {
        m: KroneckerFisher(A / c, B / count, p[0], p[1] if len(p) > 1 else None)
        for m, (A, c, B, p) in sums.items()
    }
    return blocks, {name: value / count for name, value in diag.items()}
