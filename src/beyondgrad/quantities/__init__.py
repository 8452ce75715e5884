"""Quantities: plug-ins that declare what they need from the engine and reduce its
:class:`~beyondgrad.engine.Statistics` (see :mod:`beyondgrad.quantities.base`).

=========================  ============================================  ==================
module                     quantities                                    vectors
=========================  ============================================  ==================
``first_order``            Grad, BatchGrad, BatchL2, BatchDot,           loss gradient
                           SumGradSquared, Variance
``curvature``              DiagGGN, BatchDiagGGN                         exact / MC
``vivit``                  SqrtGGN, GGNEigen, GGNSpectrum                exact / MC (+ grad)
``kfac``                   KFAC                                          by fisher_type
``hessian``                DiagHessian (exact, HesScale)                 exact + residuals
=========================  ============================================  ==================
"""

from .base import Needs, Quantity, ReduceContext
from .curvature import BatchDiagGGN, Curvature, DiagGGN
from .first_order import BatchDot, BatchGrad, BatchL2, Grad, SumGradSquared, Variance
from .hessian import DiagHessian, hesscale, residual_sites
from .kfac import FISHER_TYPES, KFAC, KFAC_APPROX
from .vivit import GGNEigen, GGNEigenResult, GGNSpectrum, SqrtGGN, ggn_eigen

FIRST_ORDER: tuple[type[Quantity], ...] = (
    Grad,
    BatchGrad,
    BatchL2,
    BatchDot,
    SumGradSquared,
    Variance,
)
SECOND_ORDER: tuple[type[Quantity], ...] = (
    DiagGGN,
    BatchDiagGGN,
    SqrtGGN,
    KFAC,
    GGNEigen,
    GGNSpectrum,
)

__all__ = [
    "FIRST_ORDER",
    "FISHER_TYPES",
    "KFAC",
    "KFAC_APPROX",
    "SECOND_ORDER",
    "BatchDiagGGN",
    "BatchDot",
    "BatchGrad",
    "BatchL2",
    "Curvature",
    "DiagGGN",
    "DiagHessian",
    "GGNEigen",
    "GGNEigenResult",
    "GGNSpectrum",
    "Grad",
    "Needs",
    "Quantity",
    "ReduceContext",
    "SqrtGGN",
    "SumGradSquared",
    "Variance",
    "ggn_eigen",
    "hesscale",
    "residual_sites",
]
