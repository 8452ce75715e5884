"""KFAC over a data set: a :class:`~beyondgrad.linops.structures.BlockDiagonal` of one block
per module -- :class:`~beyondgrad.linops.structures.Kronecker` factors or, for layers without
Kronecker structure, a :class:`~beyondgrad.linops.structures.Diagonal` of the same curvature
(see :class:`beyondgrad.KFAC`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import group as dist_group
from ..factors import DiagonalFactors, KroneckerFactors, to_block_layout
from . import _engine
from .data import DataSet
from .structures import BlockDiagonal, Diagonal, Kronecker, StructuredOperator

Block = KroneckerFactors | DiagonalFactors


def _add(total: Block, part: Block) -> None:
    if isinstance(total, KroneckerFactors) and isinstance(part, KroneckerFactors):
        total.A += part.A
        total.B += part.B
    elif isinstance(total, DiagonalFactors) and isinstance(part, DiagonalFactors):
        for n, v in part.diagonal.items():
            total.diagonal[n] += v


def data_set_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    data: DataSet,
    quantity: _engine.KFACQuantity,
    generator: torch.Generator | None = None,
) -> dict[str, Block]:
    """The KFAC blocks of the data-set loss, in one streaming pass: per module the sums over
    all samples (:func:`~beyondgrad.linops._engine.batch_kronecker`), then ``A`` divided by
    the number of samples and ``B`` (and diagonals) by it for mean losses.

    Under a process group (``data.group``) the sums of every rank's shard are summed over
    the ranks (each rank needs at least one batch).

    Returns:
        Blocks by module name, with ``num_data`` the number of samples.
    """
    sums: dict[str, Block] = {}
    for X, y, N in data.batches():
        batch = _engine.batch_kronecker(model, loss_fn, X, y, N, quantity, generator)
        for name, block in batch.items():
            if name in sums:
                _add(sums[name], block)
            else:
                sums[name] = block
    _sum_over_ranks(sums, data)
    total, b_scale = data.total(), data.normalizer()
    out: dict[str, Block] = {}
    for name, b in sums.items():
        if isinstance(b, KroneckerFactors):
            out[name] = KroneckerFactors(
                b.A / total, b.B * b_scale, b.order, b.params, b.bias, quantity.fisher_type,
                quantity.kfac_approx, b.R, total, None, b.weight_perm,
            )  # fmt: skip
        else:
            diag = {n: v * b_scale for n, v in b.diagonal.items()}
            out[name] = DiagonalFactors(diag, quantity.fisher_type, b.R, total)
    return out


def _sum_over_ranks(sums: dict[str, Block], data: DataSet) -> None:
    """Sum every block's factors over the ranks of ``data.group`` in place (no-op without).

    Raises:
        RuntimeError: a rank without batches, or ranks with other blocks or shapes.
    """
    group = data.group
    if group is None:
        return
    empty = dist_group.sum_count(0 if sums else 1, group)
    if empty:
        raise RuntimeError(
            f"{data.who}: {empty} rank(s) of the process group have no batch in their shard; "
            "give every rank at least one batch"
        )
    signature = [(n, [tuple(t.shape) for t in _tensors(b)]) for n, b in sorted(sums.items())]
    dist_group.check_same(signature, "the KFAC blocks (modules and factor shapes)", group)
    dist_group.all_reduce_tensors_([t for _, b in sorted(sums.items()) for t in _tensors(b)], group)


def _tensors(block: Block) -> list[Tensor]:
    """The tensors of a block of sums, in a fixed order."""
    if isinstance(block, KroneckerFactors):
        return [block.A, block.B]
    return [block.diagonal[n] for n in sorted(block.diagonal)]


def _restrict(block: Block, wanted: set[str]) -> Block | None:
    """The principal sub-block of ``block`` over the parameters in ``wanted`` (None: none)."""
    keep = [p for p in block.params if p in wanted]
    if not keep:
        return None
    if len(keep) == len(block.params):
        return block
    if isinstance(block, DiagonalFactors):
        diag = {n: v for n, v in block.diagonal.items() if n in wanted}
        return DiagonalFactors(diag, block.fisher_type, block.R, block.num_data)
    if keep[0] != block.params[0] or block.bias != "joint":
        raise ValueError(
            f"a subset with the bias {keep} but not the weight {block.params[0]!r} of its "
            "Kronecker block is not supported; add the weight"
        )
    A = block.A[..., :-1, :-1]  # the weight rows/columns of the joint A
    return KroneckerFactors(
        A.clone(), block.B, block.order, tuple(keep), None, block.fisher_type,
        block.kfac_approx, block.R, block.num_data, None, block.weight_perm,
    )  # fmt: skip


def covered_blocks(
    model: nn.Module, blocks: dict[str, Block], params: Iterable[str] | None
) -> tuple[list[str], dict[str, Block]]:
    """The trainable parameter names in model order (restricted to ``params``) and the blocks
    restricted to them; raises unless every parameter has exactly one block."""
    all_names = [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = set(all_names if params is None else params)
    unknown = wanted - set(all_names)
    if unknown:
        raise ValueError(f"unknown or frozen parameters: {sorted(unknown)}")
    covered = [p for b in blocks.values() for p in b.params if p in wanted]
    if sorted(covered) != sorted(wanted):
        bad = sorted(n for n in wanted if covered.count(n) != 1)
        raise RuntimeError(
            f"KFAC blocks do not cover the parameters {bad} exactly once (weight tying "
            "across modules gives a parameter several blocks); the operator is undefined "
            "there (pass params=... without them)"
        )
    if params is None:
        return all_names, blocks
    restricted = {k: _restrict(b, wanted) for k, b in blocks.items()}
    return [n for n in all_names if n in wanted], {k: b for k, b in restricted.items() if b}


class KFAC(BlockDiagonal):
    """``bg.linops.KFAC(model, loss_fn, data, fisher_type="mc", kfac_approx="expand",
    mc_samples=1, num_data=None, generator=None, params=None, process_group=None)``: the
    engine's KFAC blocks
    accumulated over the data set in one streaming pass (``A`` averaged over all samples,
    ``B`` summed with the data-set reduction ``N_b / num_data`` for mean losses), acting on
    flat vectors over all trainable parameters in ``model.named_parameters()`` order, or over
    ``params`` (names, kept in that order): the principal sub-block of the same KFAC matrix
    (whole blocks; a weight without its joint bias keeps ``B kron A`` with ``A`` restricted to
    the weight; a bias without its weight raises).

    ``blocks`` holds the per-module factors (:class:`~beyondgrad.KroneckerFactors`,
    :class:`~beyondgrad.DiagonalFactors`); the operator is a
    :class:`~beyondgrad.linops.structures.BlockDiagonal` of
    :class:`~beyondgrad.linops.structures.Kronecker` and
    :class:`~beyondgrad.linops.structures.Diagonal` blocks, so ``inverse(damping)`` (an
    operator), ``logdet(damping)``, ``trace()``, ``eigvalsh()`` and ``eigh(k, which)`` are
    exact for the structure. ``data``: a list or ``DataLoader`` of ``(X, y)`` batches, or a
    one-shot iterator with ``num_data``.

    ``process_group`` (see :mod:`beyondgrad.distributed`): under ``torch.distributed``
    ``data`` is this rank's shard and the factor sums and sample counts are summed over the
    ranks, so every rank holds the KFAC of the whole data set (MC draws: each rank draws from
    its own ``generator``; pass generators seeded differently per rank for independent
    draws)."""

    #: how often the constructor iterates the data (EKFAC: twice)
    passes = "one"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[tuple[Any, Tensor]],
        fisher_type: str = "mc",
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        num_data: int | None = None,
        generator: torch.Generator | None = None,
        params: Iterable[str] | None = None,
        process_group: Any = None,
    ):
        _engine.check_loss_fn(loss_fn)
        q = _engine.KFACQuantity(
            fisher_type=fisher_type, kfac_approx=kfac_approx, mc_samples=mc_samples
        )
        ds = DataSet(
            data, loss_fn, num_data, passes=self.passes, who=type(self).__name__,
            process_group=process_group,
        )  # fmt: skip
        self.group = ds.group
        factors = data_set_factors(model, loss_fn, ds, q, generator)
        self.names, self.blocks = covered_blocks(model, factors, params)
        self.params = dict(model.named_parameters())
        self.sizes = [self.params[n].numel() for n in self.names]
        self.offsets = {n: sum(self.sizes[:i]) for i, n in enumerate(self.names)}
        self.num_data = ds.total()
        parts = self._structure(model, loss_fn, ds, generator, fisher_type, mc_samples)
        super().__init__(parts, sum(self.sizes))

    def block_index(self, block: Block) -> Tensor:
        """Positions in the flat vector of the block's entries, in the block's layout
        (:func:`~beyondgrad.factors.to_block_layout` for Kronecker blocks)."""
        device = self.params[block.params[0]].device

        def positions(name: str) -> Tensor:
            p = self.params[name]
            start = self.offsets[name]
            return torch.arange(start, start + p.numel(), device=device).reshape(1, *p.shape)

        if isinstance(block, DiagonalFactors):
            return torch.cat([positions(n).reshape(-1) for n in block.diagonal])
        bias = positions(block.params[1]) if block.bias == "joint" else None
        layout = to_block_layout(
            positions(block.params[0]), bias, block.order, block.weight_perm, block.groups
        )
        return layout.reshape(-1)

    def _structure(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: DataSet,
        generator: torch.Generator | None,
        fisher_type: str,
        mc_samples: int,
    ) -> list[tuple[Tensor, StructuredOperator]]:
        """The blocks of the operator: ``(index, Kronecker or Diagonal)`` per module."""
        parts: list[tuple[Tensor, StructuredOperator]] = []
        for block in self.blocks.values():
            op: StructuredOperator
            if isinstance(block, DiagonalFactors):
                op = Diagonal(block.diagonal)
            elif block.order == "B kron A":
                op = Kronecker(block.B, block.A)
            else:
                op = Kronecker(block.A, block.B)
            parts.append((self.block_index(block), op))
        return parts


__all__ = ["KFAC", "covered_blocks", "data_set_factors"]
