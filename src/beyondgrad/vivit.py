"""Deprecated location; see :mod:`beyondgrad.quantities.vivit`."""

from .quantities.vivit import GGNEigenResult, ggn_eigen

__all__ = ["GGNEigenResult", "ggn_eigen"]
