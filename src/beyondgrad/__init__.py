"""beyondgrad: more than the gradient, for any PyTorch model, in about one backward pass.

Public API::

    import beyondgrad as bg
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.BatchL2())
    res[bg.BatchL2]["fc.weight"]
"""

from . import (
    cockpit,
    conv,
    distributed,
    influence,
    laplace,
    linalg,
    linops,
    merging,
    optim,
    pinn,
    pruning,
)
from .allocator import retain_freed_memory
from .engine import (
    SUPPORTED_LOSSES,
    Coverage,
    Needs,
    Result,
    SamplesCoupledError,
    Session,
    Statistics,
    capture,
    compute,
    coverage,
    loss_vectors,
)
from .factors import DiagonalFactors, KroneckerFactors
from .quantities import (
    KFAC,
    BatchDiagGGN,
    BatchDot,
    BatchGrad,
    BatchL2,
    DiagGGN,
    DiagHessian,
    GGNEigen,
    GGNEigenResult,
    GGNSpectrum,
    Grad,
    Quantity,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from .result_pool import configure as configure_result_pool
from .result_pool import release as release_result_pool

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "SUPPORTED_LOSSES",
    "BatchDiagGGN",
    "BatchDot",
    "BatchGrad",
    "BatchL2",
    "Coverage",
    "DiagGGN",
    "DiagHessian",
    "DiagonalFactors",
    "GGNEigen",
    "GGNEigenResult",
    "GGNSpectrum",
    "Grad",
    "KroneckerFactors",
    "Needs",
    "Quantity",
    "Result",
    "SamplesCoupledError",
    "Session",
    "SqrtGGN",
    "Statistics",
    "SumGradSquared",
    "Variance",
    "__version__",
    "capture",
    "cockpit",
    "compute",
    "configure_result_pool",
    "conv",
    "coverage",
    "distributed",
    "influence",
    "laplace",
    "linalg",
    "linops",
    "loss_vectors",
    "merging",
    "optim",
    "pinn",
    "pruning",
    "release_result_pool",
    "retain_freed_memory",
]
