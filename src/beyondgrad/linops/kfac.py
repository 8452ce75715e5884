"""KFAC over a data set: a :class:`~beyondgrad.linops.structures.BlockDiagonal` of one block
per module -- :class:`~beyondgrad.linops.structures.Kronecker` factors or, for layers without
Kronecker structure, a :class:`~beyondgrad.linops.structures.Diagonal` of the same curvature
(see :class:`beyondgrad.KFAC`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import group as dist_group
from ..factors import DiagonalFactors, KroneckerFactors, to_block_layout
from . import _engine, layout
from .data import DataSet
from .structures import BlockDiagonal, Diagonal, Kronecker, StructuredOperator
from .tied import METHODS, KroneckerSum

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
    outputs: list[tuple[Tensor, int, int]] | None = None,
) -> dict[str, Block]:
    """The KFAC blocks of the data-set loss, in one streaming pass: per module the sums over
    all samples (:func:`~beyondgrad.linops._engine.batch_kronecker`), then ``A`` divided by
    the number of samples and ``B`` (and diagonals) by it for mean losses. ``outputs``:
    appended each batch's loss, output rows and output entries (this rank's batches).

    Under a process group (``data.group``) the sums of every rank's shard are summed over
    the ranks (each rank needs at least one batch).

    Returns:
        Blocks by module name, with ``num_data`` the number of samples.
    """
    sums: dict[str, Block] = {}
    for X, y, N in data.batches():
        batch = _engine.batch_kronecker(model, loss_fn, X, y, N, quantity, generator, outputs)
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
    restricted to them; raises unless every parameter has a block. A parameter shared by
    several modules (tied weights) has several blocks; :class:`KFAC` sums them."""
    all_names = [n for n, p in model.named_parameters() if p.requires_grad]
    wanted = set(all_names if params is None else params)
    unknown = wanted - set(all_names)
    if unknown:
        raise ValueError(f"unknown or frozen parameters: {sorted(unknown)}")
    covered = {p for b in blocks.values() for p in b.params if p in wanted}
    if covered != wanted:
        raise RuntimeError(
            f"no KFAC block covers the parameters {sorted(wanted - covered)} (no recorded "
            "call reached them); pass params=... without them"
        )
    if params is None:
        return all_names, blocks
    restricted = {k: _restrict(b, wanted) for k, b in blocks.items()}
    return [n for n in all_names if n in wanted], {k: b for k, b in restricted.items() if b}


