"""Stochastic trace and diagonal estimators (matrix-free, explicit generators)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._repeat import require_square, with_repeated_products


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


@with_repeated_products
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
    ``"xtrace"`` (Epperly, Tropp & Webber 2024; symmetric ``A``): half the budget sketches
    ``Y = A Omega``, the other half forms ``A Q``; for every probe ``i`` the sketch without it
    gives an exact low-rank part plus a Hutchinson term on ``omega_i`` (exchangeable
    leave-one-out), and the estimates are averaged (error from their spread). Exact when the
    rank of ``A`` is below half the budget.

    Args:
        A: a square operator ``(n, n)`` (anything with ``shape`` and ``@`` on ``[n, k]``).
        num_matvecs: the budget of products with ``A`` (at least 3 for ``"hutch++"``, 4 for
            ``"xtrace"``).
        method: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        generator: the random generator of the probes (``None``: torch's global one); pass a
            seeded one for reproducible estimates.
        distribution: the probe entries, ``"rademacher"`` (``+-1``) or ``"normal"``.

    Returns:
        ``(estimate, standard error)``: 0-dim tensors; the error is ``None`` where it cannot
        be estimated (a single random probe in the Hutchinson part).
    """
    n = require_square(A, "trace")
    dtype, device = getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))
    if num_matvecs < 1:
        raise ValueError("num_matvecs must be positive")
    if method == "hutchinson":
        Z = _probes(n, num_matvecs, dtype, device, generator, distribution)
        samples = (Z * (A @ Z)).sum(0)
        err = samples.std() / num_matvecs**0.5 if num_matvecs > 1 else None
        return samples.mean(), err
    if method == "xtrace":
        ests, _ = _leave_one_out(A, num_matvecs, dtype, device, generator, distribution, False)
        m = ests.shape[0]
        return ests.mean(), ests.std() / m**0.5
    if method != "hutch++":
        raise ValueError(f"method must be 'hutchinson', 'hutch++' or 'xtrace', got {method!r}")
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


@with_repeated_products
def diagonal(
    A: Any,
    num_matvecs: int = 30,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
    method: str = "hutchinson",
) -> Tensor:
    """Estimate ``diag(A)`` with ``num_matvecs`` products. ``method="hutchinson"``:
    ``mean(z * (A z))``. ``"xdiag"`` (Epperly, Tropp & Webber 2024; symmetric ``A``): the
    leave-one-out construction of ``trace(method="xtrace")`` applied to the diagonal, exact
    for rank below half the budget.

    Args:
        A: a square operator ``(n, n)``.
        num_matvecs: the budget of products with ``A`` (at least 4 for ``"xdiag"``).
        generator: the random generator of the probes (``None``: torch's global one); pass a
            seeded one for reproducible estimates.
        distribution: the probe entries, ``"rademacher"`` (``+-1``) or ``"normal"``.
        method: ``"hutchinson"`` or ``"xdiag"``.

    Returns:
        ``[n]``, the estimated diagonal.
    """
    n = require_square(A, "diagonal")
    dtype, device = getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))
    if method == "xdiag":
        ests, _ = _leave_one_out(A, num_matvecs, dtype, device, generator, distribution, True)
        return ests.mean(0)
    if method != "hutchinson":
        raise ValueError(f"method must be 'hutchinson' or 'xdiag', got {method!r}")
    Z = _probes(n, num_matvecs, dtype, device, generator, distribution)
    return (Z * (A @ Z)).mean(1)


