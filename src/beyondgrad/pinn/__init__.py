"""Physics-informed neural networks: the forward Laplacian, PDE residual losses, their
Gauss-Newton matrix (Gramian), KFAC for it and the optimizers KFAC-PINN and ENGD.

Based on Dangel, Mueller & Zeinhofer, "Kronecker-Factored Approximate Curvature for
Physics-Informed Neural Networks" (NeurIPS 2024) and Mueller & Zeinhofer, "Achieving High
Accuracy with PINNs via Energy Natural Gradients" (ICML 2023). Networks are MLPs
(``nn.Sequential`` of ``nn.Linear`` and smooth element-wise activations)::

    import beyondgrad as bg
    pde = bg.pinn.poisson(2)
    loss = bg.pinn.PINNLoss(model, pde, X_interior, X_boundary)
    opt = bg.pinn.KFACPINN(loss, step_rule="auto")
    for _ in range(100):
        opt.step()
    bg.pinn.relative_l2_error(model, pde, X_test)

``PINNLoss.evaluate`` runs the forward Laplacian and its backward in closed form
(:mod:`beyondgrad.pinn.fused`, no autograd through the network); ``PINNLoss.value`` is the
autograd-differentiable loss (for torch optimizers). ``KFACPINN(loss, step_rule="auto",
cg_steps=6)`` refines each KFAC direction by a few KFAC-preconditioned conjugate-gradient
iterations on the exact Gauss-Newton system.
"""

from .kron import (
    KroneckerSumInverse,
    damped_kronecker_sum_inverse,
    generalized_eigh,
    simultaneous_diagonalization,
)
from .loss import Evaluation, PINNLoss, dot, flatten, unflatten
from .optim import ENGD, KFACPINN, LOG_GRID, line_search
from .problems import PDE, heat, poisson, relative_l2_error
from .taylor import (
    ACTIVATIONS,
    LayerRecord,
    TaylorResult,
    UnsupportedModuleError,
    forward_laplacian,
    layers_of,
    linear_layers,
    taylor_forward,
)

__all__ = [
    "ACTIVATIONS",
    "ENGD",
    "KFACPINN",
    "LOG_GRID",
    "PDE",
    "Evaluation",
    "KroneckerSumInverse",
    "LayerRecord",
    "PINNLoss",
    "TaylorResult",
    "UnsupportedModuleError",
    "damped_kronecker_sum_inverse",
    "dot",
    "flatten",
    "forward_laplacian",
    "generalized_eigh",
    "heat",
    "layers_of",
    "line_search",
    "linear_layers",
    "poisson",
    "relative_l2_error",
    "simultaneous_diagonalization",
    "taylor_forward",
    "unflatten",
]
