"""Rule for ``nn.Linear`` with inputs ``[N, *, in]``: every axis between the sample axis and the
feature axis is a shared axis (sequence positions), summed in the per-sample gradient."""

from __future__ import annotations

from torch import Tensor, nn

from ..forms import Form, OuterForm, SampleForm


def linear_forms(module: nn.Linear, x: Tensor, g: Tensor, vectors: int = 1) -> dict[str, Form]:
    """``x``: ``[N, *, in]``; ``g``: ``[K N, *, out]`` (K backpropagated vectors, vector-major)."""
    N = x.shape[0]
    A = x.reshape(N, -1, module.in_features)
    G = g.reshape(vectors * N, -1, module.out_features)
    forms: dict[str, Form] = {}
    if module.weight.requires_grad:
        forms["weight"] = OuterForm(A, G, module.weight.shape, vectors)
    if module.bias is not None and module.bias.requires_grad:
        forms["bias"] = SampleForm(G[:, 0] if G.shape[1] == 1 else G.sum(1), vectors)
    return forms
