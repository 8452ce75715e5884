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
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import linalg, linops
from ..distributed import group as dist_group
from ..engine import SamplesCoupledError, check_samples_independent, compute
from ..factors import DiagonalFactors, KroneckerFactors
from ..linops.kfac import fit_blocks
from ..rules.kronecker import gram_add_upper_, mirror_upper_
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

#: the engine's vector kind whose per-row gradients ``g_r`` give ``H = sum_r g_r g_r^T``
ROW_KINDS = {"type-2": ("exact", 0), "empirical": ("grad", 1)}

#: the most entries of one chunk of materialized rows ``[rows, P]`` in :func:`dense_from_rows`
ROW_BUDGET = 1 << 23


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


def dense_from_rows(
    model: nn.Module,
    loss_sum: nn.Module,
    data: Sequence[tuple[Any, Tensor]],
    names: Sequence[str],
    fisher_type: str,
    budget: int = ROW_BUDGET,
) -> Tensor | None:
    """``H = sum_r g_r g_r^T`` ``[P, P]`` from the engine's per-row gradients of
    ``loss_sum`` (``reduction="sum"``): the loss-Hessian square-root rows for the GGN
    (``"type-2"``), the per-sample gradients for ``"empirical"``. One forward and backward per
    batch; the rows are materialized for chunks of samples with at most ``budget`` entries
    (``[rows, P]``) and accumulated by one matrix product per chunk (its upper triangle by
    blocks on CPU, :func:`~beyondgrad.rules.kronecker.gram_add_upper_`, mirrored at the end):
    ``P`` times cheaper than ``P`` operator products.

    Args:
        model, loss_sum: the model and its summed loss.
        data: the ``(X, y)`` batches.
        names: the parameters (flat order).
        fisher_type: ``"type-2"`` or ``"empirical"``.
        budget: the most entries of one chunk of rows.

    Returns:
        ``H`` (detached), or ``None`` where the rows do not apply (MC Fisher, samples coupled
        by the model, e.g. BatchNorm in training mode): use the operator then.
    """
    if fisher_type not in ROW_KINDS:
        return None
    try:
        check_samples_independent(model)
    except SamplesCoupledError:
        return None
    kind = ROW_KINDS[fisher_type]
    named = dict(model.named_parameters())
    sizes = [named[n].numel() for n in names]
    first = named[names[0]]
    H = torch.zeros(sum(sizes), sum(sizes), dtype=first.dtype, device=first.device)
    for X, y in data:
        stats = compute(model, loss_sum, X, y, vectors=[kind]).stats
        assert stats is not None
        forms = stats.forms(kind)
        N = stats.num_samples
        vectors = next(iter(forms.values())).vectors if forms else 1
        step = max(1, budget // max(1, vectors * sum(sizes)))
        for start in range(0, N, step):
            index = torch.arange(start, min(N, start + step), device=first.device)
            rows = torch.cat(
                [
                    forms[n].select(index).batch_grad().reshape(-1, size)
                    if n in forms
                    else first.new_zeros(vectors * len(index), size)
                    for n, size in zip(names, sizes)
                ],
                1,
            )
            gram_add_upper_(H, rows)  # the upper triangle (half the products on CPU)
        del stats, forms, rows  # one batch's engine state at a time
    return mirror_upper_(H).detach()


def output_jacobians(
    model: nn.Module, X: Any, names: Sequence[str], out_shape: Sequence[int]
) -> Tensor | None:
    """Per-sample Jacobians of the outputs, ``J^T`` as ``[P, N, K]`` (``K`` outputs per
    sample, flattened), from one backward of the engine: the GGN rows of ``MSELoss(sum)`` are
    ``sqrt(2) e_k^T J_n`` (its output Hessian is ``2 I``), so all ``N K`` rows come out of
    ``K`` backpropagated vectors instead of ``N K`` vector-Jacobian products.

    Args:
        model: the model (samples independent).
        X: a batch of ``N`` inputs.
        names: the parameters (flat order, ``P`` entries).
        out_shape: the model output's shape per sample.

    Returns:
        ``[P, N, K]``, or ``None`` when the model couples its samples (use
        ``bg.linops.Jacobian`` then).
    """
    try:
        check_samples_independent(model)
    except SamplesCoupledError:
        return None
    named = dict(model.named_parameters())
    first = named[names[0]]
    kind = ("exact", 0)
    N = _num_samples(X)
    y = torch.zeros(N, *out_shape, dtype=first.dtype, device=first.device)
    stats = compute(model, nn.MSELoss(reduction="sum"), X, y, vectors=[kind]).stats
    assert stats is not None
    forms = stats.forms(kind)
    K = math.prod(out_shape)
    parts = [
        forms[n].batch_grad().reshape(K, N, -1)
        if n in forms
        else first.new_zeros(K, N, named[n].numel())
        for n in names
    ]
    return torch.cat(parts, 2).permute(2, 1, 0) / math.sqrt(2.0)


def _num_samples(X: Any) -> int:
    if isinstance(X, Tensor):
        return X.shape[0]
    values = X.values() if isinstance(X, dict) else X
    return _num_samples(next(iter(values)))


def _kronecker(
    factors: dict[str, KroneckerFactors | DiagonalFactors],
    tied_params: Sequence[str],
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    ekfac: linops.EKFAC | None = None,
) -> KroneckerCurvature:
    """The structure from KFAC's blocks by module, or EKFAC's (``ekfac``: its eigenbases
    and corrected eigenvalues)."""
    if tied_params:
        raise ValueError(
            f"Kronecker structures need one block per parameter; {list(tied_params)} are "
            "shared by several modules (tied weights): pass params without them or untie them"
        )
    blocks: list[KroneckerBlock | DiagonalBlock] = []
    corrected = None if ekfac is None else ekfac.eigenvalues
    for key, block in factors.items():
        if not isinstance(block, KroneckerFactors):
            values = torch.cat([d.reshape(-1) for d in block.diagonal.values()])
            blocks.append(DiagonalBlock(tuple(block.diagonal), values))
            continue
        if block.bias == "separate":
            raise NotImplementedError("Kronecker blocks with a separate bias are not supported")
        bases = None
        if corrected is not None:
            qa, qb = ekfac.bases[key]  # type: ignore[union-attr]
            left, right = (qb, qa) if block.order == "B kron A" else (qa, qb)
            values = corrected[key]
        else:  # eigenvalues now (the evidence), eigenbases at their first use
            values, bases = _kronecker_values(block)
            left = right = None
        blocks.append(
            KroneckerBlock(
                tuple(block.params),
                values.clamp_min(0),
                left,
                right,
                block.order,
                block.weight_perm,
                block.bias == "joint",
                bases,
            )
        )
    return KroneckerCurvature(names, shapes, blocks)


def _kronecker_values(block: KroneckerFactors) -> tuple[Tensor, Any]:
    """The block's eigenvalues ``[G, rows, cols]`` (first operand of ``order`` on the rows)
    from the factors' eigenvalues alone (``eigvalsh``, about a third of ``eigh``'s cost), and
    a function giving the eigenbases ``(left, right)`` later. Where ``eigvalsh`` fails, the
    robust decomposition of :meth:`KroneckerFactors.eigh` gives both now."""

    def bases() -> tuple[Tensor, Tensor]:
        _, qa, _, qb = block.eigh()
        if qa.ndim == 2:
            qa, qb = qa[None], qb[None]
        return (qb, qa) if block.order == "B kron A" else (qa, qb)

    try:
        la = torch.linalg.eigvalsh(0.5 * (block.A + block.A.mT))
        lb = torch.linalg.eigvalsh(0.5 * (block.B + block.B.mT))
        finite = bool(torch.isfinite(la).all() & torch.isfinite(lb).all())
    except RuntimeError:  # no convergence: the robust path (shifts, float64) decides
        finite = False
    if not finite:  # the robust path decides (and names non-finite factors)
        la, _, lb, _ = block.eigh()
    if la.ndim == 1:
        la, lb = la[None], lb[None]
    l_left, l_right = (lb, la) if block.order == "B kron A" else (la, lb)
    return l_left.unsqueeze(2) * l_right.unsqueeze(1), bases


def _check_choices(structure: str, fisher_type: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")


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
    totals: list[tuple[float, int, int]] | None = None,
) -> DenseCurvature | DiagonalCurvature | KroneckerCurvature | LowRankCurvature:
    """The curvature of ``loss_sum`` (``reduction="sum"``) over ``data`` w.r.t. the parameters
    ``names`` (in ``model.named_parameters()`` order) in ``structure``:

    * ``"full"``: dense, from the engine's rows (:func:`dense_from_rows`), else (MC, coupled
      samples, a process group) from ``P`` products of ``bg.linops.GGN`` / ``Fisher`` /
      ``EmpiricalFisher``;
    * ``"diag"``: that operator's exact ``diagonal()``;
    * ``"lowrank"``: its ``rank`` leading eigenpairs (:func:`beyondgrad.linalg.eigsh`, Lanczos
      to a relative residual of 1e-8, started from ``generator`` or a fixed seed);
    * ``"kfac"`` / ``"ekfac"``: ``bg.linops.KFAC`` / ``EKFAC`` with ``fisher_type`` and
      ``kfac_approx``, in their Kronecker eigenbases.

    ``fisher_type="mc"`` draws ``mc_samples`` labels per sample from ``generator``.
    ``totals``: where the structure's pass evaluated the loss at ``y`` on every batch
    (``"kfac"``), appended ``(summed loss, samples, output entries)`` of this rank's data.
    ``process_group``: as for the operators (:mod:`beyondgrad.distributed`; ``None``: each
    rank's ``data`` is its shard under an initialized group; ``"local"``: no reduction).

    Returns:
        A structure of :mod:`beyondgrad.laplace.curvature` holding ``H`` (detached, no ``1/N``).
    """
    _check_choices(structure, fisher_type)
    batches = list(data)
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    if structure in ("kfac", "ekfac"):
        args = (model, loss_sum, batches, fisher_type, kfac_approx, mc_samples)
        kw = {"generator": generator, "params": list(names), "process_group": process_group}
        if structure == "ekfac":
            op = linops.EKFAC(*args, **kw)
            return _kronecker(op.blocks, op.tied_params, names, shapes, op)
        fitted = fit_blocks(*args, **kw)  # the factors alone: no operator is built
        if totals is not None:
            totals.append((float(fitted.loss), fitted.num_rows, fitted.num_outputs))
        return _kronecker(fitted.blocks, fitted.tied_params, names, shapes)
    rows = structure == "full" and dist_group.resolve_group(process_group) is None
    H = dense_from_rows(model, loss_sum, batches, names, fisher_type) if rows else None
    if H is not None:
        return DenseCurvature(names, shapes, H)
    op = _operator(
        model, loss_sum, batches, names, fisher_type, mc_samples, generator, process_group
    )
    return _from_operator(op, structure, names, shapes, rank, generator)


def _from_operator(
    op: linops.LinearOperator,
    structure: str,
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    rank: int,
    generator: torch.Generator | None,
) -> DenseCurvature | DiagonalCurvature | LowRankCurvature:
    """The dense, diagonal or low-rank structure from the curvature operator."""
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


__all__ = [
    "FISHER_TYPES",
    "ROW_BUDGET",
    "ROW_KINDS",
    "STRUCTURES",
    "build_curvature",
    "dense_from_rows",
    "output_jacobians",
    "sum_reduction",
]
