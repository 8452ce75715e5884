"""Low-rank curvature ``U diag(lambda) U^T`` (e.g. the GGN's eigenpairs from ViViT)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..vivit import GGNEigenResult
from .base import LinearOperator


class LowRank(LinearOperator):
    """``U diag(eigenvalues) U^T`` with orthonormal columns ``U`` (``[P, k]``), with closed-form
    ``inverse(damping)`` (``(1/d) (I - U diag(lambda / (lambda + d)) U^T)``), ``logdet(damping)``
    and ``trace()``. ``from_eigen`` builds it from a :class:`~beyondgrad.GGNEigenResult`
    (flattening the eigenvectors in ``names`` order)."""

    symmetric = True

    def __init__(self, eigenvalues: Tensor, eigenvectors: Tensor):
        if eigenvectors.ndim != 2 or eigenvectors.shape[1] != eigenvalues.numel():
            raise ValueError("eigenvectors must be [P, k] for k eigenvalues")
        P = eigenvectors.shape[0]
        super().__init__((P, P), eigenvectors.dtype, eigenvectors.device)
        self.eigenvalues, self.U = eigenvalues, eigenvectors

    @classmethod
    def from_eigen(cls, result: GGNEigenResult, names: Sequence[str] | None = None) -> LowRank:
        vectors: Mapping[str, Tensor] = result.eigenvectors
        order = list(names) if names is not None else list(vectors)
        U = torch.cat([vectors[n].reshape(vectors[n].shape[0], -1) for n in order], 1).T
        return cls(result.eigenvalues, U)

    def _matmat(self, M: Tensor) -> Tensor:
        return self.U @ (self.eigenvalues.unsqueeze(1) * (self.U.T @ M))

    def inverse(self, damping: float) -> LinearOperator:
        if damping <= 0:
            raise ValueError("a low-rank operator needs damping > 0 to be invertible")
        parent = self
        shrink = self.eigenvalues / (self.eigenvalues + damping)

        class _Inverse(LinearOperator):
            symmetric = True

            def _matmat(self, M: Tensor) -> Tensor:
                return (M - parent.U @ (shrink.unsqueeze(1) * (parent.U.T @ M))) / damping

        return _Inverse(self.shape, self.dtype, self.device)

    def logdet(self, damping: float) -> Tensor:
        P, k = self.U.shape
        return (self.eigenvalues + damping).log().sum() + (P - k) * torch.log(
            torch.tensor(damping, dtype=self.dtype)
        )

    def trace(self) -> Tensor:
        return self.eigenvalues.sum()

    def eigvalsh(self) -> Tensor:
        """All ``P`` eigenvalues, ascending (the ``P - k`` outside the range are 0)."""
        P, k = self.U.shape
        zeros = self.eigenvalues.new_zeros(P - k)
        return torch.sort(torch.cat([self.eigenvalues, zeros])).values

    def eigh(self, k: int | None = None, which: str = "largest") -> tuple[Tensor, Tensor]:
        """The ``k`` largest/smallest of the stored eigenpairs (``k=None``: all of them),
        ``(values [k], vectors [P, k])`` in ``which`` order. Pairs of the null space (value 0)
        are not represented: ``k`` is at most the rank."""
        from .kfac import _select

        idx = _select(self.eigenvalues, k, which, self.eigenvalues.numel())
        return self.eigenvalues[idx], self.U[:, idx]
