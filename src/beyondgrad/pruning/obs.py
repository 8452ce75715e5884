"""Optimal Brain Surgeon with the empirical Fisher (WoodFisher, Singh & Alistarh, 2020).

The curvature is the damped empirical Fisher of the mean per-example loss over ``data``,
``F = damping I + (1/N) sum_n g_n g_n^T`` with ``g_n`` the gradient of example ``n``'s own loss
(``bg.BatchGrad`` of the summed loss), restricted to blocks: each covered parameter is flattened
and cut into consecutive blocks of ``block_size`` entries (the last one shorter), and ``F`` is
taken block-diagonal over them. Each block's inverse starts at ``I / damping`` and absorbs the
per-sample gradients ``chunk_size`` samples at a time through the Woodbury identity
``(F + U^T U)^{-1} = F^{-1} - F^{-1} U^T (I + U F^{-1} U^T)^{-1} U F^{-1}`` with
``U = G_chunk / sqrt(N)``: only one batch's per-sample gradients are held, never ``[N, P]``.
Inverses are kept in float64: ``P * block_size`` numbers.

Pruning (:func:`woodfisher`), greedily in ``steps`` groups: step ``t`` raises the sparsity to
``sparsity * t / steps``. Each step ranks the remaining weights by the OBS saliency
``w_q^2 / (2 [F^{-1}]_qq)`` (globally or per tensor) and removes the lowest. Inside a block the
group ``Q`` removed together gets the exact joint OBS update
``dw = -F^{-1} E_Q (E_Q^T F^{-1} E_Q)^{-1} E_Q^T w`` (the minimizer of ``dw^T F dw / 2`` with
``w_Q + dw_Q = 0``; ``update="independent"`` instead sums the single-weight updates
``-w_q F^{-1} e_q / [F^{-1}]_qq`` as in WoodFisher's multi-weight variant), and the block's
inverse is downdated to the inverse on the remaining weights,
``F^{-1} - F^{-1} E_Q (E_Q^T F^{-1} E_Q)^{-1} E_Q^T F^{-1}``, so the next step's saliencies and
updates are those of the constrained problem. Blocks do not interact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import group as dist_group
from ..engine import compute
from ..merging import as_batches, sum_loss
from ..quantities import BatchGrad
from .masks import (
    PruningResult,
    check_sparsity,
    masked_copy,
    masks_from_scores,
    prunable_parameters,
)

UPDATES = ("joint", "independent")


def obs_saliency(w: Tensor, inverse_diagonal: Tensor) -> Tensor:
    """The OBS cost of removing each weight alone: ``w_q^2 / (2 [H^{-1}]_qq)``.

    Args:
        w: weights ``[..., P]``.
        inverse_diagonal: the diagonal of the inverse curvature ``[..., P]``.

    Returns:
        ``[..., P]``: for a quadratic loss ``L(w + d) = L(w) + d^T H d / 2`` (at a minimum), the
        least loss increase over updates ``d`` that zero weight ``q``.
    """
    return w**2 / (2 * inverse_diagonal)


def obs_update(w: Tensor, inverse: Tensor, pruned: Tensor) -> Tensor:
    """The joint OBS update that zeroes the weights ``pruned`` at least quadratic cost:
    ``d = -H^{-1} E_Q (E_Q^T H^{-1} E_Q)^{-1} E_Q^T w`` (one weight:
    ``-w_q H^{-1} e_q / [H^{-1}]_qq``).

    Args:
        w: weights ``[P]``.
        inverse: the inverse curvature ``H^{-1}`` ``[P, P]``.
        pruned: indices ``Q`` ``[k]`` (long).

    Returns:
        The update ``d`` ``[P]`` (``(w + d)[Q] == 0``).
    """
    cols = inverse[:, pruned]
    return -cols @ torch.linalg.solve(cols[pruned], w[pruned])


def obs_downdate(inverse: Tensor, pruned: Tensor) -> Tensor:
    """The inverse curvature on the remaining weights after removing ``pruned``:
    ``H^{-1} - H^{-1} E_Q (E_Q^T H^{-1} E_Q)^{-1} E_Q^T H^{-1}`` (zero rows/columns at ``Q``;
    the rest equals the inverse of ``H`` restricted to the remaining weights).

    Args:
        inverse: ``H^{-1}`` ``[P, P]``.
        pruned: indices ``Q`` ``[k]`` (long).

    Returns:
        ``[P, P]``.
    """
    cols = inverse[:, pruned]
    return inverse - cols @ torch.linalg.solve(cols[pruned], cols.T)


def woodbury_absorb(inverse: Tensor, U: Tensor) -> Tensor:
    """``(F + U^T U)^{-1}`` from ``F^{-1}`` by the Woodbury identity, batched over blocks.

    Args:
        inverse: ``F^{-1}`` ``[nb, B, B]``.
        U: rows to add ``[nb, c, B]``.

    Returns:
        ``[nb, B, B]``.
    """
    FU = inverse @ U.transpose(-1, -2)
    S = torch.eye(U.shape[1], dtype=U.dtype, device=U.device) + U @ FU
    return inverse - FU @ torch.linalg.solve(S, FU.transpose(-1, -2))


@dataclass
class BlockFisherInverse:
    """The block-diagonal inverse of ``F = damping I + (1/N) sum_n g_n g_n^T`` (see the module
    docstring).

    Attributes:
        names: the covered parameters, in order.
        shapes: their shapes.
        block_size: ``B``; each parameter's flat entries are padded to a multiple of ``B``
            (padding entries carry no gradient, so they never couple to real ones).
        blocks: ``[nb, B, B]`` float64, the inverse blocks of all parameters in order.
        damping: the damping ``lambda``.
        num_data: ``N``.
    """

    names: list[str]
    shapes: list[torch.Size]
    block_size: int
    blocks: Tensor
    damping: float
    num_data: int

    def counts(self) -> list[int]:
        """Blocks per parameter."""
        return [math.ceil(math.prod(s) / self.block_size) for s in self.shapes]

    def pad(self, tensors: Sequence[Tensor]) -> Tensor:
        """Flatten, zero-pad and cut into blocks.

        Args:
            tensors: one per covered parameter, ``[*lead, *shape]`` (any leading axes).

        Returns:
            ``[*lead, nb, B]``.
        """
        parts = []
        for t, shape, nb in zip(tensors, self.shapes, self.counts(), strict=True):
            flat = t.reshape(*t.shape[: t.ndim - len(shape)], -1)
            pad = nb * self.block_size - flat.shape[-1]
            flat = torch.nn.functional.pad(flat, (0, pad))
            parts.append(flat.reshape(*flat.shape[:-1], nb, self.block_size))
        return torch.cat(parts, -2)

    def unpad(self, padded: Tensor) -> dict[str, Tensor]:
        """Undo :meth:`pad`.

        Args:
            padded: ``[nb, B]``.

        Returns:
            ``{name: parameter-shaped tensor}`` (views of ``padded``).
        """
        out, start = {}, 0
        for name, shape, nb in zip(self.names, self.shapes, self.counts(), strict=True):
            flat = padded[start : start + nb].reshape(-1)[: math.prod(shape)]
            out[name] = flat.reshape(shape)
            start += nb
        return out

    def to_dense(self) -> Tensor:
        """The inverse as a dense ``[P, P]`` matrix over the covered parameters (flattened
        row-major, in order; for tests and small models)."""
        P = self.blocks.shape[0] * self.block_size
        real = self.pad([torch.ones(s, dtype=torch.bool) for s in self.shapes]).reshape(P)
        dense = torch.block_diag(*self.blocks.unbind(0))
        return dense[real][:, real]


def fisher_inverse(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    names: Sequence[str],
    damping: float,
    block_size: int = 128,
    chunk_size: int = 32,
) -> BlockFisherInverse:
    """The block-diagonal inverse of the damped empirical Fisher by Woodbury updates.

    Args:
        model: any model the engine serves.
        loss_fn: its loss; each example's own loss is used (reduction ``"sum"``).
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.
        names: the covered parameters.
        damping: ``lambda > 0``.
        block_size: ``B``, entries per block.
        chunk_size: samples absorbed per Woodbury update.

    Returns:
        A :class:`BlockFisherInverse`.
    """
    if damping <= 0 or block_size < 1 or chunk_size < 1:
        raise ValueError("damping must be > 0, block_size and chunk_size >= 1")
    dist_group.refuse_rank_local("bg.pruning.fisher_inverse")
    batches = as_batches(data)
    N = sum(y.shape[0] for _, y in batches)
    params = dict(model.named_parameters())
    inv = BlockFisherInverse(
        list(names), [params[n].shape for n in names], block_size, torch.empty(0), damping, N
    )
    eye = torch.eye(block_size, dtype=torch.float64, device=params[names[0]].device)
    blocks = eye.repeat(sum(inv.counts()), 1, 1) / damping
    for X, y in batches:
        res = compute(model, sum_loss(loss_fn), X, y, BatchGrad())
        G = inv.pad([res[BatchGrad][n].double() for n in names]) / math.sqrt(N)  # [b, nb, B]
        for start in range(0, G.shape[0], chunk_size):
            blocks = woodbury_absorb(blocks, G[start : start + chunk_size].transpose(0, 1))
    inv.blocks = (blocks + blocks.transpose(-1, -2)) / 2
    return inv


def _remove(w: Tensor, inverse: Tensor, new: Tensor, update: str) -> tuple[Tensor, Tensor]:
    """Remove the entries ``new`` (bool ``[k, B]``) from weights ``w`` ``[k, B]`` with inverse
    blocks ``[k, B, B]``, batched over the ``k`` blocks: :func:`obs_update` and
    :func:`obs_downdate` sharing one solve. Each block's group is padded to the largest one;
    a padding slot has a zero column and a unit diagonal, so it changes nothing."""
    q = int(new.sum(-1).max())
    order = torch.sort(new.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :q]
    slot = torch.gather(new, 1, order)  # [k, q], False on padding
    cols = torch.gather(inverse, 2, order[:, None, :].expand(-1, inverse.shape[1], -1))
    cols = cols * slot[:, None, :]  # [k, B, q]
    S = torch.gather(cols, 1, order[:, :, None].expand(-1, -1, q))  # [k, q, q]
    S = S * slot[:, :, None] + torch.diag_embed((~slot).to(S.dtype))
    X = torch.linalg.solve(S, cols.transpose(1, 2))  # (E^T F^-1 E)^-1 E^T F^-1, [k, q, B]
    wq = torch.gather(w, 1, order) * slot
    if update == "joint":
        w = w - (X.transpose(1, 2) @ wq[:, :, None])[..., 0]
    else:
        d = torch.gather(torch.diagonal(inverse, dim1=-2, dim2=-1), 1, order)
        w = w - (cols @ (wq / torch.where(slot, d, 1.0))[:, :, None])[..., 0]
    return w.masked_fill(new, 0.0), inverse - cols @ X


def obs_prune_blocks(
    inv: BlockFisherInverse,
    weights: Sequence[Tensor],
    sparsity: float,
    scope: str = "global",
    steps: int = 8,
    update: str = "joint",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Greedy group OBS on a :class:`BlockFisherInverse` (see the module docstring).

    Args:
        inv: the inverse blocks (their :attr:`~BlockFisherInverse.blocks` are left unchanged).
        weights: the covered parameters' values, in ``inv.names`` order.
        sparsity: the fraction to prune, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"``.
        steps: the number of groups (>= 1).
        update: ``"joint"`` or ``"independent"``.

    Returns:
        ``(values, masks)``: the updated weights (pruned entries zero) and the keep-masks,
        both ``{name: parameter-shaped}``.
    """
    if update not in UPDATES or steps < 1:
        raise ValueError(f"update must be one of {UPDATES} and steps >= 1")
    blocks = inv.blocks.clone()
    w = inv.pad([t.detach().double() for t in weights])  # [nb, B]
    alive = inv.pad([torch.ones(s, dtype=torch.bool, device=w.device) for s in inv.shapes])
    real = alive.clone()
    for t in range(1, steps + 1):
        diag = torch.diagonal(blocks, dim1=-2, dim2=-1).clamp_min(1e-300)
        scores = torch.where(alive, obs_saliency(w, diag), -math.inf)
        keep = masks_from_scores(inv.unpad(scores), sparsity * t / steps, scope)
        new = alive & ~inv.pad([keep[n] for n in inv.names])
        hit = new.any(-1).nonzero().flatten()
        if len(hit):
            w[hit], blocks[hit] = _remove(w[hit], blocks[hit], new[hit], update)
        alive &= ~new
    masks = {n: m.clone() for n, m in inv.unpad(alive | ~real).items()}
    return inv.unpad(w), masks


def woodfisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Any,
    sparsity: float,
    scope: str = "global",
    params: Sequence[str] | None = None,
    damping: float = 1e-4,
    block_size: int = 128,
    steps: int = 8,
    update: str = "joint",
    chunk_size: int = 32,
) -> PruningResult:
    """OBS / WoodFisher pruning with the damped empirical Fisher (see the module docstring).

    Args:
        model: the model (left untouched).
        loss_fn: its loss (MSE, cross-entropy, BCE with logits).
        data: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches.
        sparsity: the fraction of the covered weights to prune, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"``.
        params: the covered parameters (default: every weight with two or more dimensions).
        damping: ``lambda`` in ``F = lambda I + (1/N) sum_n g_n g_n^T`` (absolute: on the
            scale of the squared per-example gradients).
        block_size: entries per diagonal block of ``F``.
        steps: groups in which the weights are removed.
        update: ``"joint"`` (exact OBS per block and group) or ``"independent"``.
        chunk_size: samples per Woodbury update.

    Returns:
        A :class:`~beyondgrad.pruning.PruningResult` (the remaining weights carry the OBS
        update).
    """
    check_sparsity(sparsity, scope)
    names = prunable_parameters(model, params)
    inv = fisher_inverse(model, loss_fn, data, names, damping, block_size, chunk_size)
    named = dict(model.named_parameters())
    values, masks = obs_prune_blocks(inv, [named[n] for n in names], sparsity, scope, steps, update)
    values = {n: v.to(named[n].dtype) for n, v in values.items()}
    return PruningResult(masked_copy(model, masks, values), masks, "woodfisher")
