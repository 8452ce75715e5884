"""Extreme eigenpairs of symmetric operators by Lanczos with full reorthogonalization."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor


def _like(A: Any) -> tuple[int, torch.dtype, torch.device]:
    return A.shape[0], getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))


def eigsh(
    A: Any,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest (``which="largest"``, algebraically) or smallest eigenpairs of the
    symmetric operator ``A`` of shape ``(n, n)``: ``(eigenvalues [k], eigenvectors [n, k])``,
    eigenvalues sorted in the order of ``which``.

    Lanczos with full reorthogonalization grows a Krylov basis until the residual norms
    ``|beta_m s_mi|`` of the wanted Ritz pairs fall below ``tol * max|theta|`` (or the basis
    spans the space, or ``max_iter`` products, default ``min(n, max(100, 20 k))``; a
    ``RuntimeWarning`` reports pairs that did not converge). Starts from a random vector drawn
    with ``generator``.
    """
    n, dtype, device = _like(A)
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    m_max = min(n, max_iter or max(100, 20 * k))
    Q = torch.zeros(m_max + 1, n, dtype=dtype, device=device)  # rows: basis vectors
    alpha = torch.zeros(m_max, dtype=dtype, device=device)
    beta = torch.zeros(m_max, dtype=dtype, device=device)
    q = (
        torch.randn(n, generator=generator, dtype=dtype, device=device)
        if generator is not None
        else torch.randn(n, dtype=dtype, device=device)
    )
    Q[0] = q / q.norm()
    m = 0
    theta = S = None
    converged = False
    for j in range(m_max):
        w = A @ Q[j]
        alpha[j] = Q[j] @ w
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)  # full reorthogonalization, twice
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta[j] = w.norm()
        m = j + 1
        if m >= k:
            T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
            theta, S = torch.linalg.eigh(T)
            order = torch.arange(m - 1, m - 1 - k, -1) if which == "largest" else torch.arange(k)
            residual = (beta[j] * S[-1, order]).abs()
            scale = theta.abs().max().clamp_min(torch.finfo(dtype).tiny)
            if bool((residual <= tol * scale).all()) or beta[j] <= torch.finfo(dtype).eps * scale:
                converged = True
                break
        if beta[j] == 0:
            break
        Q[j + 1] = w / beta[j]
    assert theta is not None and S is not None
    if not converged and m < n:
        warnings.warn(
            f"eigsh: {k} Ritz pair(s) not converged to tol={tol} after {m} products; raise "
            "max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    order = torch.arange(m - 1, m - 1 - k, -1) if which == "largest" else torch.arange(k)
    vectors = Q[:m].T @ S[:, order]
    return theta[order], vectors
