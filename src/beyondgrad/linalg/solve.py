"""Linear solvers for (damped) curvature systems ``(A + damping I) x = b``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._repeat import repeated, with_repeated_products


def _apply(A: Any, x: Tensor, damping: float) -> Tensor:
    out = A @ x
    return out + damping * x if damping else out


@with_repeated_products
def cg(
    A: Any,
    b: Tensor,
    damping: float = 0.0,
    tol: float = 1e-8,
    max_iter: int | None = None,
    x0: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Conjugate gradients for symmetric positive (semi-)definite ``A + damping I``; stops
    when ``|r| <= tol |b|``. Returns ``(x, info)`` with ``iterations`` and ``residual``."""
    n = b.shape[0]
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - _apply(A, x, damping)
    p = r.clone()
    rs = r @ r
    bnorm = b.norm().clamp_min(torch.finfo(b.dtype).tiny)
    iterations = 0
    for iterations in range(1, (max_iter or 10 * n) + 1):  # noqa: B007 (reported below)
        Ap = _apply(A, p, damping)
        curvature = p @ Ap
        if curvature <= 0:
            raise ValueError(
                "CG met non-positive curvature: the system is not positive definite; "
                "use minres or more damping"
            )
        step = rs / curvature
        x = x + step * p
        r = r - step * Ap
        rs_new = r @ r
        if rs_new.sqrt() <= tol * bnorm:
            rs = rs_new
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, {"iterations": iterations, "residual": float(rs.sqrt() / bnorm)}


@with_repeated_products
def minres(
    A: Any, b: Tensor, damping: float = 0.0, tol: float = 1e-8, max_iter: int | None = None
) -> tuple[Tensor, dict]:
    """MINRES for symmetric, possibly indefinite ``A + damping I`` (e.g. a Hessian): minimizes
    the residual over the Krylov space (Paige and Saunders' recurrences, no preconditioner)."""
    n = b.shape[0]
    x = torch.zeros_like(b)
    beta1 = float(b.norm())
    if beta1 == 0:
        return x, {"iterations": 0, "residual": 0.0}
    r1 = b.clone()
    r2 = b.clone()
    y = b.clone()
    old_beta, beta = 0.0, beta1
    dbar, epsln, phibar = 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    it = 0
    for it in range(1, (max_iter or 10 * n) + 1):
        v = y / beta
        y = _apply(A, v, damping)
        if it >= 2:
            y = y - (beta / old_beta) * r1
        alpha = float(v @ y)
        y = y - (alpha / beta) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, float(y.norm())
        old_eps = epsln
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsln = sn * beta
        dbar = -cs * beta
        gamma = max((gbar * gbar + beta * beta) ** 0.5, torch.finfo(b.dtype).tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - old_eps * w1 - delta * w2) / gamma
        x = x + phi * w
        if phibar <= tol * beta1 or beta == 0:
            break
    return x, {"iterations": it, "residual": phibar / beta1}


def solve(A: Any, b: Tensor, method: str = "cg", damping: float = 0.0, **kwargs: Any) -> Tensor:
    """Solve ``(A + damping I) x = b`` (``b``: ``[n]``) with ``method`` ``"cg"``,
    ``"minres"`` (indefinite systems) or ``"neumann"`` (a truncated series: ``scale``,
    ``terms``; see :func:`neumann`)."""
    if method == "cg":
        return cg(A, b, damping, **kwargs)[0]
    if method == "minres":
        return minres(A, b, damping, **kwargs)[0]
    if method == "neumann":
        return neumann(A, b, damping, **kwargs)
    raise ValueError(f"method must be 'cg', 'minres' or 'neumann', got {method!r}")


@with_repeated_products
def neumann(A: Any, b: Tensor, damping: float = 0.0, scale: float = 1.0, terms: int = 50) -> Tensor:
    """Truncated Neumann series ``scale * sum_{j<terms} (I - scale (A + damping I))^j b`` for
    ``(A + damping I)^{-1} b``; converges when ``0 < scale * lambda < 2`` for every eigenvalue
    ``lambda`` of ``A + damping I`` (e.g. ``scale = 1 / lambda_max``)."""
    term = scale * b
    total = term.clone()
    for _ in range(terms - 1):
        term = term - scale * _apply(A, term, damping)
        total = total + term
    return total


class InverseOperator:
    """``(A + damping I)^{-1}`` as an operator whose products run a solver (``"cg"`` for
    positive definite, ``"minres"`` for indefinite systems, column by column) or a truncated
    Neumann series (``"neumann"``, ``scale``/``terms`` keyword arguments; a whole block at
    once)."""

    def __init__(self, A: Any, damping: float = 0.0, method: str = "cg", **kwargs: Any):
        if method not in ("cg", "minres", "neumann"):
            raise ValueError(f"method must be 'cg', 'minres' or 'neumann', got {method!r}")
        self.A, self.damping, self.method, self.kwargs = A, damping, method, kwargs
        self.shape = A.shape
        self.dtype = getattr(A, "dtype", torch.float64)
        self.device = getattr(A, "device", torch.device("cpu"))

    def repeated_products(self) -> Any:
        """Forwarded to ``A``: algorithms on the inverse keep ``A``'s per-batch state."""
        return repeated(self.A)

    def __matmul__(self, b: Tensor) -> Tensor:
        if b.ndim == 1 or self.method == "neumann":
            return solve(self.A, b, self.method, self.damping, **self.kwargs)
        with repeated(self.A):
            return torch.stack(
                [solve(self.A, col, self.method, self.damping, **self.kwargs) for col in b.T], 1
            )
