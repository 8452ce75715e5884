"""KFAC over a data set as a block-diagonal operator with closed-form inverse, log-determinant
and trace (one block per module: Kronecker factors or, for layers without Kronecker structure,
the diagonal of the same curvature; see :class:`beyondgrad.KFAC`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import compute
from ..factors import DiagonalFactors, KroneckerFactors, from_block_layout, to_block_layout
from ..quantities import KFAC as KFACQuantity
from .base import LinearOperator
from .curvature import _batch_size


class KFAC(LinearOperator):
    """``bg.linops.KFAC(model, loss_fn, data, fisher_type="mc", kfac_approx="expand",
    mc_samples=1, num_data=None, generator=None)``: the engine's KFAC blocks accumulated over
    the data set (``A`` averaged over all samples, ``B`` summed with the data-set reduction
    ``N_b / num_data`` for mean losses), acting on flat vectors over all trainable parameters
    in ``model.named_parameters()`` order, or over ``params`` (names, kept in that order): the
    principal sub-block of the same KFAC matrix (whole blocks; a weight without its joint bias
    keeps ``B kron A`` with ``A`` restricted to the weight; a bias without its weight raises).
    ``blocks`` holds the per-module factors. ``inverse(damping)``, ``logdet(damping)`` and
    ``trace()`` are exact for the structure."""

    symmetric = True

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
        q = KFACQuantity(fisher_type=fisher_type, kfac_approx=kfac_approx, mc_samples=mc_samples)
        batches = list(data)
        if num_data is None:
            num_data = sum(_batch_size(X) for X, _ in batches)
        mean = loss_fn.reduction == "mean"  # type: ignore[union-attr]
        sums: dict[str, Any] = {}
        for X, y in batches:
            N = _batch_size(X)
            w = N / num_data if mean else 1.0
            for name, block in compute(model, loss_fn, X, y, q, generator=generator)[q].items():
                if isinstance(block, KroneckerFactors):
                    A, B = block.A * (N / num_data), block.B * w
                    if name in sums:
                        sums[name].A += A
                        sums[name].B += B
                    else:
                        sums[name] = KroneckerFactors(
                            A,
                            B,
                            block.order,
                            block.params,
                            block.bias,
                            fisher_type,
                            kfac_approx,
                            block.R,
                            num_data,
                            None,
                            block.weight_perm,
                        )
                else:
                    diag = {n: v * w for n, v in block.diagonal.items()}
                    if name in sums:
                        for n, v in diag.items():
                            sums[name].diagonal[n] += v
                    else:
                        sums[name] = DiagonalFactors(diag, fisher_type, block.R, num_data)
        all_names = [n for n, p in model.named_parameters() if p.requires_grad]
        covered = [p for b in sums.values() for p in b.params]
        if sorted(covered) != sorted(all_names):
            raise RuntimeError(
                "KFAC blocks do not cover every parameter exactly once (weight tying across "
                "modules gives a parameter several blocks); the operator is undefined there"
            )
        if params is not None:
            wanted = set(params)
            unknown = wanted - set(all_names)
            if unknown:
                raise ValueError(f"unknown or frozen parameters: {sorted(unknown)}")
            sums = {k: b for k, b in ((k, _restrict(b, wanted)) for k, b in sums.items()) if b}
            all_names = [n for n in all_names if n in wanted]
        self.blocks: dict[str, KroneckerFactors | DiagonalFactors] = sums
        self.names = all_names
        self.params = dict(model.named_parameters())
        self.sizes = [self.params[n].numel() for n in self.names]
        first = self.params[self.names[0]]
        super().__init__((sum(self.sizes),) * 2, first.dtype, first.device)  # type: ignore[arg-type]

    def _split(self, M: Tensor) -> dict[str, Tensor]:
        return {
            n: b.T.reshape(M.shape[1], *self.params[n].shape)
            for n, b in zip(self.names, torch.split(M, self.sizes, 0))
        }

    def _join(self, parts: dict[str, Tensor]) -> Tensor:
        return torch.cat([parts[n].reshape(parts[n].shape[0], -1) for n in self.names], 1).T

    def _block_matrix(self, block: KroneckerFactors, parts: dict[str, Tensor]) -> Tensor:
        """The covered parameters (``[k, ...]`` each) as ``[G, rows, cols, k]`` in the block's
        layout (:func:`~beyondgrad.factors.to_block_layout`)."""
        bias = parts[block.params[1]] if block.bias == "joint" else None
        M = to_block_layout(
            parts[block.params[0]], bias, block.order, block.weight_perm, block.groups
        )
        return M.permute(1, 2, 3, 0)

    def _unblock(self, block: KroneckerFactors, M: Tensor, k: int) -> dict[str, Tensor]:
        """Inverse of :meth:`_block_matrix`."""
        weight = block.params[0]
        bias = block.params[1] if block.bias == "joint" else None
        W, b = from_block_layout(
            M.permute(3, 0, 1, 2),
            tuple(self.params[weight].shape),
            None if bias is None else tuple(self.params[bias].shape),
            block.order,
            block.weight_perm,
            block.groups,
        )
        return {weight: W} if bias is None else {weight: W, bias: b}

    def _apply(self, M: Tensor, kron: str, damping: float = 0.0) -> Tensor:
        parts = self._split(M)
        k = M.shape[1]
        result: dict[str, Tensor] = {}
        for block in self.blocks.values():
            if isinstance(block, DiagonalFactors):
                for n, d in block.diagonal.items():
                    value = d + damping if kron == "inverse" else d
                    result[n] = parts[n] / value if kron == "inverse" else parts[n] * value
                continue
            matrix = self._block_matrix(block, parts)  # [G, rows, cols, k]
            flat = matrix.reshape(-1, k)
            if kron == "inverse":
                applied = block.inverse(damping)(flat)
            else:
                applied = block @ flat
            result.update(self._unblock(block, applied.reshape(matrix.shape), k))
            if block.bias == "separate":
                bias = block.params[1]
                bb = block.bias_block
                assert bb is not None
                bias_in = parts[bias].reshape(k, -1).T  # [O, k]
                mat = torch.block_diag(*bb) if bb.ndim == 3 else bb
                if kron == "inverse":
                    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
                    out = torch.linalg.solve(mat + damping * eye, bias_in)
                else:
                    out = mat @ bias_in
                result[bias] = out.T.reshape(parts[bias].shape)
        return self._join(result)

    def _matmat(self, M: Tensor) -> Tensor:
        return self._apply(M, "forward")

    def inverse(self, damping: float = 0.0) -> LinearOperator:
        """``(KFAC + damping I)^{-1}``, exact per block (eigendecompositions)."""
        parent = self

        class _Inverse(LinearOperator):
            symmetric = True

            def _matmat(self, M: Tensor) -> Tensor:
                return parent._apply(M, "inverse", damping)

        return _Inverse(self.shape, self.dtype, self.device)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(KFAC + damping I)``."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks.values():
            total = total + b.logdet(damping)
            if isinstance(b, KroneckerFactors) and b.bias_block is not None:
                mat = torch.block_diag(*b.bias_block) if b.bias_block.ndim == 3 else b.bias_block
                eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
                total = total + torch.logdet(mat + damping * eye)
        return total

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks.values():
            if isinstance(b, DiagonalFactors):
                total = total + sum(d.sum() for d in b.diagonal.values())
            else:
                trace_a = torch.diagonal(b.A, dim1=-2, dim2=-1).sum(-1)
                trace_b = torch.diagonal(b.B, dim1=-2, dim2=-1).sum(-1)
                total = total + (trace_a * trace_b).sum()
                if b.bias_block is not None:
                    total = total + torch.diagonal(b.bias_block, dim1=-2, dim2=-1).sum()
        return total


def _restrict(
    block: KroneckerFactors | DiagonalFactors, wanted: set[str]
) -> KroneckerFactors | DiagonalFactors | None:
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
