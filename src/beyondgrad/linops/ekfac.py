"""EKFAC: KFAC with eigenvalues corrected in the Kronecker eigenbasis (George et al. 2018).

For each block with factors ``B kron A = (Q_B kron Q_A)(L_B kron L_A)(Q_B kron Q_A)^T`` the
Kronecker eigenvalues are replaced by the second moments of the per-row gradients in that
basis, ``s = sum_r (Q_B^T g_r Q_A)^2`` (rows: the backpropagated vectors of every sample, with
the data-set reduction), so the diagonal of the curvature in the eigenbasis is exact. For
``nn.Linear`` and ungrouped convolutions the rotation is applied to the layer inputs and output
gradients (``(A Q_A, G Q_B)``), never forming per-sample gradients; other blocks rotate the
materialized rows. Blocks without Kronecker structure keep their diagonal. The operator is a
:class:`~beyondgrad.linops.structures.BlockDiagonal` of
:class:`~beyondgrad.linops.structures.KroneckerEigen` (and diagonal) blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import group as dist_group
from ..factors import DiagonalFactors, KroneckerFactors, to_block_layout
from ..linalg.eigenbasis import rotate
from . import _engine
from .data import DataSet
from .kfac import KFAC, Block
from .structures import Diagonal, KroneckerEigen, StructuredOperator


def corrected_eigenvalues(
    block: KroneckerFactors, forms: dict[str, _engine.Form], left: Tensor, right: Tensor
) -> Tensor:
    """``sum_r (left^T g_r right)^2`` ``[G, rows, cols]`` in the block's layout, for the
    per-row gradients ``g_r`` of one batch (``left``/``right``: ``[G, ., .]`` eigenbases of the
    block's row and column factors)."""
    if block.order == "B kron A" and block.weight_perm is None and block.groups == 1:
        s = _engine.kronecker_rotated_second_moment(
            forms[block.params[0]], right[0], left[0], block.bias == "joint"
        )
        if s is not None:
            return s.unsqueeze(0)
    rows = [forms[n].batch_grad() for n in block.params]
    bias = rows[1] if block.bias == "joint" else None
    M = to_block_layout(rows[0], bias, block.order, block.weight_perm, block.groups)
    return rotate(left, M.permute(1, 2, 3, 0), right).pow(2).sum(-1)


def check_untied(blocks: dict[str, Block]) -> None:
    """Raise unless every parameter has one block (EKFAC has no tied-weight blocks).

    Raises:
        RuntimeError: a parameter shared by several modules, naming it and the fix.
    """
    seen: dict[str, str] = {}
    for module, block in blocks.items():
        for n in block.params:
            if n in seen:
                raise RuntimeError(
                    f"EKFAC: parameter {n!r} is shared by the modules {seen[n]!r} and "
                    f"{module!r} (tied weights), so the KFAC blocks do not cover it exactly "
                    "once; EKFAC corrects the eigenvalues of one Kronecker block and has no "
                    "correction for a sum of them. Use bg.linops.KFAC (it sums the blocks) or "
                    "pass params=... without the tied parameter"
                )
            seen[n] = module


class EKFAC(KFAC):
    """``bg.linops.EKFAC(model, loss_fn, data, fisher_type="mc", kfac_approx="expand",
    mc_samples=1, num_data=None, generator=None, params=None, process_group=None)``: two
    passes over the data (KFAC
    factors, then corrected eigenvalues), so ``data`` must be re-iterable (a list, a
    ``DataLoader``). Products, ``inverse(damping)``, ``logdet(damping)``, ``trace()`` and
    ``eigh`` are exact for the structure. ``fisher_type`` in ``"type-2"``, ``"mc"``,
    ``"empirical"``. ``bases[name]``: the block's ``(Q_A, Q_B)`` (``[G, ., .]``);
    ``eigenvalues[name]``: its corrected eigenvalues ``[G, rows, cols]``.

    ``params`` (names) restricts the operator to a parameter subset: whole blocks are the
    principal sub-blocks of the full EKFAC; a weight without its joint bias gets the EKFAC of
    its own bias-free KFAC block (eigenbasis of ``A`` without the bias row, corrected
    eigenvalues from the weight's rows alone), i.e. the EKFAC of the model with the other
    parameters frozen. A bias without its weight raises. Under a process group (see
    :class:`~beyondgrad.linops.KFAC`) factors and corrected eigenvalues are summed over the
    ranks' shards. Tied weights (a parameter shared by several modules) are refused
    (``RuntimeError``): pass ``params`` without them, or use :class:`~beyondgrad.linops.KFAC`,
    which sums their blocks."""

    passes = "many"

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
        if fisher_type not in ("type-2", "mc", "empirical"):
            raise ValueError(
                f"EKFAC fisher_type must be 'type-2', 'mc' or 'empirical', got {fisher_type!r}"
            )
        super().__init__(
            model, loss_fn, data, fisher_type, kfac_approx, mc_samples, num_data, generator,
            params, process_group,
        )  # fmt: skip

    def _structure(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: DataSet,
        generator: torch.Generator | None,
        fisher_type: str,
        mc_samples: int,
    ) -> list[tuple[Tensor, StructuredOperator]]:
        """Blocks in the Kronecker eigenbases with the corrected eigenvalues (second pass)."""
        check_untied(self.blocks)
        kron = {n: b for n, b in self.blocks.items() if isinstance(b, KroneckerFactors)}
        self.bases: dict[str, tuple[Tensor, Tensor]] = {}
        spaces: dict[str, tuple[Tensor, Tensor]] = {}
        for name, block in kron.items():
            _, left, right = block.kronecker_eigen()
            spaces[name] = (left, right)
            self.bases[name] = (right, left) if block.order == "B kron A" else (left, right)
        # zeros first: a rank whose shard has no batch still joins the sum over the ranks
        self.eigenvalues = {n: torch.zeros_like(b.kronecker_eigen()[0]) for n, b in kron.items()}
        for X, y, N in data.batches():
            forms, scale = _engine.batch_forms(
                model, loss_fn, X, y, fisher_type, mc_samples, generator
            )
            w = data.weight(N) * scale
            for name, block in kron.items():
                s = corrected_eigenvalues(block, forms, *spaces[name]) * w
                self.eigenvalues[name] = self.eigenvalues[name] + s
        dist_group.all_reduce_tensors_(
            [self.eigenvalues[n] for n in sorted(self.eigenvalues)], data.group
        )
        parts: list[tuple[Tensor, StructuredOperator]] = []
        for name, block in self.blocks.items():
            if isinstance(block, DiagonalFactors):
                parts.append((self.block_index(block), Diagonal(block.diagonal)))
                continue
            left, right = spaces[name]
            op = KroneckerEigen(left, self.eigenvalues[name], right)
            parts.append((self.block_index(block), op))
        return parts


__all__ = ["EKFAC", "check_untied", "corrected_eigenvalues"]
