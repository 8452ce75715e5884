"""Kronecker factors (KFAC) of every layer, their conventions, and when they are exact.

Shows:

* ``bg.KFAC(fisher_type=..., kfac_approx=...)`` returns one ``KroneckerFactors`` per module:
  ``A`` (input side, bias-augmented with ``bias="joint"``) and ``B`` (output side); the block of
  a weight ``W [O, I]`` flattened row-major is ``B kron A`` (``order="B kron A"``), and with a
  joint bias it covers ``[W | b]`` as an ``[O, I + 1]`` matrix.
* With one sample and ``fisher_type="type-2"`` the block equals the exact GGN block (the KFAC
  tutorial's exactness case); with more samples it is an approximation.
* ``factors.inverse(damping)`` applies ``(B kron A + damping I)^{-1}`` exactly through the
  factors' eigendecompositions, without forming the block.

Checked in float64 against the dense GGN ``J^T H J`` built from full Jacobians.

Run ``python examples/kfac_factors.py`` (``--small`` or ``BEYONDGRAD_EXAMPLES_SMALL=1`` for a
tiny run).
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


def dense_ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """The GGN ``J^T H J`` over all parameters, ``[P, P]`` (``named_parameters()`` order)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def output(theta: Tensor) -> Tensor:
        tensors, i = {}, 0
        for k, v in params.items():
            tensors[k] = theta[i : i + v.numel()].view(v.shape)
            i += v.numel()
        return functional_call(model, tensors, (X,))

    theta = torch.cat([v.flatten() for v in params.values()])
    J = jacrev(output)(theta).flatten(0, -2)  # [N*C, P]
    f = output(theta).detach()
    H_out = hessian(lambda o: loss_fn(o, y))(f).flatten(0, 1).flatten(1)
    return J.T @ H_out @ J


def joint_indices(model: nn.Module, module_name: str) -> Tensor:
    """Indices of ``[W | b]`` (row-major ``[O, I + 1]``) in the flat parameter vector."""
    offsets, i = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(i, i + p.numel()).view(p.shape)
        i += p.numel()
    w, b = offsets[f"{module_name}.weight"], offsets[f"{module_name}.bias"]
    return torch.cat([w, b[:, None]], dim=1).flatten()


def main() -> None:
    """Compute KFAC, compare with the GGN blocks, apply a damped inverse."""
    args = parse_args()
    N, D, H, C = (4, 4, 5, 3) if args.small else (64, 10, 32, 5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, C)).double()
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(N, D, dtype=torch.float64), torch.randint(0, C, (N,))
    kfac = bg.KFAC(fisher_type="type-2", kfac_approx="expand")

    # one sample: KFAC is the exact GGN block
    one = bg.compute(model, loss_fn, X[:1], y[:1], kfac)[bg.KFAC]
    G1 = dense_ggn(model, loss_fn, X[:1], y[:1])
    for name, factors in one.items():
        idx = joint_indices(model, name)
        err = (factors.to_dense() - G1[idx][:, idx]).abs().max().item()
        print(
            f"layer {name}: A {tuple(factors.A.shape)}, B {tuple(factors.B.shape)}, "
            f"{factors.order}; N=1 max |KFAC - GGN block| = {err:.1e}"
        )
        assert err < 1e-10

    # a batch: an approximation; the damped inverse is exact for the Kronecker block
    res = bg.compute(model, loss_fn, X, y, kfac)[bg.KFAC]
    G = dense_ggn(model, loss_fn, X, y)
    damping = 1e-2
    for name, factors in res.items():
        idx = joint_indices(model, name)
        block, dense = factors.to_dense(), G[idx][:, idx]
        rel = ((block - dense).norm() / dense.norm()).item()
        v = torch.randn(block.shape[0], dtype=torch.float64)
        x = factors.inverse(damping)(v)
        ref = torch.linalg.solve(block + damping * torch.eye(len(v), dtype=v.dtype), v)
        print(
            f"layer {name}: N={N} relative distance to the GGN block {rel:.3f}; "
            f"inverse max error {(x - ref).abs().max():.1e}"
        )
        assert torch.allclose(x, ref, atol=1e-8, rtol=1e-8)
    print("OK: one-sample KFAC equals the GGN block and the damped inverse is exact")


if __name__ == "__main__":
    main()
