"""Matrix-free algorithms on any :class:`~beyondgrad.linops.LinearOperator` (or anything with
``@`` on ``[n]``/``[n, k]`` tensors and a ``shape``), in PyTorch: eigenpairs (Lanczos),
trace and diagonal estimators, and linear solvers."""

from .eigen import eigsh
from .estimators import diagonal, trace
from .solve import cg, minres, solve
from .spectral import spectral_density

__all__ = ["cg", "diagonal", "eigsh", "minres", "solve", "spectral_density", "trace"]
