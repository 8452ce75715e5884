"""Brute-force float64 GGN references: full Jacobians of the model output w.r.t. all parameters
and the loss Hessian w.r.t. the output, ``GGN = J^T (d2L/df2) J``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev

from .first_order import call


def _flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return names, shapes, flat


def _unflatten(names, shapes, flat) -> dict[str, Tensor]:
    out, start = {}, 0
    for n, s in zip(names, shapes):
        size = s.numel()
        out[n] = flat[start : start + size].view(s)
        start += size
    return out


def split(names, shapes, vec: Tensor) -> dict[str, Tensor]:
    """Split the last axis of ``vec`` into parameter-shaped blocks."""
    out, start = {}, 0
    for n, s in zip(names, shapes):
        size = s.numel()
        out[n] = vec[..., start : start + size].reshape(*vec.shape[:-1], *s)
        start += size
    return out


def ggn(model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor) -> dict[str, Any]:
    """``full`` [P, P], ``per_sample`` [N, P, P], ``J`` [N, K, P], ``H`` [N, K, K] and helpers."""
    names, shapes, flat = _flat_params(model)

    def f(theta: Tensor) -> Tensor:
        return call(model, _unflatten(names, shapes, theta), X)

    out = f(flat).detach()
    N = out.shape[0]
    K = out[0].numel()
    J = jacrev(f)(flat).reshape(N, K, -1)
    H = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(N, K, N, K)
    H_blocks = torch.stack([H[n, :, n] for n in range(N)])
    per_sample = torch.einsum("nkp,nkl,nlq->npq", J, H_blocks, J)
    return {
        "names": names,
        "shapes": shapes,
        "full": per_sample.sum(0),
        "per_sample": per_sample,
        "J": J,
        "H": H_blocks,
    }


def diag_ggn(ref: dict[str, Any]) -> dict[str, Tensor]:
    return split(ref["names"], ref["shapes"], torch.diagonal(ref["full"]))


def batch_diag_ggn(ref: dict[str, Any]) -> dict[str, Tensor]:
    return split(ref["names"], ref["shapes"], torch.diagonal(ref["per_sample"], dim1=1, dim2=2))
