"""The Kronecker eigenbasis: robust eigendecompositions of Kronecker factors and the closed
forms that follow from them (pure tensor functions, batched over a leading group axis).

A Kronecker block ``L kron R`` (``L [G, r, r]``, ``R [G, c, c]``, one block per group) acts
on a matrix ``M [G, r, c]`` (a row-major flattened weight per group) as ``L M R^T``. With
``L = Q_L diag(l) Q_L^T`` and ``R = Q_R diag(m) Q_R^T`` its eigenvectors are
``Q_L[:, i] Q_R[:, j]^T`` with eigenvalues ``l_i m_j``; any function of the block (inverse,
damped inverse, square root) is ``Q_L [f(l m^T) * (Q_L^T M Q_R)] Q_R^T``. EKFAC replaces the
eigenvalues ``l m^T`` by corrected ones; the same functions apply.

Used by :class:`beyondgrad.KroneckerFactors`, :mod:`beyondgrad.linops` (KFAC, EKFAC) and
:class:`beyondgrad.optim.KFAC`.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: relative sizes of the diagonal shift tried when a float64 decomposition fails
_JITTERS = (1e-12, 1e-9, 1e-6)


class EighError(RuntimeError):
    """A symmetric eigendecomposition failed even after symmetrizing, upcasting to float64
    and shifting the diagonal."""


def _attempt(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    try:
        return torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError: LAPACK/cuSOLVER did not converge
        return None


def _shifted(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """``eigh(matrix + c I)`` for a growing relative shift ``c`` (eigenvalues shifted back)."""
    scale = torch.diagonal(matrix, dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for rel in _JITTERS:
        shift = (rel * scale)[..., None, None]
        out = _attempt(matrix + shift * eye)
        if out is not None:
            return out[0] - shift[..., 0], out[1]
    return None


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of symmetric matrices that does not fail on rank-deficient or
    badly scaled input (e.g. Kronecker factors of layers whose inputs are mostly zero).

    The input is symmetrized (``(M + M^T) / 2``) and decomposed in its dtype; if the solver
    does not converge, the decomposition is retried in float64, then in float64 with a
    diagonal shift of ``1e-12``, ``1e-9``, ``1e-6`` times the largest diagonal entry (the shift
    is subtracted from the eigenvalues again; eigenvectors are unaffected), then on the CPU.

    Args:
        matrix: ``[..., n, n]`` symmetric (up to round-off) matrices, batched over the
            leading axes.

    Returns:
        ``(eigenvalues [..., n], eigenvectors [..., n, n])`` in ascending order, in the
        dtype and on the device of ``matrix``; ``matrix ~= Q diag(l) Q^T``.

    Raises:
        ValueError: ``matrix`` has non-finite entries.
        EighError: every attempt failed (never the solver's raw error).
    """
    if matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"expected square matrices [..., n, n], got {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(
            f"cannot eigendecompose a {tuple(matrix.shape)} matrix with non-finite entries "
            "(inf/nan in a curvature factor: check the loss and the inputs)"
        )
    sym = (matrix + matrix.mT) / 2
    out = _attempt(sym)
    if out is not None:
        return out
    wide = sym.to(torch.float64)
    candidates = [wide] if wide.device.type == "cpu" else [wide, wide.cpu()]
    for candidate in candidates:
        retry = candidate.dtype != sym.dtype or candidate.device != sym.device
        out = (_attempt(candidate) if retry else None) or _shifted(candidate)
        if out is not None:
            return out[0].to(sym.device, sym.dtype), out[1].to(sym.device, sym.dtype)
    raise EighError(
        f"eigh of a {tuple(matrix.shape)} {matrix.dtype} matrix did not converge, not even in "
        "float64 with diagonal shifts; add damping to the factors"
    )


