"""Curvature matrices over a data set as linear operators (``A @ v``, ``A @ V``, compose,
``to_scipy``, ``to_dense``, ``inverse``) and structured operators with closed forms, composed
from building blocks (Kronecker, block-diagonal, diagonal, low-rank, sums)."""

from .base import DenseOperator, LinearOperator, SolverInverse, Sum
from .curvature import (
    GGN,
    CurvatureOperator,
    EmpiricalFisher,
    Fisher,
    Hessian,
    Jacobian,
)
from .data import DataSet
from .ekfac import EKFAC
from .kfac import KFAC
from .lowrank import LowRank
from .structures import (
    BlockDiagonal,
    Diagonal,
    Kronecker,
    KroneckerEigen,
    StructuredOperator,
)

__all__ = [
    "EKFAC",
    "GGN",
    "KFAC",
    "BlockDiagonal",
    "CurvatureOperator",
    "DataSet",
    "DenseOperator",
    "Diagonal",
    "EmpiricalFisher",
    "Fisher",
    "Hessian",
    "Jacobian",
    "Kronecker",
    "KroneckerEigen",
    "LinearOperator",
    "LowRank",
    "SolverInverse",
    "StructuredOperator",
    "Sum",
]
