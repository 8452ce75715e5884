"""Extreme eigenpairs of symmetric operators: Lanczos (partial or full reorthogonalization), or
LOBPCG (block products: one pass over the data serves the whole block)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._repeat import require_square, with_repeated_products
from .lanczos import Lanczos, tridiagonal


def _like(A: Any) -> tuple[int, torch.dtype, torch.device]:
    return A.shape[0], getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))


@with_repeated_products
def eigsh(
    A: Any,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    method: str = "lanczos",
    reorthogonalize: str = "partial",
    v0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest (``which="largest"``, algebraically) or smallest eigenpairs of the
    symmetric operator ``A`` of shape ``(n, n)``: ``(eigenvalues [k], eigenvectors [n, k])``,
    eigenvalues sorted in the order of ``which``.

    Lanczos grows a Krylov basis until the residual norms
    ``|beta_m s_mi|`` of the wanted Ritz pairs fall below ``tol * max|theta|`` (or the basis
    spans the space, or ``max_iter`` products, default ``min(n, max(100, 20 k))``; a
    ``RuntimeWarning`` reports pairs that did not converge). Starts from ``v0`` (``[n]``, e.g.
    a previous eigenvector: a warm start), else from a random vector drawn with
    ``generator``. ``reorthogonalize="partial"`` (Simon's recurrence: a full pass over the
    basis only when the estimated loss of orthogonality exceeds ``min(sqrt(eps), tol)``) or
    ``"full"`` (every step); see :mod:`beyondgrad.linalg.lanczos`.

    ``method="lobpcg"`` (Knyazev 2001): a block of ``k + 2`` vectors, Rayleigh-Ritz on
    ``[X, R, P]`` (iterates, residuals, previous directions) every iteration; one block product
    per iteration (a single pass over the data for data-set operators), ``max_iter``
    iterations (default 200); same stopping rule and warning.
    """
    require_square(A, "eigsh")
    n, dtype, device = _like(A)
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if max_iter is not None and max_iter < k:
        raise ValueError(f"max_iter={max_iter} must be at least k={k}")
    if method == "lobpcg":  # (reorthogonalize applies to Lanczos only)
        return _lobpcg(A, k, which, tol, max_iter or 200, generator, n, dtype, device)
    if method != "lanczos":
        raise ValueError(f"method must be 'lanczos' or 'lobpcg', got {method!r}")
    values, vectors, _ = _lanczos(
        A, k, which, tol, max_iter, generator, reorthogonalize, dtype, device, v0
    )
    return values, vectors


@with_repeated_products
def top_eigenpair(A: Any, tol: float, max_iter: int, v0: Tensor) -> tuple[float, Tensor, float]:
    """Lanczos for the largest (algebraic) eigenpair of the symmetric ``A`` from ``v0``
    (``[n]``), stopped at the relative residual ``tol`` (of the largest Ritz value in magnitude)
    or after ``max_iter`` products, without a warning when it stops unconverged:
    ``(value, vector [n], residual)`` with ``residual = ||A vector - value vector||`` (an
    eigenvalue of ``A`` lies within it of ``value``)."""
    require_square(A, "top_eigenpair")
    _, dtype, device = _like(A)
    values, vectors, residuals = _lanczos(
        A, 1, "largest", tol, max_iter, None, "partial", dtype, device, v0, warn=False
    )
    return float(values[0]), vectors[:, 0], float(residuals[0])


