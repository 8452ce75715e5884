"""Stochastic trace and diagonal estimators (matrix-free, explicit generators)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _probes(
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    kind: str,
) -> Tensor:
    if kind == "rademacher":
        bits = torch.randint(0, 2, (n, k), generator=generator, device=device)
        return (2 * bits - 1).to(dtype)
    if kind == "normal":
        return torch.randn(n, k, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"probe distribution must be 'rademacher' or 'normal', got {kind!r}")


def trace(
    A: Any,
    num_matvecs: int = 30,
    method: str = "hutch++",
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
) -> tuple[Tensor, Tensor | None]:
    """Estimate ``trace(A)`` with ``num_matvecs`` products: ``(estimate, standard error)``.

    ``method="hutchinson"``: the mean of ``z^T A z`` (standard error from the sample
    variance). ``"hutch++"`` (Meyer et al. 2021): a third of the budget sketches the dominant
    range ``Q``, ``trace(Q^T A Q)`` is exact on it and Hutchinson handles the rest (error from
    the residual part's sample variance); far fewer products for decaying spectra.
    """
    n = A.shape[0]
    dtype, device = getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))
    if num_matvecs < 1:
        raise ValueError("num_matvecs must be positive")
    if method == "hutchinson":
        Z = _probes(n, num_matvecs, dtype, device, generator, distribution)
        samples = (Z * (A @ Z)).sum(0)
        err = samples.std() / num_matvecs**0.5 if num_matvecs > 1 else None
        return samples.mean(), err
    if method != "hutch++":
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    if num_matvecs < 3:
        raise ValueError("hutch++ needs at least 3 products")
    s = num_matvecs // 3
    S = _probes(n, s, dtype, device, generator, distribution)
    Q, _ = torch.linalg.qr(A @ S)
    exact = torch.trace(Q.T @ (A @ Q))
    g = num_matvecs - 2 * s
    G = _probes(n, g, dtype, device, generator, distribution)
    G = G - Q @ (Q.T @ G)
    samples = (G * (A @ G)).sum(0)
    err = samples.std() / g**0.5 if g > 1 else None
    return exact + samples.mean(), err


def diagonal(
    A: Any,
    num_matvecs: int = 30,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
) -> Tensor:
    """Hutchinson's diagonal estimator ``mean(z * (A z))`` over ``num_matvecs`` probes."""
    n = A.shape[0]
    dtype, device = getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))
    Z = _probes(n, num_matvecs, dtype, device, generator, distribution)
    return (Z * (A @ Z)).mean(1)


def frobenius_norm_squared(
    A: Any,
    num_matvecs: int = 30,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
) -> tuple[Tensor, Tensor | None]:
    """Estimate ``|A|_F^2 = E |A z|^2`` with ``num_matvecs`` probes: ``(estimate, standard
    error)``."""
    n = A.shape[1]
    dtype, device = getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))
    Z = _probes(n, num_matvecs, dtype, device, generator, distribution)
    samples = (A @ Z).pow(2).sum(0)
    err = samples.std() / num_matvecs**0.5 if num_matvecs > 1 else None
    return samples.mean(), err
