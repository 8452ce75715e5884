"""Sums of Kronecker products ``L1 kron R1 + L2 kron R2`` (weights tied across layers; PINN
interior and boundary terms): simultaneous diagonalization, the exact inverse and
log-determinant by one congruence, damping, and a preconditioned block CG for the cases
without a closed form.

A block ``L kron R`` acts on a matrix ``X [r, c]`` (a row-major flattened weight) as
``L X R`` (symmetric factors). Two symmetric positive semi-definite matrices whose sum is
positive definite are diagonalized by one congruence: ``W_L^T L1 W_L = diag(p1)``,
``W_L^T L2 W_L = diag(p2)`` (and ``W_R``, ``q1``, ``q2`` for the right factors), so

``L1 kron R1 + L2 kron R2 = (W_L kron W_R)^{-T} diag(p1 q1^T + p2 q2^T) (W_L kron W_R)^{-1}``.

Nothing is approximated. A damping ``d I`` is a third Kronecker product ``d I kron I``; it
folds into the pair exactly only when a factor of one term is a multiple of the identity
(``c I kron R + d I kron I = I kron (c R + d I)``) or ``d = 0``
(:func:`fold_damping`). Otherwise :func:`split_damping` gives the closed-form
*approximation* that damps every factor (Martens and Grosse's factored Tikhonov damping, per
term), which :func:`block_cg` uses as preconditioner for the exact damped solve.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .eigenbasis import symmetric_eigh

#: a term ``(L [r, r], R [c, c])`` of a Kronecker sum, acting as ``X -> L X R``
Term = tuple[Tensor, Tensor]


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


def simultaneous_diagonalization(M1: Tensor, M2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``W`` with ``W^T M1 W = diag(p)`` and ``W^T M2 W = diag(q)`` for symmetric positive
    semi-definite ``M1``, ``M2`` whose sum is positive definite.

    Uses the generalized eigenpairs of ``(M1 + M2, M1)`` (so ``p + q = 1``): better conditioned
    than taking either matrix as the reference. Eigenvalues of the sum below ``n * eps`` times
    its largest one (round-off) are raised to that floor.

    Args:
        M1: ``[n, n]``.
        M2: ``[n, n]``.

    Returns:
        ``(p [n], q [n], W [n, n])``.
    """
    lc, Qc = symmetric_eigh(M1 + M2)
    floor = lc.abs().max() * M1.shape[0] * torch.finfo(M1.dtype).eps
    root_inv = Qc * lc.clamp_min(floor).rsqrt()
    p, U = symmetric_eigh(root_inv.T @ M1 @ root_inv)
    W = root_inv @ U
    return p, (W.T @ M2 @ W).diagonal(), W


@dataclass
class KroneckerSumCongruence:
    """``S = (W_L kron W_R)^{-T} diag(values) (W_L kron W_R)^{-1}`` on matrices ``[r, c]``:
    a sum of two Kronecker products in closed form (:func:`congruence`).

    Attributes:
        w_left: ``[r, r]`` invertible (not orthogonal).
        values: ``[r, c]`` the diagonal in the congruent basis (positive for an invertible
            positive definite ``S``).
        w_right: ``[c, c]`` invertible.
    """

    w_left: Tensor
    values: Tensor
    w_right: Tensor

    def solve(self, X: Tensor) -> Tensor:
        """``S^{-1} X`` for ``X [r, c, k]``: ``W_L [(W_L^T X W_R) / values] W_R^T``.

        Raises:
            ValueError: ``S`` is singular or indefinite (a value ``<= 0``).
        """
        if bool((self.values <= 0).any()):
            raise ValueError("the sum of Kronecker products is singular or indefinite; add damping")
        inner = torch.einsum("ir,rck,cj->ijk", self.w_left.T, X, self.w_right)
        inner = inner / self.values.unsqueeze(-1)
        return torch.einsum("ir,rck,jc->ijk", self.w_left, inner, self.w_right)

    def logdet(self) -> Tensor:
        """``log det S = sum log values - 2 (c log|det W_L| + r log|det W_R|)``."""
        if bool((self.values <= 0).any()):
            raise ValueError("the sum of Kronecker products is singular or indefinite; add damping")
        r, c = self.values.shape
        _, log_l = torch.linalg.slogdet(self.w_left)
        _, log_r = torch.linalg.slogdet(self.w_right)
        return self.values.log().sum() - 2 * (c * log_l + r * log_r)

    def inverse_trace(self) -> Tensor:
        """``trace(S^{-1}) = sum_ij |W_L[:, i]|^2 |W_R[:, j]|^2 / values_ij``."""
        left = self.w_left.pow(2).sum(0)
        right = self.w_right.pow(2).sum(0)
        return (left[:, None] * right[None, :] / self.values).sum()


def congruence(first: Term, second: Term) -> KroneckerSumCongruence:
    """The exact closed form of ``L1 kron R1 + L2 kron R2``.

    Args:
        first: ``(L1 [r, r], R1 [c, c])`` symmetric positive semi-definite.
        second: ``(L2 [r, r], R2 [c, c])`` symmetric positive semi-definite, with ``L1 + L2``
            and ``R1 + R2`` positive definite for an invertible sum.

    Returns:
        A :class:`KroneckerSumCongruence`.
    """
    p1, p2, w_left = simultaneous_diagonalization(first[0], second[0])
    q1, q2, w_right = simultaneous_diagonalization(first[1], second[1])
    values = p1[:, None] * q1[None, :] + p2[:, None] * q2[None, :]
    return KroneckerSumCongruence(w_left, values, w_right)