def kronecker_eigenvalues(left: Tensor, right: Tensor) -> Tensor:
    """Eigenvalues of ``L kron R`` per group.

    Args:
        left: eigenvalues of ``L``, ``[G, r]``.
        right: eigenvalues of ``R``, ``[G, c]``.

    Returns:
        ``[G, r, c]``: entry ``(g, i, j)`` is ``left[g, i] * right[g, j]``.
    """
    return left.unsqueeze(-1) * right.unsqueeze(-2)


def rotate(q_left: Tensor, M: Tensor, q_right: Tensor) -> Tensor:
    """Coordinates in the Kronecker eigenbasis: ``Q_L^T M Q_R`` per group and column.

    Args:
        q_left: ``[G, r, r]`` orthonormal eigenvectors of ``L``.
        M: ``[G, r, c, k]`` (``k`` columns of the flattened block).
        q_right: ``[G, c, c]`` orthonormal eigenvectors of ``R``.

    Returns:
        ``[G, r, c, k]``.
    """
    if M.shape[-1] == 1:  # two batched products: no copies into the einsum's layouts
        return (q_left.mT @ M[..., 0] @ q_right).unsqueeze(-1)
    return torch.einsum("gji,gjkc,gkl->gilc", q_left, M, q_right)


def unrotate(q_left: Tensor, C: Tensor, q_right: Tensor) -> Tensor:
    """Inverse of :func:`rotate`: ``Q_L C Q_R^T`` per group and column.

    Args:
        q_left: ``[G, r, r]`` orthonormal eigenvectors of ``L``.
        C: ``[G, r, c, k]`` coordinates in the eigenbasis.
        q_right: ``[G, c, c]`` orthonormal eigenvectors of ``R``.

    Returns:
        ``[G, r, c, k]``.
    """
    if C.shape[-1] == 1:
        return (q_left @ C[..., 0] @ q_right.mT).unsqueeze(-1)
    return torch.einsum("gij,gjkc,glk->gilc", q_left, C, q_right)


def eigenbasis_apply(q_left: Tensor, values: Tensor, q_right: Tensor, M: Tensor) -> Tensor:
    """``(Q_L kron Q_R) diag(values) (Q_L kron Q_R)^T`` applied to ``M``.

    Args:
        q_left: ``[G, r, r]``.
        values: ``[G, r, c]`` eigenvalues in the basis (``kronecker_eigenvalues`` for KFAC,
            corrected ones for EKFAC, ``1 / (values + damping)`` for an inverse).
        q_right: ``[G, c, c]``.
        M: ``[G, r, c, k]``.

    Returns:
        ``[G, r, c, k]``.
    """
    coords = rotate(q_left, M, q_right).mul_(values.unsqueeze(-1))  # a new tensor: in place
    return unrotate(q_left, coords, q_right)


def damped_inverse(values: Tensor, damping: float) -> Tensor:
    """``1 / (values + damping)``, the eigenvalues of a damped inverse.

    Args:
        values: eigenvalues (any shape).
        damping: added to every eigenvalue before inverting.

    Returns:
        A tensor like ``values``.

    Raises:
        ValueError: some ``values + damping`` is not positive (a singular or indefinite
            damped matrix).
    """
    shifted = values + damping
    if bool((shifted <= 0).any()):
        raise ValueError(
            "the damped matrix is singular or indefinite (an eigenvalue + damping <= 0); "
            "increase damping"
        )
    return 1.0 / shifted


def logdet(values: Tensor, damping: float = 0.0) -> Tensor:
    """``sum log(values + damping)``: the log-determinant of a damped matrix from its
    eigenvalues (a 0-dim tensor).

    Raises:
        ValueError: some ``values + damping`` is not positive.
    """
    shifted = values + damping
    if bool((shifted <= 0).any()):
        raise ValueError(
            "the damped matrix is singular or indefinite (an eigenvalue + damping <= 0); "
            "increase damping"
        )
    return shifted.log().sum()


__all__ = [
    "EighError",
    "damped_inverse",
    "eigenbasis_apply",
    "kronecker_eigenvalues",
    "logdet",
    "rotate",
    "symmetric_eigh",
    "unrotate",
]
