"""Brute-force float64 references for first-order quantities.

Per-sample gradients by *parameter copies*: sample ``n`` runs through the model with its own
copy ``theta_n`` of every parameter, the outputs are concatenated and the loss is evaluated
exactly as ``loss_fn`` does (same normalization); ``dL/dtheta_n`` is then the per-sample gradient
by definition, for any model whose samples do not interact. One plain loop, no engine code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map


def slice_sample(X: Any, n: int, N: int) -> Any:
    return tree_map(
        lambda t: t[n : n + 1] if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == N else t,
        X,
    )


def call(model: nn.Module, params: dict, X: Any) -> Tensor:
    if isinstance(X, dict):
        return functional_call(model, params, (), X)
    if isinstance(X, (tuple, list)):
        return functional_call(model, params, tuple(X))
    return functional_call(model, params, (X,))


def per_sample_grads(model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor) -> dict[str, Tensor]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    N = y.shape[0]
    copies = [
        {n: p.detach().clone().requires_grad_(True) for n, p in named.items()} for _ in range(N)
    ]
    outs = [call(model, copies[n], slice_sample(X, n, N)) for n in range(N)]
    loss = loss_fn(torch.cat(outs, 0), y)
    flat = [copies[n][k] for n in range(N) for k in named]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    result = {}
    for i, k in enumerate(named):
        per = [grads[n * len(named) + i] for n in range(N)]
        result[k] = torch.stack([g if g is not None else torch.zeros_like(named[k]) for g in per])
    return result


def reference(
    model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor, index=None
) -> dict[str, dict[str, Tensor]]:
    """All first-order quantities from the per-sample gradients, keyed by quantity name."""
    bg = per_sample_grads(model, loss_fn, X, y)
    N = y.shape[0]
    c = float(N) if loss_fn.reduction == "mean" else 1.0
    full_grad = {k: v.sum(0) for k, v in bg.items()}
    if index is not None:
        bg = {k: v[index] for k, v in bg.items()}
    S = next(iter(bg.values())).shape[0]
    out: dict[str, dict[str, Tensor]] = {
        "Grad": full_grad,
        "BatchGrad": bg,
        "BatchL2": {k: v.flatten(1).pow(2).sum(1) for k, v in bg.items()},
        "BatchDot": {k: v.flatten(1) @ v.flatten(1).T for k, v in bg.items()},
        "SumGradSquared": {k: v.pow(2).sum(0) for k, v in bg.items()},
        "Variance": {k: (c * v).pow(2).mean(0) - (c * v).mean(0).pow(2) for k, v in bg.items()},
    }
    del S
    return out


def autograd_grad(model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor) -> dict[str, Tensor]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = loss_fn(call(model, {n: p for n, p in named.items()}, X), y)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(named[n])) for n, g in zip(named, grads)}