def scaled_identity(M: Tensor) -> float | None:
    """``c`` if ``M == c I`` exactly (a square matrix), else ``None``."""
    c = M[0, 0]
    off = M - torch.diag(torch.diagonal(M))
    if bool((off == 0).all()) and bool((torch.diagonal(M) == c).all()):
        return float(c)
    return None


def fold_damping(first: Term, second: Term, damping: float) -> tuple[Term, Term] | None:
    """``L1 kron R1 + L2 kron R2 + d I`` as two Kronecker products, exactly, or ``None``.

    The damping folds when ``d = 0`` or when a factor of one term is ``c I``
    (``c I kron R + d I kron I = I kron (c R + d I)``, likewise on the right).

    Args:
        first: ``(L1, R1)``.
        second: ``(L2, R2)``.
        damping: ``d``.

    Returns:
        The two terms of the damped sum, or ``None`` when ``d`` does not fold.
    """
    if damping == 0:
        return first, second
    terms = [first, second]
    for t, (L, R) in enumerate(terms):
        for side in (0, 1):
            c = scaled_identity((L, R)[side])
            if c is None:
                continue
            other = (L, R)[1 - side]
            eye_o = torch.eye(other.shape[0], dtype=other.dtype, device=other.device)
            eye_s = torch.eye(
                L.shape[0] if side == 0 else R.shape[0], dtype=L.dtype, device=L.device
            )
            folded = c * other + damping * eye_o
            terms[t] = (eye_s, folded) if side == 0 else (folded, eye_s)
            return terms[0], terms[1]
    return None


def split_damping(terms: Sequence[Term], damping: float) -> list[Term]:
    """Damp every factor so that the sum approximates ``sum_t L_t kron R_t + d I``.

    Each of the ``T`` terms gets ``(L + pi sqrt(d/T) I) kron (R + sqrt(d/T)/pi I)`` with
    ``pi = sqrt((tr L / r) / (tr R / c))`` (factored Tikhonov damping; ``pi = 1`` for a zero
    factor). The identity parts add up to ``d I``; the cross terms ``L kron I``,
    ``I kron R`` are the approximation (exact for ``d = 0``).

    Args:
        terms: ``(L [r, r], R [c, c])`` pairs.
        damping: ``d >= 0``.

    Returns:
        The damped terms.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    out = []
    root = math.sqrt(damping / len(terms))
    for L, R in terms:
        mean_l = float(torch.diagonal(L).mean())
        mean_r = float(torch.diagonal(R).mean())
        pi = math.sqrt(mean_l / mean_r) if mean_l > 0 and mean_r > 0 else 1.0
        eye_l = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
        eye_r = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
        out.append((L + pi * root * eye_l, R + root / pi * eye_r))
    return out


def block_cg(
    apply: Callable[[Tensor], Tensor],
    B: Tensor,
    precondition: Callable[[Tensor], Tensor] | None = None,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> tuple[Tensor, dict]:
    """Preconditioned conjugate gradients for ``A X = B``, one independent solve per column.

    Args:
        apply: ``X [n, k] -> A X`` for symmetric positive definite ``A``.
        B: ``[n, k]`` right-hand sides.
        precondition: ``X -> P X`` for a symmetric positive definite ``P ~ A^{-1}``
            (default: none).
        tol: stop when every column has ``|b - A x| <= tol |b|``.
        max_iter: at most this many iterations; a ``RuntimeWarning`` when not converged.

    Returns:
        ``(X [n, k], info)`` with ``iterations`` and ``residual`` (the largest relative
        residual of the recursion).
    """
    prec = precondition or (lambda V: V)
    X = torch.zeros_like(B)
    R = B.clone()
    Z = prec(R)
    P = Z.clone()
    rz = (R * Z).sum(0)
    bnorm = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    done = R.norm(dim=0) <= tol * bnorm
    it = 0
    while not bool(done.all()) and it < max_iter:
        it += 1
        AP = apply(P)
        curv = (P * AP).sum(0)
        step = torch.where(done | (curv <= 0), torch.zeros_like(rz), rz / curv)
        X = X + step * P
        R = R - step * AP
        done = done | (R.norm(dim=0) <= tol * bnorm)
        Z = prec(R)
        rz_new = (R * Z).sum(0)
        beta = torch.where(rz == 0, torch.zeros_like(rz), rz_new / rz)
        P = Z + beta * P
        rz = rz_new
    residual = float((R.norm(dim=0) / bnorm).max()) if B.numel() else 0.0
    if not bool(done.all()):
        warnings.warn(
            f"block_cg: not converged after {it} iterations (relative residual {residual:.3g}, "
            f"tol={tol}); raise max_iter or add damping",
            RuntimeWarning,
            stacklevel=2,
        )
    return X, {"iterations": it, "residual": residual}


__all__ = [
    "KroneckerSumCongruence",
    "Term",
    "block_cg",
    "congruence",
    "fold_damping",
    "generalized_eigh",
    "scaled_identity",
    "simultaneous_diagonalization",
    "split_damping",
]
