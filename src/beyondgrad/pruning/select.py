"""Choosing WoodFisher's damping on training data.

The damping ``lambda`` of ``F = lambda I + (1/N) sum_n g_n g_n^T`` sets how far the OBS
updates trust the empirical Fisher: too large and OBS degenerates towards magnitude pruning
with a scaled diagonal, too small and the updates follow directions the calibration gradients
barely determine. Its best value depends on the model, the data and the sparsity, so instead of
a fixed constant :func:`select_damping` applies a documented rule: prune with every candidate of
a logarithmic grid and keep the one whose pruned model has the smallest mean loss on training
data (``validation``, by default the calibration data itself). No test data is involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..merging import mean_loss
from .masks import check_sparsity, masked_copy, prunable_parameters
from .obs import BlockFisherInverse, fisher_inverse, obs_prune_blocks

#: the candidate dampings of :func:`select_damping`: 1e-9, 1e-8, ..., 1e-2
DAMPING_GRID: tuple[float, ...] = tuple(10.0**-k for k in range(9, 1, -1))


def pruned_losses(
    model: nn.Module,
    loss_fn: nn.Module,
    validation: Any,
    inverses: Mapping[float, BlockFisherInverse],
    sparsity: float,
    scope: str = "global",
    steps: int = 8,
    update: str = "joint",
) -> dict[float, float]:
    """The mean loss on ``validation`` of the model pruned with each of several inverses.

    Args:
        model: the model (left untouched).
        loss_fn: its loss.
        validation: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches (training data).
        inverses: ``{damping: BlockFisherInverse}`` over the same parameters
            (:func:`~beyondgrad.pruning.fisher_inverse`).
        sparsity: the fraction to prune, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"``.
        steps: OBS groups (:func:`~beyondgrad.pruning.obs_prune_blocks`).
        update: ``"joint"`` or ``"independent"``.

    Returns:
        ``{damping: mean loss of the pruned model}``.
    """
    check_sparsity(sparsity, scope)
    named = dict(model.named_parameters())
    out = {}
    for damping, inv in inverses.items():
        weights = [named[n] for n in inv.names]
        values, masks = obs_prune_blocks(inv, weights, sparsity, scope, steps, update)
        values = {n: v.to(named[n].dtype) for n, v in values.items()}
        out[damping] = mean_loss(masked_copy(model, masks, values), loss_fn, validation)
    return out


def select_damping(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    sparsity: float,
    scope: str = "global",
    candidates: Sequence[float] = DAMPING_GRID,
    validation: Any = None,
    params: Sequence[str] | None = None,
    block_size: int = 128,
    steps: int = 8,
    update: str = "joint",
    chunk_size: int = 32,
) -> tuple[float, dict[float, float]]:
    """WoodFisher's damping by the rule of the module docstring: the candidate whose pruned
    model has the smallest mean loss on ``validation`` (training data; default ``data``).

    Args:
        model: the model (left untouched).
        loss_fn: its loss.
        data: the calibration data of the Fisher, ``(X, y)`` or an iterable of batches.
        sparsity: the target sparsity, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"``.
        candidates: the dampings tried (each ``> 0``).
        validation: the data the pruned models are scored on (``None``: ``data``).
        params: the covered parameters (default: every weight with two or more dimensions).
        block_size: entries per diagonal block of ``F``.
        steps: OBS groups.
        update: ``"joint"`` or ``"independent"``.
        chunk_size: samples per Woodbury update.

    Returns:
        ``(damping, {candidate: mean loss})``; pass the damping to
        :func:`~beyondgrad.pruning.woodfisher` with the same other arguments.
    """
    if not candidates:
        raise ValueError("need at least one candidate damping")
    names = prunable_parameters(model, params)
    inverses = {
        d: fisher_inverse(model, loss_fn, data, names, d, block_size, chunk_size)
        for d in candidates
    }
    losses = pruned_losses(
        model, loss_fn, data if validation is None else validation, inverses, sparsity, scope,
        steps, update,
    )  # fmt: skip
    return min(losses, key=losses.__getitem__), losses
