"""Linear solvers for (damped) curvature systems ``(A + damping I) x = b``.

Every solver reports how well it did: ``info["residual"]`` is the true relative residual
``|b - (A + damping I) x| / |b|`` (one extra product), ``info["converged"]`` whether the
tolerance was met; an unconverged solve (CG at ``max_iter``, a MINRES breakdown on a singular
system, a divergent Neumann series) also raises a ``RuntimeWarning``, as ``eigsh`` does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._repeat import repeated, require_square, with_repeated_products


def _apply(A: Any, x: Tensor, damping: float) -> Tensor:
    out = A @ x
    return out + damping * x if damping else out


def _finish(
    name: str, A: Any, b: Tensor, x: Tensor, damping: float, tol: float, info: dict[str, Any]
) -> dict[str, Any]:
    """Add the true relative residual and ``converged`` to ``info``; warn if unconverged.
    ``info["stopped"]``: the iteration met its own stopping rule (not ``max_iter``)."""
    bnorm = float(b.norm())
    residual = float((b - _apply(A, x, damping)).norm()) / bnorm if bnorm > 0 else 0.0
    eps = torch.finfo(b.dtype).eps
    limit = 10 * max(tol, eps**0.5)  # the recursive residual may drift from the true one
    stopped = info.pop("stopped")
    converged = bool(stopped and residual <= limit)
    info.update(residual=residual, converged=converged)
    if not converged:
        reason = "did not reach tol" if not stopped else "stopped on a false residual"
        warnings.warn(
            f"{name}: not converged ({reason}) after {info['iterations']} iterations: "
            f"relative residual {residual:.3g} (tol={tol}); raise max_iter, add damping, or "
            "use minres for indefinite systems",
            RuntimeWarning,
            stacklevel=3,
        )
    return info


@with_repeated_products
def cg(
    A: Any,
    b: Tensor,
    damping: float = 0.0,
    tol: float = 1e-8,
    max_iter: int | None = None,
    x0: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Conjugate gradients for symmetric positive (semi-)definite ``A + damping I``.

    Args:
        A: a square operator (``A @ v``).
        b: the right-hand side ``[n]``.
        damping: added to the diagonal.
        tol: stop when ``|r| <= tol |b|``.
        max_iter: at most this many iterations (default ``10 n``).
        x0: a start vector (default zero).

    Returns:
        ``(x, info)`` with ``iterations``, ``residual`` (true relative residual) and
        ``converged``; a ``RuntimeWarning`` when not converged.
    """
    n = require_square(A, "cg")
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - _apply(A, x, damping)
    p = r.clone()
    rs = r @ r
    bnorm = b.norm().clamp_min(torch.finfo(b.dtype).tiny)
    iterations, limit = 0, max_iter or 10 * n
    stopped = bool(rs.sqrt() <= tol * bnorm)
    while not stopped and iterations < limit:
        iterations += 1
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
        stopped = bool(rs_new.sqrt() <= tol * bnorm)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, _finish("cg", A, b, x, damping, tol, {"iterations": iterations, "stopped": stopped})


@with_repeated_products
def minres(
    A: Any, b: Tensor, damping: float = 0.0, tol: float = 1e-8, max_iter: int | None = None
) -> tuple[Tensor, dict]:
    """MINRES for symmetric, possibly indefinite ``A + damping I`` (e.g. a Hessian): minimizes
    the residual over the Krylov space (Paige and Saunders' recurrences, no preconditioner).

    Args:
        A: a square symmetric operator.
        b: the right-hand side ``[n]``.
        damping: added to the diagonal.
        tol: stop when the recursive residual estimate is ``<= tol |b|``.
        max_iter: at most this many iterations (default ``10 n``).

    Returns:
        ``(x, info)`` with ``iterations``, ``residual`` (the true relative residual: on a
        singular system the recursive estimate can be far off) and ``converged``; a
        ``RuntimeWarning`` when not converged.
    """
    n = require_square(A, "minres")
    x = torch.zeros_like(b)
    beta1 = float(b.norm())
    if beta1 == 0:
        return x, {"iterations": 0, "residual": 0.0, "converged": True}
    r1, r2, y = b.clone(), b.clone(), b.clone()
    old_beta, beta = 0.0, beta1
    dbar, epsln, phibar = 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    it, stopped = 0, False
    while not stopped and it < (max_iter or 10 * n):
        it += 1
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
        stopped = phibar <= tol * beta1 or beta == 0
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("minres: the iterate is not finite (a singular system?)")
    return x, _finish("minres", A, b, x, damping, tol, {"iterations": it, "stopped": stopped})


