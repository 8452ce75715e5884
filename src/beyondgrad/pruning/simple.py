"""Pruning without a compensating update: magnitude and Optimal Brain Damage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import diagonal_fisher
from .masks import (
    PruningResult,
    check_sparsity,
    masked_copy,
    masks_from_scores,
    prunable_parameters,
)


def magnitude(
    model: nn.Module, sparsity: float, scope: str = "global", params: Sequence[str] | None = None
) -> PruningResult:
    """Magnitude pruning: the weights of smallest ``|w|`` are set to zero.

    Args:
        model: the model (left untouched).
        sparsity: the fraction of the covered weights to prune, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"`` (see :mod:`beyondgrad.pruning.masks`).
        params: the covered parameters (default: every weight with two or more dimensions).

    Returns:
        A :class:`~beyondgrad.pruning.PruningResult`.
    """
    check_sparsity(sparsity, scope)
    named = dict(model.named_parameters())
    scores = {n: named[n].detach().abs() for n in prunable_parameters(model, params)}
    masks = masks_from_scores(scores, sparsity, scope)
    return PruningResult(masked_copy(model, masks), masks, "magnitude")


def obd(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    sparsity: float,
    scope: str = "global",
    params: Sequence[str] | None = None,
    curvature: str = "type-2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> PruningResult:
    """Optimal Brain Damage (LeCun et al., 1990): saliency ``w_q^2 H_qq / 2`` with a diagonal
    curvature ``H`` of the mean per-example loss over ``data``, no compensating update.

    ``H`` comes from the engine (:func:`beyondgrad.merging.diagonal_fisher`): ``"type-2"`` the
    exact GGN diagonal, ``"mc"`` the MC Fisher diagonal, ``"empirical"`` the empirical Fisher
    diagonal. For a quadratic loss at its minimum with ``H`` its Hessian diagonal, the saliency
    is exactly the loss increase of removing that one weight.

    Args:
        model: the model (left untouched).
        loss_fn: its loss (MSE, cross-entropy, BCE with logits).
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.
        sparsity: the fraction of the covered weights to prune, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"``.
        params: the covered parameters (default: every weight with two or more dimensions).
        curvature: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        mc_samples: labels per example for ``"mc"``.
        generator: the random source for ``"mc"``.

    Returns:
        A :class:`~beyondgrad.pruning.PruningResult`.
    """
    check_sparsity(sparsity, scope)
    scores = obd_scores(model, loss_fn, data, params, curvature, mc_samples, generator)
    masks = masks_from_scores(scores, sparsity, scope)
    return PruningResult(masked_copy(model, masks), masks, "obd")


def obd_scores(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    params: Sequence[str] | None = None,
    curvature: str = "type-2",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The OBD saliencies ``w_q^2 H_qq / 2`` of the covered parameters (see :func:`obd`).

    Args:
        model: the model.
        loss_fn: its loss.
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.
        params: the covered parameters (default: every weight with two or more dimensions).
        curvature: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        mc_samples: labels per example for ``"mc"``.
        generator: the random source for ``"mc"``.

    Returns:
        ``{name: saliency}``, parameter-shaped, on the scale of the mean per-example loss.
    """
    names = prunable_parameters(model, params)
    diag = diagonal_fisher(model, loss_fn, data, curvature, mc_samples, generator)
    named = dict(model.named_parameters())
    return {n: 0.5 * named[n].detach() ** 2 * diag[n] for n in names}
