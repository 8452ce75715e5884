"""Curvature matrices over a data set as linear operators (``A @ v``, ``A @ V``, compose,
``to_scipy``, ``to_dense``) and structured operators with closed-form inverses."""

from .base import DenseOperator, LinearOperator
from .curvature import (
    GGN,
    CurvatureOperator,
    Diagonal,
    EmpiricalFisher,
    Fisher,
    Hessian,
    Jacobian,
)
from .ekfac import EKFAC
from .kfac import KFAC
from .lowrank import LowRank

__all__ = [
    "EKFAC",
    "GGN",
    "KFAC",
    "CurvatureOperator",
    "DenseOperator",
    "Diagonal",
    "EmpiricalFisher",
    "Fisher",
    "Hessian",
    "Jacobian",
    "LinearOperator",
    "LowRank",
]