def _leave_one_out(
    A: Any,
    num_matvecs: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None,
    distribution: str,
    diagonal: bool,
) -> tuple[Tensor, int]:
    """Per-probe exchangeable estimates (XTrace / XDiag) for symmetric ``A``: ``[m]`` traces
    or ``[m, n]`` diagonals, from ``2 m <= num_matvecs`` products.

    With ``Y = A Omega = Q R`` and ``Z = A Q``, the sketch without probe ``i`` spans
    ``Q C_i`` (``C_i``: orthonormal basis of ``R`` without column ``i``), so every needed
    product with ``A`` is a small matrix expression in ``Z``, ``Y`` and ``Q``:
    ``trace(P_i A P_i) + w^T A w`` with ``w = (I - P_i) omega_i`` for the trace, and
    ``diag(P_i A) + omega_i * ((I - P_i) A omega_i)`` for the diagonal.
    """
    m = num_matvecs // 2
    if m < 2:
        raise ValueError("xtrace/xdiag need at least 4 products")
    n = A.shape[0]
    Om = _probes(n, m, dtype, device, generator, distribution)
    Y = A @ Om
    Q, R = torch.linalg.qr(Y)
    Z = A @ Q
    H = Q.T @ Z
    H = (H + H.T) / 2
    QtOm, ZtOm, QtY = Q.T @ Om, Z.T @ Om, Q.T @ Y
    d = torch.diagonal(R).abs()
    if bool((d > d.max() * torch.finfo(dtype).eps * m * 10).all()):
        # range(R without column i) is the orthogonal complement of s_i = R^{-T} e_i, so
        # P_i = I - s_i s_i^T (normalized) in Q coordinates: all m estimates in O(m^3)
        eye = torch.eye(m, dtype=dtype, device=device)
        S = torch.linalg.solve_triangular(R.T, eye, upper=False)
        S = S / S.norm(dim=0, keepdim=True)
        if diagonal:
            low_rank = (Q * Z).sum(1, keepdim=True) - (Q @ S) * (Z @ S)  # diag(P_i A) per i
            PQtY = QtY - S * (S * QtY).sum(0, keepdim=True)
            residual = Om * (Y - Q @ PQtY)
            return (low_rank + residual).T, 2 * m
        PU = QtOm - S * (S * QtOm).sum(0, keepdim=True)  # P_i u_i, column i
        quad = (Om * Y).sum(0) - 2 * (ZtOm * PU).sum(0) + (PU * (H @ PU)).sum(0)
        return torch.trace(H) - (S * (H @ S)).sum(0) + quad, 2 * m
    ests = []  # a rank-deficient sketch: an orthonormal basis per left-out probe
    for i in range(m):
        others = [j for j in range(m) if j != i]
        C, _ = torch.linalg.qr(R[:, others])  # [m, m - 1]
        Pc = C @ C.T  # the projector P_i in Q coordinates
        if diagonal:
            low_rank = ((Q @ Pc) * Z).sum(1)  # diag(Q Pc Q^T A) = diag(P_i A)
            residual = Om[:, i] * (Y[:, i] - Q @ (Pc @ QtY[:, i]))
            ests.append(low_rank + residual)
        else:
            u = QtOm[:, i]
            quad = Om[:, i] @ Y[:, i] - 2 * (ZtOm[:, i] @ (Pc @ u)) + (Pc @ u) @ H @ (Pc @ u)
            ests.append(torch.trace(C.T @ H @ C) + quad)
    return torch.stack(ests), 2 * m


@with_repeated_products
def frobenius_norm_squared(
    A: Any,
    num_matvecs: int = 30,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
) -> tuple[Tensor, Tensor | None]:
    """Estimate ``|A|_F^2 = E |A z|^2`` with ``num_matvecs`` probes.

    Args:
        A: an operator of shape ``(m, n)`` (need not be square).
        num_matvecs: the number of probes ``z`` (one product each).
        generator: the random generator of the probes (``None``: torch's global one); pass a
            seeded one for reproducible estimates.
        distribution: the probe entries, ``"rademacher"`` (``+-1``) or ``"normal"``.

    Returns:
        ``(estimate, standard error)``: the mean of ``|A z|^2`` over the probes and its
        standard error (``None`` for a single probe).
    """
    n = A.shape[1]
    dtype, device = getattr(A, "dtype", torch.float64), getattr(A, "device", torch.device("cpu"))
    Z = _probes(n, num_matvecs, dtype, device, generator, distribution)
    samples = (A @ Z).pow(2).sum(0)
    err = samples.std() / num_matvecs**0.5 if num_matvecs > 1 else None
    return samples.mean(), err
