"""Curvature structures built from ``bg.linops`` operators.

The one module of :mod:`beyondgrad.laplace` and :mod:`beyondgrad.influence` that knows how the
operators store their state: the per-module factors of :class:`beyondgrad.linops.KFAC`
(``blocks``: :class:`~beyondgrad.factors.KroneckerFactors` / ``DiagonalFactors``) and the
corrected eigenvalues and bases of :class:`beyondgrad.linops.EKFAC` (``eigenvalues``,
``bases``). Everything else goes through public operator behaviour (``to_dense()``,
``diagonal()``, products for :func:`beyondgrad.linalg.eigsh`).

All builders take the loss with ``reduction="sum"`` (see :func:`sum_reduction`): the curvature
is then that of ``sum_n l_n`` (no data-set reduction factor), e.g. ``sum_n J_n^T H_n J_n``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import linalg, linops
from ..factors import KroneckerFactors
from .curvature import (
    DenseCurvature,
    DiagonalBlock,
    DiagonalCurvature,
    KroneckerBlock,
    KroneckerCurvature,
    LowRankCurvature,
)

FISHER_TYPES = ("type-2", "mc", "empirical")
STRUCTURES = ("full", "diag", "kfac", "ekfac", "lowrank")


def sum_reduction(loss_fn: nn.Module) -> nn.Module:
    """A shallow copy of ``loss_fn`` with ``reduction="sum"`` (the original is untouched)."""
    out = copy.copy(loss_fn)
    out.reduction = "sum"  # type: ignore[assignment]
    return out


def _operator(
    model: nn.Module,
    loss_sum: nn.Module,
    data: Sequence[tuple[Any, Tensor]],
    names: Sequence[str],
    fisher_type: str,
    mc_samples: int,
    generator: torch.Generator | None,
    process_group: Any = None,
) -> linops.LinearOperator:
    kw = {"params": list(names), "process_group": process_group}
    if fisher_type == "type-2":
        return linops.GGN(model, loss_sum, data, **kw)
    if fisher_type == "mc":
        return linops.Fisher(
            model, loss_sum, data, mc_samples=mc_samples, generator=generator, **kw
        )
    if fisher_type == "empirical":
        return linops.EmpiricalFisher(model, loss_sum, data, **kw)
    raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")


def _kronecker(
    op: linops.KFAC, names: Sequence[str], shapes: Sequence[torch.Size]
) -> KroneckerCurvature:
    if op.tied_params:
        raise ValueError(
            f"Kronecker structures need one block per parameter; {op.tied_params} are shared "
            "by several modules (tied weights): pass params without them or untie them"
        )
    blocks: list[KroneckerBlock | DiagonalBlock] = []
    corrected = getattr(op, "eigenvalues", None) if isinstance(op, linops.EKFAC) else None
    for key, block in op.blocks.items():
        if not isinstance(block, KroneckerFactors):
            values = torch.cat([d.reshape(-1) for d in block.diagonal.values()])
            blocks.append(DiagonalBlock(tuple(block.diagonal), values))
            continue
        if block.bias == "separate":
            raise NotImplementedError("Kronecker blocks with a separate bias are not supported")
        if corrected is not None:
            qa, qb = op.bases[key]
            left, right = (qb, qa) if block.order == "B kron A" else (qa, qb)
            values = corrected[key]
        else:
            la, qa, lb, qb = block.eigh()
            if la.ndim == 1:
                la, qa, lb, qb = la[None], qa[None], lb[None], qb[None]
            (l_left, left), (l_right, right) = (
                ((lb, qb), (la, qa)) if block.order == "B kron A" else ((la, qa), (lb, qb))
            )
            values = l_left.unsqueeze(2) * l_right.unsqueeze(1)
        blocks.append(
            KroneckerBlock(
                tuple(block.params),
                values.clamp_min(0),
                left,
                right,
                block.order,
                block.weight_perm,
                block.bias == "joint",
            )
        )
    return KroneckerCurvature(names, shapes, blocks)


def build_curvature(
    model: nn.Module,
    loss_sum: nn.Module,
    data: Iterable[tuple[Any, Tensor]],
    names: Sequence[str],
    structure: str,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    rank: int = 10,
    generator: torch.Generator | None = None,
    process_group: Any = None,
) -> DenseCurvature | DiagonalCurvature | KroneckerCurvature | LowRankCurvature:
    """The curvature of ``loss_sum`` (``reduction="sum"``) over ``data`` w.r.t. the parameters
    ``names`` (in ``model.named_parameters()`` order) in ``structure``:

    * ``"full"``: the dense matrix of ``bg.linops.GGN`` (``fisher_type="type-2"``),
      ``Fisher`` (``"mc"``) or ``EmpiricalFisher`` (``"empirical"``), ``P`` products;
    * ``"diag"``: that operator's exact ``diagonal()``;
    * ``"lowrank"``: its ``rank`` leading eigenpairs (:func:`beyondgrad.linalg.eigsh`, Lanczos
      to a relative residual of 1e-8, started from ``generator`` or a fixed seed);
    * ``"kfac"`` / ``"ekfac"``: ``bg.linops.KFAC`` / ``EKFAC`` with ``fisher_type`` and
      ``kfac_approx``, in their Kronecker eigenbases.

    ``fisher_type="mc"`` draws ``mc_samples`` labels per sample from ``generator``.
    ``process_group``: as for the operators (:mod:`beyondgrad.distributed`; ``None``: each
    rank's ``data`` is its shard under an initialized group; ``"local"``: no reduction).

    Returns:
        A structure of :mod:`beyondgrad.laplace.curvature` holding ``H`` (detached, no ``1/N``).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    batches = list(data)
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    if structure in ("kfac", "ekfac"):
        cls = linops.KFAC if structure == "kfac" else linops.EKFAC
        op = cls(
            model, loss_sum, batches, fisher_type, kfac_approx, mc_samples,
            generator=generator, params=list(names), process_group=process_group,
        )  # fmt: skip
        return _kronecker(op, names, shapes)
    op = _operator(
        model, loss_sum, batches, names, fisher_type, mc_samples, generator, process_group
    )
    if structure == "full":
        return DenseCurvature(names, shapes, op.to_dense().detach())
    if structure == "diag":
        return DiagonalCurvature(names, shapes, op.diagonal().detach())  # type: ignore[attr-defined]
    if not 1 <= rank <= op.shape[0]:
        raise ValueError(f"rank must be in [1, {op.shape[0]}], got {rank}")
    # a fixed start vector unless a generator is given: the same data give the same pairs
    start = generator or torch.Generator(op.device).manual_seed(0)
    values, vectors = linalg.eigsh(op, k=rank, tol=1e-8, generator=start)
    return LowRankCurvature(names, shapes, values.detach(), vectors.detach())


__all__ = ["FISHER_TYPES", "STRUCTURES", "build_curvature", "sum_reduction"]