def _lanczos(
    A: Any,
    k: int,
    which: str,
    tol: float,
    max_iter: int | None,
    generator: torch.Generator | None,
    reorthogonalize: str,
    dtype: torch.dtype,
    device: torch.device,
    v0: Tensor | None = None,
    warn: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Lanczos branch of :func:`eigsh` (arguments checked there); also returns the wanted
    pairs' residual norms ``|beta_m s_mi| = ||A x_i - theta_i x_i||`` (``[k]``)."""
    n = A.shape[0]
    m_max = min(n, max_iter or max(100, 20 * k))
    if v0 is None:
        q = torch.randn(n, generator=generator, dtype=dtype, device=device)
    else:
        q = v0.detach().reshape(n).to(dtype=dtype, device=device)
    # Ritz vectors are about as accurate as the basis is orthogonal: reorthogonalize at the
    # requested tolerance when it is below sqrt(eps)
    eps = torch.finfo(dtype).eps
    lanczos = Lanczos(A, q / q.norm(), m_max, reorthogonalize, min(eps**0.5, max(tol, eps)))
    m, theta, S, converged = 0, None, None, False
    order, residual = torch.arange(k), torch.full((k,), float("inf"), dtype=dtype)
    while True:
        more = lanczos.step()
        m = lanczos.m
        if m >= k:
            theta, S = torch.linalg.eigh(tridiagonal(lanczos.alpha[:m], lanczos.beta[: m - 1]))
            order = torch.arange(m - 1, m - 1 - k, -1) if which == "largest" else torch.arange(k)
            residual = (lanczos.beta[m - 1] * S[-1, order]).abs()
            scale = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
            converged = bool((residual <= tol * scale).all())
        if converged or not more:
            converged = converged or m < m_max  # an invariant subspace: exact
            break
    if theta is None or S is None:
        raise ValueError(
            f"eigsh: the Krylov space of the start vector has dimension {m} < k={k} (A has "
            f"only {m} distinct eigenvalues along it); ask for fewer pairs or use "
            "method='lobpcg'"
        )
    if warn and not converged and m < n:
        warnings.warn(
            f"eigsh: {k} Ritz pair(s) not converged to tol={tol} after {m} products; raise "
            "max_iter or tol",
            RuntimeWarning,
            stacklevel=3,
        )
    return theta[order], lanczos.basis(m).T @ S[:, order], residual


def _rayleigh_ritz(S: Tensor, AS: Tensor, b: int) -> Tensor:
    """Coefficients (``[s, b]``) of the ``b`` largest Ritz pairs on ``span(S)``: whiten
    ``S^T S``, dropping directions lost to round-off."""
    G = S.T @ S
    g, V = torch.linalg.eigh((G + G.T) / 2)
    keep = g > g.max() * torch.finfo(S.dtype).eps * 1e3
    T = V[:, keep] / g[keep].sqrt()
    M = T.T @ (S.T @ AS) @ T
    _, U = torch.linalg.eigh((M + M.T) / 2)
    return T @ U.flip(1)[:, :b]


def _lobpcg(
    A: Any,
    k: int,
    which: str,
    tol: float,
    max_iter: int,
    generator: torch.Generator | None,
    n: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    sign = 1.0 if which == "largest" else -1.0  # work on sign * A, always "largest"
    b = min(n, k + 2)

    def apply(M: Tensor) -> Tensor:
        return sign * (A @ M)

    X = torch.randn(n, b, generator=generator, dtype=dtype, device=device)
    X, _ = torch.linalg.qr(X)
    AX = apply(X)
    P = AP = None
    theta = X.new_zeros(b)
    converged = False
    for _ in range(max_iter):
        H = X.T @ AX
        theta, C = torch.linalg.eigh((H + H.T) / 2)
        theta, C = theta.flip(0), C.flip(1)
        X, AX = X @ C, AX @ C
        R = AX - X * theta
        res = R[:, :k].norm(dim=0)
        if bool((res <= tol * theta[:k].abs().max().clamp(min=1e-300)).all()):
            converged = True
            break
        W = R - X @ (X.T @ R)  # residuals, orthogonal to the iterates
        W = W / W.norm(dim=0).clamp(min=1e-300)
        AW = apply(W)
        S = torch.cat([X, W] + ([P] if P is not None else []), 1)
        AS = torch.cat([AX, AW] + ([AP] if AP is not None else []), 1)
        coef = _rayleigh_ritz(S, AS, b)
        X_new, AX_new = S @ coef, AS @ coef
        P = S[:, b:] @ coef[b:]  # the new directions: the part outside the old iterates
        AP = AS[:, b:] @ coef[b:]
        norms = X_new.norm(dim=0).clamp(min=1e-300)
        X, AX = X_new / norms, AX_new / norms
        pn = P.norm(dim=0).clamp(min=1e-300)
        P, AP = P / pn, AP / pn
    if not converged:
        warnings.warn(
            f"eigsh(method='lobpcg'): not all {k} eigenpairs converged to tol={tol} in "
            f"{max_iter} iterations",
            RuntimeWarning,
            stacklevel=3,
        )
    return sign * theta[:k], X[:, :k]
