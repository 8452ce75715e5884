"""Layer-wise OBS with the damped input Gram (OBC / SparseGPT-style column-wise pruning).

For a Linear layer (or an ungrouped convolution, read as ``[O, C * prod(K)]`` on unfolded
patches) with inputs ``X`` over ``data`` (the rows of the KFAC ``A`` factor,
:func:`beyondgrad.merging.input_grams`), the layer's output error ``||X (W - W')^T||^2`` is a
quadratic in each row of ``W`` with the same Hessian ``H = X^T X / count + lambda I``,
``lambda = damping * mean(diag(X^T X / count))``. A trainable bias is a last input column of
constant 1: never pruned, it absorbs compensation like every later column.

The columns are visited left to right (:func:`prune_columns`). Every ``block_size`` columns, the
keep-mask of that block is chosen over all its entries at once by the saliency
``w^2 / [U]_cc^2`` (``U`` the upper Cholesky factor of ``H^{-1}``; ``[U]_cc^2`` is the diagonal of
the inverse of ``H`` restricted to columns ``c`` and later), with exactly the share of the
layer's target falling into the block. At column ``c``, the pruned entries of each row are set
to zero and the row's later entries get the OBS update on the remaining columns
``w_{c:} -= (w_c / [U]_cc) U_{c, c:}``; earlier columns are final. The sparsity is per layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import input_grams
from .masks import PruningResult, check_sparsity, masked_copy


def _inverse_cholesky(H: Tensor) -> Tensor:
    """``U`` upper triangular with ``U^T U = H^{-1}``."""
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _block_counts(prunable: Tensor, rows: int, sparsity: float, block_size: int) -> list[int]:
    """Entries to prune per column block, exactly ``round(sparsity * rows * prunable)``."""
    cum = torch.cumsum(prunable.long(), 0) * rows
    ends = [*range(block_size, prunable.numel(), block_size), prunable.numel()]
    marks = [0] + [round(sparsity * int(cum[e - 1])) for e in ends]
    return [b - a for a, b in itertools.pairwise(marks)]


def prune_columns(
    W: Tensor, H: Tensor, sparsity: float, block_size: int = 128, prunable: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Column-wise OBS pruning of one layer (see the module docstring).

    Args:
        W: the layer's weights ``[O, I]``.
        H: the damped Hessian ``[I, I]`` (symmetric positive definite).
        sparsity: the fraction of the prunable entries to prune, in ``[0, 1]``.
        block_size: columns per mask decision.
        prunable: ``[I]`` bool, the columns that may be pruned (default: all).

    Returns:
        ``(W', keep)``: the updated weights ``[O, I]`` (float64) and the keep-mask ``[O, I]``.
    """
    O, I = W.shape
    prunable = torch.ones(I, dtype=torch.bool) if prunable is None else prunable.cpu()
    U = _inverse_cholesky(H.double())
    W = W.detach().double().clone()
    keep = torch.ones(O, I, dtype=torch.bool, device=W.device)
    counts = _block_counts(prunable, O, sparsity, block_size)
    for blk, i1 in enumerate(range(0, I, block_size)):
        i2 = min(i1 + block_size, I)
        U1 = U[i1:i2, i1:i2]
        scores = W[:, i1:i2] ** 2 / torch.diagonal(U1) ** 2
        scores[:, ~prunable[i1:i2].to(W.device)] = torch.inf
        order = torch.sort(scores.reshape(-1), stable=True).indices[: counts[blk]]
        block_keep = torch.ones(O * (i2 - i1), dtype=torch.bool, device=W.device)
        block_keep[order] = False
        keep[:, i1:i2] = block_keep.reshape(O, i2 - i1)
        err = torch.zeros(O, i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            w = W[:, i1 + i]
            err[:, i] = torch.where(keep[:, i1 + i], 0.0, w) / U1[i, i]
            W[:, i1 + i : i2] -= err[:, i : i + 1] * U1[i : i + 1, i:]
        W[:, i2:] -= err @ U[i1:i2, i2:]
    W[~keep] = 0.0
    return W, keep


def damped_gram(gram: Tensor, damping: float) -> Tensor:
    """``G + damping * mean(diag(G)) I`` (``damping * I`` if the diagonal is all zero).

    Args:
        gram: ``G`` ``[I, I]``.
        damping: the relative damping, > 0.

    Returns:
        ``[I, I]`` float64.
    """
    G = gram.double()
    scale = float(torch.diagonal(G).mean())
    lam = damping * (scale if scale > 0 else 1.0)
    return G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def layerwise_obs(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    sparsity: float,
    params: Sequence[str] | None = None,
    damping: float = 0.01,
    block_size: int = 128,
) -> PruningResult:
    """Layer-wise OBS (OBC / SparseGPT-style) of every Linear and ungrouped convolution layer,
    each to ``sparsity`` (see the module docstring). Each layer's inputs come from ``model``
    itself (not from the already pruned earlier layers).

    Args:
        model: the model (left untouched).
        loss_fn: its loss (only to run the engine).
        data: calibration data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.
        sparsity: the fraction of each covered weight to prune, in ``[0, 1]``.
        params: weight names to cover (default: every Linear/conv weight the engine reaches).
        damping: ``lambda`` relative to the mean diagonal of the Gram.
        block_size: columns per mask decision.

    Returns:
        A :class:`~beyondgrad.pruning.PruningResult` (masks on the weights; biases are kept and
        carry compensation).
    """
    check_sparsity(sparsity, "layer")
    grams = {g.weight: g for g in input_grams(model, loss_fn, data).values()}
    names = list(grams) if params is None else list(params)
    missing = sorted(set(names) - set(grams))
    if missing:
        raise ValueError(f"no input Gram (not a Linear/ungrouped conv weight): {missing}")
    named = dict(model.named_parameters())
    values, masks = {}, {}
    for name in names:
        g, weight = grams[name], named[name]
        W = weight.detach().reshape(weight.shape[0], -1)
        if g.bias is not None:
            W = torch.cat([W, named[g.bias].detach()[:, None]], 1)
        prunable = torch.ones(W.shape[1], dtype=torch.bool)
        prunable[W.shape[1] - 1 :] = g.bias is None
        Wn, keep = prune_columns(W, damped_gram(g.matrix, damping), sparsity, block_size, prunable)
        cols = weight[0].numel()
        values[name] = Wn[:, :cols].reshape(weight.shape).to(weight.dtype)
        masks[name] = keep[:, :cols].reshape(weight.shape)
        if g.bias is not None:
            values[g.bias] = Wn[:, -1].to(weight.dtype)
    return PruningResult(masked_copy(model, masks, values), masks, "layerwise_obs")