def tied_groups(params: list[tuple[str, ...]]) -> list[list[int]]:
    """Indices of the blocks grouped by shared parameters (connected components), in the
    order of their first block."""
    owner: dict[str, int] = {}
    parent = list(range(len(params)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, names in enumerate(params):
        for n in names:
            if n in owner:
                a, b = root(owner[n]), root(i)
                parent[max(a, b)] = min(a, b)
            else:
                owner[n] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(params)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def tied_block(
    terms: list[tuple[Tensor, StructuredOperator]], size: int, method: str
) -> StructuredOperator:
    """The block of modules sharing parameters: a :class:`Diagonal` of the summed diagonals
    when every term is diagonal, else a :class:`~beyondgrad.linops.tied.KroneckerSum`."""
    if all(isinstance(op, Diagonal) for _, op in terms):
        first = terms[0][1]
        values = torch.zeros(size, dtype=first.dtype, device=first.device)
        for index, op in terms:
            values.index_add_(0, index.to(values.device), op.values)  # type: ignore[attr-defined]
        return Diagonal(values)
    return KroneckerSum(terms, size, method)


@dataclass
class FittedBlocks:
    """What one streaming pass over the data gives (:func:`fit_blocks`): the covered
    parameter names in model order, their blocks by module, the tied parameters (several
    blocks), the :class:`~beyondgrad.linops.data.DataSet` read, and the sum of the batches'
    losses (detached; the data set's summed loss for ``reduction="sum"``), of their output
    rows (the leading dimension) and output entries (this rank's batches)."""

    names: list[str]
    blocks: dict[str, Block]
    tied_params: list[str]
    data: DataSet
    loss: Tensor
    num_rows: int
    num_outputs: int


def fit_blocks(
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
    passes: str = "one",
    who: str = "KFAC",
) -> FittedBlocks:
    """The data set's KFAC blocks (:func:`data_set_factors`) restricted to ``params``
    (:func:`covered_blocks`), without the operator built on them: for callers that read the
    factors only (``bg.laplace``). Arguments as for :class:`KFAC`; ``passes`` and ``who`` as
    for :class:`~beyondgrad.linops.data.DataSet`."""
    _engine.check_loss_fn(loss_fn)
    q = _engine.KFACQuantity(
        fisher_type=fisher_type, kfac_approx=kfac_approx, mc_samples=mc_samples
    )
    ds = DataSet(data, loss_fn, num_data, passes=passes, who=who, process_group=process_group)
    outputs: list[tuple[Tensor, int, int]] = []
    factors = data_set_factors(model, loss_fn, ds, q, generator, outputs)
    names, blocks = covered_blocks(model, factors, params)
    counts = Counter(n for b in blocks.values() for n in b.params)
    tied = sorted(n for n, c in counts.items() if c > 1)
    loss = torch.stack([o[0] for o in outputs]).sum()  # data_set_factors: at least one batch
    rows, entries = sum(o[1] for o in outputs), sum(o[2] for o in outputs)
    return FittedBlocks(names, blocks, tied, ds, loss, rows, entries)


class KFAC(BlockDiagonal):
    """``bg.linops.KFAC(model, loss_fn, data, fisher_type="mc", kfac_approx="expand",
    mc_samples=1, num_data=None, generator=None, params=None, process_group=None,
    tied_inverse="exact")``: the engine's KFAC blocks
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
    draws).

    Tied weights (a parameter shared by several modules, e.g. GPT-2's token embedding and
    output layer): the parameter's block is the sum of the modules' blocks,
    ``A_1 kron B_1 + B_2 kron A_2`` (a :class:`~beyondgrad.linops.tied.KroneckerSum`; one
    module's joint bias joins the block, padded with zeros in the other term). Products and
    ``trace()`` are exact; ``inverse(damping)`` and ``logdet(damping)`` are exact in closed form
    (one congruence) for ``damping = 0`` or when the damping folds into a term; otherwise
    ``tied_inverse="exact"`` solves each product with CG preconditioned by that closed form
    (to relative residual ``max(1e-10, 100 eps)``), and ``tied_inverse="factored"`` uses the
    closed form of the factored-damping approximation (every factor damped, Martens and
    Grosse's pi-rule per term) instead -- an approximation of ``(K + d I)^{-1}``.
    ``logdet(damping)`` without a closed form and ``eigh``/``eigvalsh`` of such a block come
    from the dense block (up to ``KroneckerSum.dense_limit`` entries; larger ones are refused).
    :class:`~beyondgrad.linops.EKFAC` refuses tied weights."""

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
        tied_inverse: str = "exact",
    ):
        if tied_inverse not in METHODS:
            raise ValueError(f"tied_inverse must be one of {METHODS}, got {tied_inverse!r}")
        self.tied_inverse = tied_inverse
        fitted = fit_blocks(
            model, loss_fn, data, fisher_type, kfac_approx, mc_samples, num_data, generator,
            params, process_group, self.passes, type(self).__name__,
        )  # fmt: skip
        ds = fitted.data
        self.group = ds.group
        self.names, self.blocks = fitted.names, fitted.blocks
        #: parameters shared by several modules (tied weights): their blocks are summed
        self.tied_params = fitted.tied_params
        self.params = dict(model.named_parameters())
        self.sizes = [self.params[n].numel() for n in self.names]
        self.offsets = {n: sum(self.sizes[:i]) for i, n in enumerate(self.names)}
        self.num_data = ds.total()
        parts = self._structure(model, loss_fn, ds, generator, fisher_type, mc_samples)
        super().__init__(parts, sum(self.sizes))

    def __matmul__(self, other: Any) -> Any:
        """Flat ``A @ v`` / ``A @ V``, or vectors in the parameters' layout (a list, tuple or
        dict of ``[*shape]`` or ``[k, *shape]`` tensors over ``names``, returned alike; see
        :mod:`beyondgrad.linops.layout`): packed into a flat block and split again (two
        copies)."""
        if not layout.is_parameter_layout(other):
            return super().__matmul__(other)
        shapes = [self.params[n].shape for n in self.names]
        V, single = layout.parameter_block(other, self.names, shapes, self.dtype, self.device)
        out = layout.split_block(self._matmat(layout.flat_block(V)), shapes)
        return layout.in_layout_of(other, self.names, out, single)

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
        ops: list[tuple[Block, StructuredOperator]] = []
        for block in self.blocks.values():
            op: StructuredOperator
            if isinstance(block, DiagonalFactors):
                op = Diagonal(block.diagonal)
            elif block.order == "B kron A":
                op = Kronecker(block.B, block.A)
            else:
                op = Kronecker(block.A, block.B)
            ops.append((block, op))
        return self.assemble(ops)

    def assemble(
        self, ops: list[tuple[Block, StructuredOperator]]
    ) -> list[tuple[Tensor, StructuredOperator]]:
        """The operator's blocks from one operator per module block: modules that share a
        parameter (tied weights) become one :class:`~beyondgrad.linops.tied.KroneckerSum`
        over the union of their entries (a :class:`Diagonal` when all are diagonal).

        Args:
            ops: ``(module block, its operator)`` pairs, one per module block.

        Returns:
            ``(index into the flat vector, operator)`` pairs for :class:`BlockDiagonal`.
        """
        groups = tied_groups([b.params for b, _ in ops])
        parts: list[tuple[Tensor, StructuredOperator]] = []
        for members in groups:
            if len(members) == 1:
                block, op = ops[members[0]]
                parts.append((self.block_index(block), op))
                continue
            # the largest term hosts the layout (it covers the others' entries when the sum
            # has a closed form); the union is its index followed by the rest
            members = sorted(members, key=lambda i: -ops[i][1].shape[0])
            indices = [self.block_index(ops[i][0]) for i in members]
            rest = torch.cat(indices[1:])
            union = torch.cat([indices[0], rest[~torch.isin(rest, indices[0])].unique()])
            where = torch.full((sum(self.sizes),), -1, dtype=torch.long, device=union.device)
            where[union] = torch.arange(union.numel(), device=union.device)
            terms = [(where[idx], ops[i][1]) for idx, i in zip(indices, members)]
            parts.append((union, tied_block(terms, union.numel(), self.tied_inverse)))
        return parts


__all__ = ["KFAC", "covered_blocks", "data_set_factors", "tied_block", "tied_groups"]
