"""Spectral densities of symmetric operators by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _lanczos_tridiagonal(A: Any, q: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``steps`` Lanczos steps (full reorthogonalization) from the unit vector ``q``: the
    tridiagonal's diagonal and off-diagonal."""
    n = q.shape[0]
    Q = torch.zeros(n, steps + 1, dtype=q.dtype, device=q.device)
    Q[:, 0] = q
    alpha = torch.zeros(steps, dtype=q.dtype, device=q.device)
    beta = torch.zeros(steps, dtype=q.dtype, device=q.device)
    m = steps
    for j in range(steps):
        w = A @ Q[:, j]
        alpha[j] = Q[:, j] @ w
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        beta[j] = w.norm()
        if beta[j] <= torch.finfo(q.dtype).eps * alpha[: j + 1].abs().max().clamp_min(1.0):
            m = j + 1
            break
        Q[:, j + 1] = w / beta[j]
    return alpha[:m], beta[: m - 1]


def spectral_density(
    A: Any,
    num_probes: int = 10,
    lanczos_steps: int = 30,
    grid: Tensor | None = None,
    num_points: int = 512,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Eigenvalue density of ``A`` (``n x n``, symmetric) by stochastic Lanczos quadrature:
    ``(grid, density)``, the density integrating to 1 over the grid (a histogram of the ``n``
    eigenvalues, smoothed by a Gaussian of width ``sigma``, default 1% of the spectral range).

    Each of ``num_probes`` Rademacher probes runs ``lanczos_steps`` Lanczos steps; the
    tridiagonal's eigenvalues are quadrature nodes, their first eigenvector components squared
    the weights. Costs ``num_probes * lanczos_steps`` products. Plot with
    ``plt.semilogy(grid, density)``.
    """
    n = A.shape[0]
    dtype = getattr(A, "dtype", torch.float64)
    device = getattr(A, "device", torch.device("cpu"))
    nodes, weights = [], []
    for _ in range(num_probes):
        z = (2 * torch.randint(0, 2, (n,), generator=generator, device=device) - 1).to(dtype)
        alpha, beta = _lanczos_tridiagonal(A, z / math.sqrt(n), min(lanczos_steps, n))
        T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        theta, S = torch.linalg.eigh(T)
        nodes.append(theta)
        weights.append(S[0].pow(2) / num_probes)
    theta = torch.cat(nodes)
    tau = torch.cat(weights)
    lo, hi = float(theta.min()), float(theta.max())
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
    width = sigma if sigma is not None else 0.01 * span
    if grid is None:
        grid = torch.linspace(
            lo - 0.05 * span - 3 * width,
            hi + 0.05 * span + 3 * width,
            num_points,
            dtype=dtype,
            device=device,
        )
    kernel = torch.exp(-0.5 * ((grid.unsqueeze(1) - theta.unsqueeze(0)) / width) ** 2)
    density = (kernel * tau).sum(1) / (width * math.sqrt(2 * math.pi))
    return grid, density
