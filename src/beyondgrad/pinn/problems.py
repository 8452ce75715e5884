"""PDE problems for physics-informed training: operators, manufactured solutions, samplers.

A :class:`PDE` bundles what a PINN loss needs:

* ``residual(X, res)``: the interior residual ``[N, 1]`` from the points ``X [N, d]`` and the
  forward-Laplacian result ``res`` (value, gradient, Laplacian over ``laplace_dims``); the
  residual must be an affine function of ``(u, grad_u, lap_u)`` for the Gauss-Newton matrix
  to be the one of the loss;
* ``exact(X)``: the solution ``[N, 1]``, used for the boundary data and the error;
* ``sample_interior(n, gen)`` / ``sample_boundary(n, gen)``: points ``[n, d]``.

To add an operator, build a :class:`PDE` with your own ``residual`` (e.g.
``lambda X, r: -r.lap_u + c * r.u - f(X)`` for a screened Poisson equation) and the coordinates
its Laplacian sums over; every loss, Gramian, KFAC and optimizer of :mod:`beyondgrad.pinn` then
works unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .taylor import TaylorResult

Sampler = Callable[[int, torch.Generator], Tensor]


@dataclass(frozen=True)
class PDE:
    """A PDE on a domain with Dirichlet data from a known solution.

    Attributes:
        name: a short label.
        dim: ``d``, the number of input coordinates (time included).
        residual: ``(X [N, d], TaylorResult) -> [N, 1]`` interior residual (zero at the
            solution).
        exact: ``X [N, d] -> [N, 1]`` the solution (boundary data and error reference).
        sample_interior: ``(n, generator) -> [n, d]`` interior points.
        sample_boundary: ``(n, generator) -> [n, d]`` boundary points.
        laplace_dims: the coordinates the Laplacian in ``residual`` sums over (``None``: all).
    """

    name: str
    dim: int
    residual: Callable[[Tensor, TaylorResult], Tensor]
    exact: Callable[[Tensor], Tensor]
    sample_interior: Sampler
    sample_boundary: Sampler
    laplace_dims: Sequence[int] | None = None


def _cube(n: int, d: int, gen: torch.Generator) -> Tensor:
    return torch.rand(n, d, generator=gen, dtype=torch.float64)


def _cube_faces(n: int, d: int, gen: torch.Generator, first: int = 0) -> Tensor:
    """``n`` points on the faces ``x_i in {0, 1}`` for ``i >= first`` of the unit cube."""
    X = _cube(n, d, gen)
    face = torch.randint(first, d, (n,), generator=gen)
    side = torch.randint(0, 2, (n,), generator=gen).to(X.dtype)
    X[torch.arange(n), face] = side
    return X


def _initial_and_faces(n: int, d: int, gen: torch.Generator) -> Tensor:
    """Points on the faces of ``[0, 1]^d`` except the final time ``t = 1`` (moved to ``t = 0``)."""
    X = _cube_faces(n, d, gen)
    X[X[:, 0] == 1.0, 0] = 0.0  # a face point at t = 1 becomes an initial-slice point
    return X


def _sines(X: Tensor) -> Tensor:
    return torch.sin(math.pi * X).sum(1, keepdim=True)


def poisson(d: int = 2) -> PDE:
    """``-Laplace u = f`` on the unit cube ``[0, 1]^d`` with Dirichlet data, for the solution
    ``u(x) = sum_i sin(pi x_i)`` (so ``f = pi^2 u``).

    The residual is ``lap_u + f``; boundary points are uniform on the ``2 d`` faces.

    Args:
        d: the dimension.

    Returns:
        The :class:`PDE`.
    """

    def residual(X: Tensor, res: TaylorResult) -> Tensor:
        assert res.lap_u is not None
        return res.lap_u + math.pi**2 * _sines(X)

    return PDE(
        name=f"poisson{d}d",
        dim=d,
        residual=residual,
        exact=_sines,
        sample_interior=lambda n, g: _cube(n, d, g),
        sample_boundary=lambda n, g: _cube_faces(n, d, g),
    )


def heat(d: int = 1, kappa: float = 0.25) -> PDE:
    """The heat equation ``u_t = kappa Laplace_x u`` on ``[0, 1] x [0, 1]^d`` (coordinate 0
    is time), for the solution ``u(t, x) = exp(-kappa pi^2 t) sum_i sin(pi x_i)``.

    The residual is ``u_t - kappa lap_x u``; boundary points cover the initial slice ``t = 0``
    and the spatial faces (one part in ``d + 1`` on the initial slice).

    Args:
        d: the number of spatial dimensions (inputs have ``d + 1`` coordinates).
        kappa: the diffusivity.

    Returns:
        The :class:`PDE`.
    """

    def exact(X: Tensor) -> Tensor:
        return torch.exp(-kappa * math.pi**2 * X[:, :1]) * _sines(X[:, 1:])

    def residual(X: Tensor, res: TaylorResult) -> Tensor:
        assert res.grad_u is not None and res.lap_u is not None
        return res.grad_u[:, :1] - kappa * res.lap_u

    return PDE(
        name=f"heat{d}+1d",
        dim=d + 1,
        residual=residual,
        exact=exact,
        sample_interior=lambda n, g: _cube(n, d + 1, g),
        sample_boundary=lambda n, g: _initial_and_faces(n, d + 1, g),
        laplace_dims=tuple(range(1, d + 1)),
    )


def relative_l2_error(model: torch.nn.Module, pde: PDE, X: Tensor) -> float:
    """``||u_theta - u|| / ||u||`` over test points (a Monte-Carlo relative L2 error).

    Args:
        model: the network (``[N, d] -> [N, 1]``).
        pde: the problem (its ``exact`` solution).
        X: ``[N, d]`` test points.

    Returns:
        The relative error, a float.
    """
    with torch.no_grad():
        u, ref = model(X), pde.exact(X)
    return float(torch.linalg.vector_norm(u - ref) / torch.linalg.vector_norm(ref))
