"""The engine: capture -> backprop -> rules -> statistics (see DESIGN.md, section 1).

Its product is :class:`Statistics` (forms per parameter and vector kind, raw Kronecker sums per
module, the loss and its scaling); quantities (:mod:`beyondgrad.quantities`) are plug-ins that
declare :class:`Needs` and reduce the statistics. The engine imports no quantity.
"""

from .backprop import GRAD, Backprop, VectorKind, backprop_vectors
from .compute import call_model, compute
from .coverage import Coverage, CoverageRow, coverage
from .losses import SUPPORTED_LOSSES, check_loss_fn, loss_vectors, reduction_factor
from .result import Result
from .session import SamplesCoupledError, Session, capture, check_samples_independent
from .stats import Needs, ReduceContext, Statistics

__all__ = [
    "GRAD",
    "SUPPORTED_LOSSES",
    "Backprop",
    "Coverage",
    "CoverageRow",
    "Needs",
    "ReduceContext",
    "Result",
    "SamplesCoupledError",
    "Session",
    "Statistics",
    "VectorKind",
    "backprop_vectors",
    "call_model",
    "capture",
    "check_loss_fn",
    "check_samples_independent",
    "compute",
    "coverage",
    "loss_vectors",
    "reduction_factor",
]
