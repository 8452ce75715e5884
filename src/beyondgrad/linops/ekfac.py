"""EKFAC: KFAC with eigenvalues corrected in the Kronecker eigenbasis (George et al. 2018).

For each block with factors ``B kron A = (Q_B kron Q_A)(L_B kron L_A)(Q_B kron Q_A)^T`` the
Kronecker eigenvalues are replaced by the second moments of the per-row gradients in that
basis, ``s = sum_r (Q_B^T g_r Q_A)^2`` (rows: the backpropagated vectors of every sample, with
the data-set reduction), so the diagonal of the curvature in the eigenbasis is exact. For
``nn.Linear`` and ungrouped convolutions the rotation is applied to the layer inputs and output
gradients (``(A Q_A, G Q_B)``), never forming per-sample gradients; other blocks rotate the
materialized rows. Blocks without Kronecker structure keep their diagonal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import compute
from ..engine.losses import reduction_factor
from ..factors import KroneckerFactors
from ..quantities import Forms
from ..rules.forms import Form, OuterForm
from .base import LinearOperator
from .curvature import _batch_size
from .kfac import KFAC


def _kind(fisher_type: str, mc_samples: int) -> tuple[str, int]:
    return {"type-2": ("exact", 0), "mc": ("mc", mc_samples), "empirical": ("grad", 1)}[fisher_type]


class EKFAC(KFAC):
    """``bg.linops.EKFAC(model, loss_fn, data, fisher_type="mc", kfac_approx="expand",
    mc_samples=1, num_data=None, generator=None, params=None)``: two passes over the data (KFAC
    factors, then corrected eigenvalues). Products, ``inverse(damping)``, ``logdet(damping)``
    and ``trace()`` are exact for the structure. ``fisher_type`` in ``"type-2"``, ``"mc"``,
    ``"empirical"``.

    ``params`` (names) restricts the operator to a parameter subset: whole blocks are the
    principal sub-blocks of the full EKFAC; a weight without its joint bias gets the EKFAC of
    its own bias-free KFAC block (eigenbasis of ``A`` without the bias row, corrected
    eigenvalues from the weight's rows alone), i.e. the EKFAC of the model with the other
    parameters frozen. A bias without its weight raises."""

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
    ):
        if fisher_type not in ("type-2", "mc", "empirical"):
            raise ValueError(
                f"EKFAC fisher_type must be 'type-2', 'mc' or 'empirical', got {fisher_type!r}"
            )
        batches = list(data)
        super().__init__(
            model,
            loss_fn,
            batches,
            fisher_type,
            kfac_approx,
            mc_samples,
            num_data,
            generator,
            params,
        )
        N_total = sum(_batch_size(X) for X, _ in batches) if num_data is None else num_data
        self.bases: dict[str, tuple[Tensor, Tensor]] = {}
        for name, block in self.blocks.items():
            if isinstance(block, KroneckerFactors):
                _, qa, _, qb = block.eigh()
                self.bases[name] = (
                    qa if qa.ndim == 3 else qa[None],
                    qb if qb.ndim == 3 else qb[None],
                )
        q = Forms(_kind(fisher_type, mc_samples))
        mean = loss_fn.reduction == "mean"  # type: ignore[union-attr]
        self.eigenvalues: dict[str, Tensor] = {}
        for X, y in batches:
            res = compute(model, loss_fn, X, y, q, generator=generator)
            w = _batch_size(X) / N_total if mean else 1.0
            if fisher_type == "empirical":
                w = w / reduction_factor(loss_fn, res.output, y)
            forms: dict[str, Form] = res[q]  # type: ignore[assignment]
            for name, block in self.blocks.items():
                if isinstance(block, KroneckerFactors):
                    s = self._corrected(block, forms, *self.bases[name]) * w
                    self.eigenvalues[name] = self.eigenvalues.get(name, 0) + s

    def _corrected(
        self, block: KroneckerFactors, forms: dict[str, Form], QA: Tensor, QB: Tensor
    ) -> Tensor:
        """``sum_r (Q_left^T g_r Q_right)^2``, ``[G, rows, cols]`` in the block's layout."""
        weight = forms[block.params[0]]
        if (
            isinstance(weight, OuterForm)
            and block.order == "B kron A"
            and block.weight_perm is None
            and block.groups == 1
        ):
            A, G = weight.A, weight.G
            if block.bias == "joint":
                A = torch.cat([A, A.new_ones(*A.shape[:-1], 1)], -1)
            rotated = OuterForm(A @ QA[0], G @ QB[0], (G.shape[-1], A.shape[-1]), weight.vectors)
            return rotated.sum_grad_squared().unsqueeze(0)
        rows = {n: forms[n].batch_grad() for n in block.params}
        M = self._block_matrix(block, rows)  # [G, rows, cols, R]
        left, right = (QB, QA) if block.order == "B kron A" else (QA, QB)
        rotated = torch.einsum("gji,gjkr,gkl->gilr", left, M, right)
        return rotated.pow(2).sum(-1)

    def _apply(self, M: Tensor, kron: str, damping: float = 0.0) -> Tensor:
        parts = self._split(M)
        k = M.shape[1]
        result: dict[str, Tensor] = {}
        for name, block in self.blocks.items():
            if not isinstance(block, KroneckerFactors):
                for n, d in block.diagonal.items():
                    result[n] = parts[n] / (d + damping) if kron == "inverse" else parts[n] * d
                continue
            QA, QB = self.bases[name]
            left, right = (QB, QA) if block.order == "B kron A" else (QA, QB)
            matrix = self._block_matrix(block, parts)  # [G, rows, cols, k]
            rot = torch.einsum("gji,gjkc,gkl->gilc", left, matrix, right)
            s = self.eigenvalues[name].unsqueeze(-1)
            rot = rot / (s + damping) if kron == "inverse" else rot * s
            back = torch.einsum("gij,gjkc,glk->gilc", left, rot, right)
            result.update(self._unblock(block, back, k))
            if block.bias == "separate":
                raise NotImplementedError("EKFAC supports bias='joint' blocks only")
        return self._join(result)

    def _kron_spectrum(self, name: str, block: KroneckerFactors) -> tuple[Tensor, Tensor, Tensor]:
        QA, QB = self.bases[name]
        left, right = (QB, QA) if block.order == "B kron A" else (QA, QB)
        return self.eigenvalues[name], left, right

    def logdet(self, damping: float = 0.0) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for name, block in self.blocks.items():
            if isinstance(block, KroneckerFactors):
                total = total + (self.eigenvalues[name] + damping).log().sum()
            else:
                total = total + block.logdet(damping)
        return total

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for name, block in self.blocks.items():
            if isinstance(block, KroneckerFactors):
                total = total + self.eigenvalues[name].sum()
            else:
                total = total + sum(d.sum() for d in block.diagonal.values())
        return total


__all__ = ["EKFAC", "LinearOperator"]
