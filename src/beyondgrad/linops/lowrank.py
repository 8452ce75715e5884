"""Low-rank curvature ``U diag(lambda) U^T`` (e.g. the GGN's eigenpairs from ViViT), plus an
optional multiple of the identity (which its inverses need)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..quantities import GGNEigenResult
from .structures import StructuredOperator, select


class LowRank(StructuredOperator):
    """``U diag(eigenvalues) U^T + shift I`` with orthonormal columns ``U`` (``[P, k]``).

    Closed forms: ``inverse(damping)`` (``U diag(1/(lambda + s) - 1/s) U^T + (1/s) I`` with
    ``s = shift + damping``: again a :class:`LowRank`), ``logdet(damping)``, ``trace()``,
    ``eigvalsh()`` and ``eigh(k, which)`` (over the stored pairs). ``from_eigen`` builds it
    from a :class:`~beyondgrad.GGNEigenResult` (flattening the eigenvectors in ``names``
    order).

    Args:
        eigenvalues: ``[k]``.
        eigenvectors: ``[P, k]`` orthonormal columns.
        shift: the multiple of the identity added (0: a low-rank matrix).
    """

    def __init__(self, eigenvalues: Tensor, eigenvectors: Tensor, shift: float = 0.0):
        if eigenvectors.ndim != 2 or eigenvectors.shape[1] != eigenvalues.numel():
            raise ValueError("eigenvectors must be [P, k] for k eigenvalues")
        P = eigenvectors.shape[0]
        super().__init__((P, P), eigenvectors.dtype, eigenvectors.device)
        self.eigenvalues, self.U, self.shift = eigenvalues, eigenvectors, float(shift)

    @classmethod
    def from_eigen(cls, result: GGNEigenResult, names: Sequence[str] | None = None) -> LowRank:
        """The low-rank operator of a :class:`~beyondgrad.GGNEigenResult`, eigenvectors
        flattened over the parameters in ``names`` order (default: the result's order)."""
        vectors: Mapping[str, Tensor] = result.eigenvectors
        order = list(names) if names is not None else list(vectors)
        U = torch.cat([vectors[n].reshape(vectors[n].shape[0], -1) for n in order], 1).T
        return cls(result.eigenvalues, U)

    def _matmat(self, M: Tensor) -> Tensor:
        out = self.U @ (self.eigenvalues.unsqueeze(1) * (self.U.T @ M))
        return out + self.shift * M if self.shift else out

    def _total_shift(self, damping: float) -> float:
        s = self.shift + damping
        if s <= 0:
            raise ValueError("a low-rank operator needs damping > 0 to be invertible")
        return s

    def inverse(self, damping: float = 0.0) -> LowRank:  # type: ignore[override]
        """``(A + damping I)^{-1}`` in closed form (see the class docstring)."""
        s = self._total_shift(damping)
        return LowRank(1.0 / (self.eigenvalues + s) - 1.0 / s, self.U, 1.0 / s)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + damping I)`` from the closed-form spectrum."""
        s = self._total_shift(damping)
        P, k = self.U.shape
        log_s = torch.log(torch.tensor(s, dtype=self.dtype, device=self.device))
        return (self.eigenvalues + s).log().sum() + (P - k) * log_s

    def trace(self) -> Tensor:
        """``trace(A)`` in closed form."""
        return self.eigenvalues.sum() + self.shift * self.shape[0]

    def spectrum(self) -> Tensor:
        """The ``k`` stored eigenvalues (plus ``shift``), then ``shift`` for the ``P - k``
        directions outside the range of ``U``."""
        P, k = self.U.shape
        rest = self.eigenvalues.new_full((P - k,), self.shift)
        return torch.cat([self.eigenvalues + self.shift, rest])

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors ``[n, m]`` of the eigenvalues ``spectrum()[index]``."""
        k = self.U.shape[1]
        if bool((index < k).all()):
            return self.U[:, index]
        complete, _ = torch.linalg.qr(self.U, mode="complete")  # [P, P]: small models only
        basis = torch.cat([self.U, complete[:, k:]], 1)
        return basis[:, index]

    def eigh(self, k: int | None = None, which: str = "largest") -> tuple[Tensor, Tensor]:
        """The ``k`` largest/smallest of the stored eigenpairs (``k=None``: all of them),
        ``(values [k], vectors [P, k])`` in ``which`` order. Pairs outside the range of ``U``
        (value ``shift``) are not represented: ``k`` is at most the rank."""
        idx = select(self.eigenvalues, k, which, self.eigenvalues.numel())
        return self.eigenvalues[idx] + self.shift, self.U[:, idx]
