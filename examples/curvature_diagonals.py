"""Curvature diagonals: the GGN, Monte-Carlo Fisher and Hessian diagonals in one backward pass.

Shows:

* ``bg.DiagGGN()``: the exact diagonal of the generalized Gauss-Newton matrix
  ``G = sum_n J_n^T H_n J_n`` (``H_n`` the Hessian of the loss w.r.t. the model output; the
  loss's reduction factor included).
* ``bg.DiagGGN(mc_samples=M)``: its Monte-Carlo estimate (the diagonal of the MC Fisher), which
  converges at about ``1/sqrt(M)``; the draws come from an explicit ``torch.Generator``.
* ``bg.DiagHessian()``: the exact Hessian diagonal for models whose nonlinearities are
  element-wise (here ``tanh``): the GGN diagonal plus the activations' residual terms.

Everything is checked in float64 against brute force: the dense Hessian from
``torch.func.hessian`` and the dense GGN ``J^T H J`` from full Jacobians.

Run ``python examples/curvature_diagonals.py`` (``--small`` or ``BEYONDGRAD_EXAMPLES_SMALL=1``
for a tiny run).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import beyondgrad as bg


def parse_args() -> argparse.Namespace:
    """The ``--small`` flag (or the ``BEYONDGRAD_EXAMPLES_SMALL=1`` environment variable)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes (seconds)")
    args = parser.parse_args()
    args.small = args.small or os.environ.get("BEYONDGRAD_EXAMPLES_SMALL") == "1"
    return args


def flatten(tensors: dict[str, Tensor]) -> Tensor:
    """Concatenate per-parameter tensors in ``named_parameters()`` order."""
    return torch.cat([t.flatten() for t in tensors.values()])


def brute_force(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """Dense Hessian and dense GGN of the loss w.r.t. all parameters (``[P, P]`` each)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = {k: v.shape for k, v in params.items()}

    def unflatten(theta: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, s in shapes.items():
            out[k] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return out

    def output(theta: Tensor) -> Tensor:
        return functional_call(model, unflatten(theta), (X,))

    theta = flatten(params)
    H = hessian(lambda t: loss_fn(output(t), y))(theta)
    J = jacrev(output)(theta).flatten(0, -2)  # [N*C, P]
    f = output(theta).detach()
    H_out = hessian(lambda o: loss_fn(o, y))(f).flatten(0, 1).flatten(1)  # [N*C, N*C]
    return H, J.T @ H_out @ J


def main() -> None:
    """Compute the diagonals with the engine and compare them with brute force."""
    args = parse_args()
    N, D, H, C = (6, 4, 5, 3) if args.small else (32, 8, 16, 4)
    M = 64 if args.small else 1024
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C))
    model = model.double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(N, D, dtype=torch.float64), torch.randint(0, C, (N,))

    res = bg.compute(
        model, loss_fn, X, y,
        bg.DiagGGN(), bg.DiagGGN(mc_samples=M), bg.DiagHessian(),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    diag_ggn = flatten(res[bg.DiagGGN()])
    diag_mc = flatten(res[bg.DiagGGN(mc_samples=M)])
    diag_hess = flatten(res[bg.DiagHessian])

    dense_hess, dense_ggn = brute_force(model, loss_fn, X, y)
    err_ggn = (diag_ggn - dense_ggn.diagonal()).abs().max().item()
    err_hess = (diag_hess - dense_hess.diagonal()).abs().max().item()
    rel_mc = ((diag_mc - diag_ggn).norm() / diag_ggn.norm()).item()
    print(f"{diag_ggn.numel()} parameters")
    print(f"DiagGGN     max |engine - J^T H J|     = {err_ggn:.2e}")
    print(f"DiagHessian max |engine - hessian()|   = {err_hess:.2e}")
    print(f"DiagGGN(mc_samples={M}) relative error = {rel_mc:.3f} (shrinks like 1/sqrt(M))")
    assert err_ggn < 1e-10 and err_hess < 1e-10
    assert rel_mc < 1.0
    print("OK: DiagGGN and DiagHessian equal the brute-force diagonals")


if __name__ == "__main__":
    main()
