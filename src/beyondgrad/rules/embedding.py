"""Rule for ``nn.Embedding``: indices ``[N, *]``, every axis after the sample axis is shared.

Rows at ``padding_idx`` receive no gradient (as in ``F.embedding``); ``scale_grad_by_freq``
couples the samples of a batch and is rejected for per-sample quantities by the engine."""

from __future__ import annotations

from torch import Tensor, nn

from ..forms import Form, ScatterForm


def embedding_forms(
    module: nn.Embedding, x: Tensor, g: Tensor, vectors: int = 1
) -> dict[str, Form]:
    """``x``: indices ``[N, *]``; ``g``: ``[K N, *, d]`` (K vectors, vector-major)."""
    if not module.weight.requires_grad:
        return {}
    N = x.shape[0]
    index = x.reshape(N, -1)
    G = g.reshape(vectors, N, index.shape[1], module.embedding_dim)
    if module.padding_idx is not None:
        G = G * (index != module.padding_idx).unsqueeze(-1).to(G.dtype)
    if module.scale_grad_by_freq:  # F.embedding divides by the index counts of the call
        counts = index.reshape(-1).bincount(minlength=module.num_embeddings)
        G = G / counts[index].unsqueeze(-1).to(G.dtype)
    G = G.reshape(vectors * N, index.shape[1], module.embedding_dim)
    return {"weight": ScatterForm(index, G, module.num_embeddings, vectors)}
