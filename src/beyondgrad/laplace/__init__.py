"""Laplace approximations on the library's curvature: ``bg.laplace.Laplace``.

See :mod:`beyondgrad.laplace.laplace` for the conventions (likelihood from the loss, summed
loss, ``P = s H + P0``, the evidence) and :mod:`beyondgrad.laplace.curvature` for the
structures and their closed forms.
"""

from .curvature import (
    Curvature,
    DenseCurvature,
    DiagonalCurvature,
    KroneckerCurvature,
    LowRankCurvature,
    curvature_from_state,
)
from .laplace import Laplace, likelihood_of, select_parameters
from .linops_adapter import build_curvature, sum_reduction

__all__ = [
    "Curvature",
    "DenseCurvature",
    "DiagonalCurvature",
    "KroneckerCurvature",
    "Laplace",
    "LowRankCurvature",
    "build_curvature",
    "curvature_from_state",
    "likelihood_of",
    "select_parameters",
    "sum_reduction",
]
