"""The exact inverse of a sum of two Kronecker products, ``B1 kron A1 + B2 kron A2``.

Two symmetric positive semi-definite matrices with a positive definite sum are diagonalized by
one congruence: ``W_A^T A1 W_A = diag(a1)``, ``W_A^T A2 W_A = diag(a2)`` (and likewise ``W_B``,
``b1``, ``b2`` for ``B``). Then

``B1 kron A1 + B2 kron A2 = (W_B kron W_A)^{-T} diag(b1 kron a1 + b2 kron a2) (W_B kron W_A)^{-1}``

so the inverse applied to a matrix ``V [out, in]`` (row-major vector of the block) is
``W_B [(W_B^T V W_A) / (b1 a1^T + b2 a2^T)] W_A^T`` (as in Martens & Grosse 2015, appendix B,
with the reference matrix ``A1 + A2`` instead of ``A1`` for conditioning). Nothing is
approximated: the sum is not replaced by one product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg.kronecker_sum import generalized_eigh, simultaneous_diagonalization

__all__ = [
    "KroneckerSumInverse",
    "damped_kronecker_sum_inverse",
    "generalized_eigh",
    "simultaneous_diagonalization",
]


class KroneckerSumInverse:
    """``(B1 kron A1 + B2 kron A2)^{-1}`` for one ``[out, in]`` block.

    ``A1, A2`` and ``B1, B2`` are each diagonalized simultaneously
    (:func:`simultaneous_diagonalization`), which gives the inverse in closed form.

    Args:
        A1: ``[in, in]`` symmetric positive semi-definite.
        B1: ``[out, out]`` symmetric positive semi-definite.
        A2: ``[in, in]`` symmetric positive semi-definite (``A1 + A2`` positive definite).
        B2: ``[out, out]`` symmetric positive semi-definite (``B1 + B2`` positive definite),
            and the Kronecker sum must be invertible.
    """

    def __init__(self, A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> None:
        pA1, pA2, self.W_A = simultaneous_diagonalization(A1, A2)
        pB1, pB2, self.W_B = simultaneous_diagonalization(B1, B2)
        self.scale = 1.0 / (pB1[:, None] * pA1[None, :] + pB2[:, None] * pA2[None, :])

    def __matmul__(self, V: Tensor) -> Tensor:
        """Apply the inverse.

        Args:
            V: ``[out, in]`` a block (the row-major vector ``vec(V)``).

        Returns:
            ``[out, in]``: ``(B1 kron A1 + B2 kron A2)^{-1} vec(V)`` as a block, i.e. the ``X``
            with ``B1 X A1 + B2 X A2 = V``.
        """
        return self.W_B @ ((self.W_B.T @ V @ self.W_A) * self.scale) @ self.W_A.T


def damped_kronecker_sum_inverse(
    A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, damping: float
) -> KroneckerSumInverse:
    """The exact inverse of ``(B1 + d I) kron (A1 + d I) + (B2 + d I) kron (A2 + d I)``: every
    factor is damped by the same ``d`` (the factors are positive semi-definite, so ``d > 0``
    makes the sum invertible).

    Args:
        A1: ``[in, in]`` interior input factor.
        B1: ``[out, out]`` interior output-gradient factor.
        A2: ``[in, in]`` boundary input factor.
        B2: ``[out, out]`` boundary output-gradient factor.
        damping: ``d >= 0``.

    Returns:
        A :class:`KroneckerSumInverse` (apply with ``@`` to ``[out, in]`` blocks).
    """
    eye_a = torch.eye(A1.shape[0], dtype=A1.dtype, device=A1.device)
    eye_b = torch.eye(B1.shape[0], dtype=B1.dtype, device=B1.device)
    return KroneckerSumInverse(
        A1 + damping * eye_a, B1 + damping * eye_b, A2 + damping * eye_a, B2 + damping * eye_b
    )
