"""The exact inverse of a sum of two Kronecker products, ``B1 kron A1 + B2 kron A2``.

With symmetric positive definite ``A1``, ``B1`` and symmetric positive semi-definite ``A2``,
``B2``, the generalized eigendecompositions ``A2 W_A = A1 W_A diag(mu)`` with
``W_A^T A1 W_A = I`` (and likewise ``W_B``, ``nu`` for ``B``) give

``B1 kron A1 + B2 kron A2 = (W_B kron W_A)^{-T} (I + nu kron mu) (W_B kron W_A)^{-1}``

so the inverse applied to a matrix ``V [out, in]`` (row-major vector of the block) is
``W_B [(W_B^T V W_A) / (1 + nu mu^T)] W_A^T`` (Martens & Grosse 2015, appendix B). Nothing is
approximated: the sum is not replaced by one product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg.eigenbasis import symmetric_eigh


def generalized_eigh(M1: Tensor, M2: Tensor) -> tuple[Tensor, Tensor]:
    """Generalized eigenpairs ``M2 W = M1 W diag(mu)`` with ``W^T M1 W = I``.

    Args:
        M1: ``[n, n]`` symmetric positive definite.
        M2: ``[n, n]`` symmetric.

    Returns:
        ``(mu [n], W [n, n])``.

    Raises:
        ValueError: ``M1`` is not positive definite.
    """
    l1, Q1 = symmetric_eigh(M1)
    if bool(l1.min() <= 0):
        raise ValueError(
            "the first factor must be positive definite (smallest eigenvalue "
            f"{float(l1.min()):.3g}): add damping"
        )
    root_inv = Q1 * l1.rsqrt()  # M1^{-1/2} up to the rotation Q1^T
    mu, U = symmetric_eigh(root_inv.T @ M2 @ root_inv)
    return mu, root_inv @ U


class KroneckerSumInverse:
    """``(B1 kron A1 + B2 kron A2)^{-1}`` for one ``[out, in]`` block.

    Args:
        A1: ``[in, in]`` symmetric positive definite.
        B1: ``[out, out]`` symmetric positive definite.
        A2: ``[in, in]`` symmetric positive semi-definite.
        B2: ``[out, out]`` symmetric positive semi-definite.
    """

    def __init__(self, A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> None:
        self.mu, self.W_A = generalized_eigh(A1, A2)
        self.nu, self.W_B = generalized_eigh(B1, B2)
        self.scale = 1.0 / (1.0 + self.nu[:, None] * self.mu[None, :])

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
