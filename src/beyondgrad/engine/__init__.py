"""The engine: capture -> backprop -> rules -> quantities (see DESIGN.md, section 1)."""

from .compute import Result, Session, capture, compute
from .coverage import Coverage, CoverageRow, coverage
from .losses import SUPPORTED_LOSSES, check_loss_fn, loss_vectors

__all__ = [
    "SUPPORTED_LOSSES",
    "Coverage",
    "CoverageRow",
    "Result",
    "Session",
    "capture",
    "check_loss_fn",
    "compute",
    "coverage",
    "loss_vectors",
]