def solve(
    A: Any,
    b: Tensor,
    method: str = "cg",
    damping: float = 0.0,
    return_info: bool = False,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, dict]:
    """Solve ``(A + damping I) x = b``.

    Args:
        A: a square operator.
        b: the right-hand side ``[n]``.
        method: ``"cg"`` (positive definite), ``"minres"`` (indefinite systems) or
            ``"neumann"`` (a truncated series: ``scale``, ``terms``; see :func:`neumann`).
        damping: added to the diagonal.
        return_info: also return the solver's convergence information.
        kwargs: the solver's options (``tol``, ``max_iter``, ...).

    Returns:
        ``x`` ``[n]``, or ``(x, info)`` with ``return_info`` (``iterations``/``terms``,
        ``residual``: the true relative residual, ``converged``). An unconverged solve
        raises a ``RuntimeWarning``.
    """
    if method == "cg":
        x, info = cg(A, b, damping, **kwargs)
    elif method == "minres":
        x, info = minres(A, b, damping, **kwargs)
    elif method == "neumann":
        x, info = neumann(A, b, damping, return_info=True, **kwargs)
    else:
        raise ValueError(f"method must be 'cg', 'minres' or 'neumann', got {method!r}")
    return (x, info) if return_info else x


@with_repeated_products
def neumann(
    A: Any,
    b: Tensor,
    damping: float = 0.0,
    scale: float = 1.0,
    terms: int = 50,
    tol: float = 1e-6,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict]:
    """Truncated Neumann series ``scale * sum_{j<terms} (I - scale (A + damping I))^j b`` for
    ``(A + damping I)^{-1} b``; converges when ``0 < scale * lambda < 2`` for every eigenvalue
    ``lambda`` of ``A + damping I`` (e.g. ``scale = 1 / lambda_max``).

    Args:
        A: a square symmetric operator; ``b``: ``[n]`` or a block ``[n, k]``.
        damping: added to the diagonal.
        scale: the step of the series.
        terms: the number of terms.
        tol: ``converged`` when the true relative residual is at most ``tol``.
        return_info: also return ``{"terms", "residual", "converged"}``.

    Returns:
        ``x`` (like ``b``), or ``(x, info)``. A series whose terms grow (``scale`` too large
        or an indefinite system) raises a ``RuntimeWarning``; one that overflows raises
        ``FloatingPointError``.
    """
    require_square(A, "neumann")
    term = scale * b
    total = term.clone()
    first = float(term.norm())
    for _ in range(terms - 1):
        term = term - scale * _apply(A, term, damping)
        total = total + term
    last = float(term.norm())
    if not bool(torch.isfinite(total).all()):
        raise FloatingPointError(
            "neumann: the series diverged to inf/nan; use scale < 2 / lambda_max (and a "
            "positive definite system)"
        )
    bnorm = float(b.norm())
    residual = float((b - _apply(A, total, damping)).norm()) / bnorm if bnorm > 0 else 0.0
    info = {"terms": terms, "residual": residual, "converged": residual <= tol}
    if last > first:
        warnings.warn(
            f"neumann: the series diverges (its terms grew from {first:.3g} to {last:.3g}): "
            "scale * eigenvalue must lie in (0, 2); lower scale or add damping",
            RuntimeWarning,
            stacklevel=3,
        )
    elif not info["converged"]:
        warnings.warn(
            f"neumann: relative residual {residual:.3g} > tol={tol} after {terms} terms; add "
            "terms or tune scale",
            RuntimeWarning,
            stacklevel=3,
        )
    return (total, info) if return_info else total


class InverseOperator:
    """``(A + damping I)^{-1}`` as an operator whose products run a solver (``"cg"`` for
    positive definite, ``"minres"`` for indefinite systems, column by column) or a truncated
    Neumann series (``"neumann"``, ``scale``/``terms`` keyword arguments; a whole block at
    once). Unconverged solves warn (see :func:`solve`).

    Args:
        A: a square operator ``(n, n)``.
        damping: added to the diagonal of ``A``.
        method: ``"cg"``, ``"minres"`` or ``"neumann"``.
        **kwargs: passed to :func:`solve` on every product (tolerances, ``maxiter``;
            ``scale``/``terms`` for ``"neumann"``).
    """

    def __init__(self, A: Any, damping: float = 0.0, method: str = "cg", **kwargs: Any):
        if method not in ("cg", "minres", "neumann"):
            raise ValueError(f"method must be 'cg', 'minres' or 'neumann', got {method!r}")
        require_square(A, "InverseOperator")
        self.A, self.damping, self.method, self.kwargs = A, damping, method, kwargs
        self.shape = A.shape
        self.dtype = getattr(A, "dtype", torch.float64)
        self.device = getattr(A, "device", torch.device("cpu"))

    def repeated_products(self) -> Any:
        """Forwarded to ``A``: algorithms on the inverse keep ``A``'s per-batch state."""
        return repeated(self.A)

    def __matmul__(self, b: Tensor) -> Tensor:
        if b.ndim == 1 or self.method == "neumann":
            return solve(self.A, b, self.method, self.damping, **self.kwargs)  # type: ignore[return-value]
        with repeated(self.A):
            return torch.stack(
                [solve(self.A, col, self.method, self.damping, **self.kwargs) for col in b.T],
                1,  # type: ignore[misc]
            )
