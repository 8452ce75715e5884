"""A physics-informed network for the 2-d Poisson equation, trained with KFAC for PINNs.

Shows:

* ``bg.pinn.forward_laplacian``: value, gradient and Laplacian of an MLP in one forward pass
  (``S = d + 2`` weight-shared vectors per point), checked against nested autograd;
* ``bg.pinn.PINNLoss`` on interior and boundary points of ``bg.pinn.poisson(2)`` (``-Laplace u
  = f`` on the unit square, ``u = sin(pi x) + sin(pi y)``);
* ``bg.pinn.KFACPINN(step_rule="auto")`` (KFAC-expand for the interior term, standard KFAC for
  the boundary term, the exact inverse of their Kronecker sum, Martens' automatic step) next to
  ``torch.optim.Adam`` for the same number of steps, and the relative L2 error of each.

Checks: the forward Laplacian equals nested autograd, and KFAC reaches a lower loss than Adam.

Run ``python examples/pinn_poisson.py`` (``--small`` or ``BEYONDGRAD_EXAMPLES_SMALL=1`` for a
tiny run).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.func import hessian, vmap

import beyondgrad as bg


def parse_args() -> argparse.Namespace:
    """The ``--small`` flag (or the ``BEYONDGRAD_EXAMPLES_SMALL=1`` environment variable)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (seconds)")
    args = parser.parse_args()
    args.small = args.small or os.environ.get("BEYONDGRAD_EXAMPLES_SMALL") == "1"
    return args


def network(width: int) -> nn.Sequential:
    """``2 -> width -> 1`` with tanh (``width = 64``: the paper's 257 parameters)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1))


def main() -> None:
    """Check the forward Laplacian, train with KFAC and Adam, compare."""
    args = parse_args()
    torch.set_default_dtype(torch.float64)
    width, n, n_b, steps = (16, 100, 40, 30) if args.small else (64, 900, 120, 200)
    pde, gen = bg.pinn.poisson(2), torch.Generator().manual_seed(0)
    X, X_b, X_test = (
        pde.sample_interior(n, gen),
        pde.sample_boundary(n_b, gen),
        pde.sample_interior(5000, gen),
    )

    model = network(width)
    _, _, lap = bg.pinn.forward_laplacian(model, X[:10])
    H = vmap(hessian(lambda x: model(x[None])[0, 0]))(X[:10])
    err = (lap[:, 0] - H.diagonal(dim1=1, dim2=2).sum(1)).abs().max().item()
    print(f"forward Laplacian vs nested autograd: max error {err:.1e}")
    assert err < 1e-10

    results = {}
    kfac_loss = bg.pinn.PINNLoss(model, pde, X, X_b)
    opt = bg.pinn.KFACPINN(kfac_loss, damping=1e-3, step_rule="auto")
    for _ in range(steps):
        opt.step()
    results["KFAC (auto)"] = (
        kfac_loss.value().item(),
        bg.pinn.relative_l2_error(model, pde, X_test),
    )

    adam_model = network(width)
    adam_loss = bg.pinn.PINNLoss(adam_model, pde, X, X_b)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-2)
    for _ in range(steps):
        adam.zero_grad()
        adam_loss.value().backward()
        adam.step()
    results["Adam"] = (adam_loss.value().item(), bg.pinn.relative_l2_error(adam_model, pde, X_test))
    for name, (value, rel) in results.items():
        print(f"{name:12s} after {steps} steps: loss {value:.2e}, relative L2 error {rel:.2e}")
    assert results["KFAC (auto)"][0] < results["Adam"][0]
    print("OK: the forward Laplacian equals nested autograd and KFAC beats Adam per step")


if __name__ == "__main__":
    main()
