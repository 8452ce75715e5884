"""Rule for Hugging Face's ``Conv1D`` (GPT-1/GPT-2): a Linear layer with its weight stored
transposed, ``weight`` ``[in, out]``, ``y = x @ weight + bias``.

It is recognized by its class path (``transformers.pytorch_utils.Conv1D``) without importing
transformers; like every fast rule it serves only modules whose ``forward`` is that class's own.
The forms are the Linear ones with the weight's two axes swapped; the Kronecker statistics are
the Linear ones with ``weight_perm = (1, 0)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..forms import Form, OuterForm, PermutedForm, SampleForm
from .kronecker import KronStats, linear_kron_sums

HF_CONV1D = ("transformers.pytorch_utils.Conv1D",)
"""Class paths served by the transposed-Linear rule."""


def _sizes(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` from the weight ``[in, out]``."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    return int(weight.shape[0]), int(weight.shape[1])


def transposed_linear_forms(
    module: nn.Module, x: Tensor, g: Tensor, vectors: int = 1
) -> dict[str, Form]:
    """``x``: ``[N, *, in]``; ``g``: ``[K N, *, out]`` (K vectors, vector-major).

    Returns:
        ``{"weight": rows [in, out], "bias": rows [out]}`` for the trainable ones.
    """
    I, O = _sizes(module)
    N = x.shape[0]
    A = x.reshape(N, -1, I)
    G = g.reshape(vectors * N, -1, O)
    forms: dict[str, Form] = {}
    if module.weight.requires_grad:  # type: ignore[union-attr]
        forms["weight"] = PermutedForm(OuterForm(A, G, (O, I), vectors), (1, 0))
    bias = getattr(module, "bias", None)
    if bias is not None and bias.requires_grad:
        forms["bias"] = SampleForm(G[:, 0] if G.shape[1] == 1 else G.sum(1), vectors)
    return forms


def transposed_linear_kron(
    module: nn.Module, x: Tensor, g: Tensor, vectors: int, approx: str
) -> KronStats:
    """Linear Kronecker sums over ``[out, in]`` (``A`` on the input side, bias augmented);
    the weight is that matrix transposed (``weight_perm = (1, 0)``)."""
    I, O = _sizes(module)
    stats = linear_kron_sums(x, g, I, O, vectors, approx, module)
    stats.weight_perm = (1, 0)
    return stats
