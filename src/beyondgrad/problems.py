"""Deprecated location of the benchmark problems: use :mod:`beyondgrad.app.tasks` (one zoo)."""

import warnings

from .app.tasks import PROBLEMS, Problem, make_problem

warnings.warn("beyondgrad.problems moved to beyondgrad.app.tasks", DeprecationWarning, stacklevel=2)

__all__ = ["PROBLEMS", "Problem", "make_problem"]
