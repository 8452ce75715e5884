"""Spectral densities of symmetric operators by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._repeat import require_square, with_repeated_products
from .lanczos import Lanczos


def _lanczos_tridiagonal(A: Any, q: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``steps`` Lanczos steps (partial reorthogonalization) from the unit vector ``q``: the
    tridiagonal's diagonal and off-diagonal (fewer at an invariant subspace)."""
    lanczos = Lanczos(A, q, steps)
    while lanczos.step():
        pass
    m = lanczos.m
    return lanczos.alpha[:m], lanczos.beta[: m - 1]


@with_repeated_products
def spectral_density(
    A: Any,
    num_probes: int = 10,
    lanczos_steps: int = 30,
    grid: Tensor | None = None,
    num_points: int = 512,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    method: str = "slq",
    bounds: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Eigenvalue density of ``A`` (``n x n``, symmetric): ``(grid, density)``, the density
    integrating to 1 (a normalized histogram of the ``n`` eigenvalues). Plot with
    ``plt.semilogy(grid, density)``.

    ``method="slq"`` (stochastic Lanczos quadrature): each of ``num_probes`` Rademacher probes
    runs ``lanczos_steps`` Lanczos steps; the tridiagonal's eigenvalues are quadrature nodes,
    their first eigenvector components squared the weights, smoothed by a Gaussian of width
    ``sigma`` (default 1% of the spectral range). ``method="kpm"`` (kernel polynomial method):
    ``lanczos_steps`` Chebyshev moments per probe on ``bounds`` (default: from a short
    Lanczos run, widened by 5%), Jackson-damped, zero outside the bounds and finite at them
    (the default grid holds the midpoints of ``num_points`` cells of the bounds). Both cost
    ``num_probes * lanczos_steps`` products.

    Args:
        A: a symmetric operator ``(n, n)``.
        num_probes: the number of Rademacher probes.
        lanczos_steps: Lanczos steps (``"slq"``) or Chebyshev moments (``"kpm"``) per probe.
        grid: the points at which the density is evaluated (default: ``num_points`` points
            covering the estimated spectrum).
        num_points: the size of the default grid.
        sigma: the Gaussian width for ``"slq"``.
        generator: the random generator of the probes (``None``: torch's global one).
        method: ``"slq"`` or ``"kpm"``.
        bounds: ``(lo, hi)`` enclosing the spectrum, for ``"kpm"``.

    Returns:
        ``(grid, density)``, two ``[num_points]`` tensors (or the shape of ``grid``).
    """
    require_square(A, "spectral_density")
    if method == "kpm":
        return _kpm(A, num_probes, lanczos_steps, grid, num_points, generator, bounds)
    if method != "slq":
        raise ValueError(f"method must be 'slq' or 'kpm', got {method!r}")
    return _slq(A, num_probes, lanczos_steps, grid, num_points, sigma, generator)


def _slq(
    A: Any,
    num_probes: int,
    lanczos_steps: int,
    grid: Tensor | None,
    num_points: int,
    sigma: float | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature for :func:`spectral_density`: ``(grid, density)``."""
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


def _kpm(
    A: Any,
    num_probes: int,
    degree: int,
    grid: Tensor | None,
    num_points: int,
    generator: torch.Generator | None,
    bounds: tuple[float, float] | None,
) -> tuple[Tensor, Tensor]:
    n = A.shape[0]
    dtype = getattr(A, "dtype", torch.float64)
    device = getattr(A, "device", torch.device("cpu"))
    if bounds is None:
        z = (2 * torch.randint(0, 2, (n,), generator=generator, device=device) - 1).to(dtype)
        alpha, beta = _lanczos_tridiagonal(A, z / math.sqrt(n), min(20, n))
        T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        theta = torch.linalg.eigvalsh(T)
        lo, hi = float(theta[0]), float(theta[-1])
        pad = 0.05 * max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = bounds
        if not hi > lo:
            raise ValueError(f"bounds must satisfy lo < hi, got {bounds}")
    center, half = (hi + lo) / 2, (hi - lo) / 2
    moments = torch.zeros(degree, dtype=dtype, device=device)
    for _ in range(num_probes):
        z = (2 * torch.randint(0, 2, (n,), generator=generator, device=device) - 1).to(dtype)
        t_prev, t_cur = z, (A @ z - center * z) / half
        moments[0] += z @ z
        if degree > 1:
            moments[1] += z @ t_cur
        for k in range(2, degree):
            t_next = 2 * (A @ t_cur - center * t_cur) / half - t_prev
            moments[k] += z @ t_next
            t_prev, t_cur = t_cur, t_next
    moments /= num_probes * n
    k = torch.arange(degree, dtype=dtype, device=device)
    M = degree + 1
    jackson = (
        (M - k) * torch.cos(math.pi * k / M) + torch.sin(math.pi * k / M) / math.tan(math.pi / M)
    ) / M
    if grid is None:  # midpoints: the Chebyshev weight is singular at the bounds
        grid = lo + (hi - lo) * (torch.arange(num_points, dtype=dtype, device=device) + 0.5)
        grid = grid / num_points
    x = ((grid.double() - center) / half).to(moments.device)
    inside = x.abs() < 1  # the density vanishes outside the bounds (they enclose the spectrum)
    xs = torch.where(inside, x, torch.zeros_like(x))
    cheb = torch.cos(k.double().unsqueeze(0) * torch.arccos(xs).unsqueeze(1))  # [points, degree]
    coeff = (moments * jackson).double()
    coeff[1:] *= 2
    density = (cheb @ coeff) / (math.pi * torch.sqrt(1 - xs * xs)) / half
    density = torch.where(inside, density, torch.zeros_like(density))
    return grid, density.clamp_min(0).to(dtype)
