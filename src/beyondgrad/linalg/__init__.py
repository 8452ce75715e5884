"""Matrix-free algorithms on any :class:`~beyondgrad.linops.LinearOperator` (or anything with
``@`` on ``[n]``/``[n, k]`` tensors and a ``shape``), in PyTorch: eigenpairs (Lanczos),
trace and diagonal estimators, and linear solvers. Each algorithm runs inside the operator's
``repeated_products()`` context where it has one (data-set curvature operators then keep their
per-batch graphs/forms between the algorithm's products). :mod:`.eigenbasis` holds the Kronecker
eigenbasis functions (robust ``symmetric_eigh``, damped Kronecker inverses, log-determinants)
shared by the KFAC factors, the structured operators and the KFAC optimizer."""

from . import eigenbasis
from .eigen import eigsh
from .estimators import diagonal, frobenius_norm_squared, trace
from .solve import InverseOperator, cg, minres, neumann, solve
from .spectral import spectral_density

__all__ = [
    "InverseOperator",
    "cg",
    "diagonal",
    "eigenbasis",
    "eigsh",
    "frobenius_norm_squared",
    "minres",
    "neumann",
    "solve",
    "spectral_density",
    "trace",
]
