"""Rules for normalization layers' affine parameters: ``LayerNorm``, ``RMSNorm``, ``GroupNorm``
and ``BatchNorm{1,2,3}d`` (evaluation mode, i.e. running statistics).

All of them compute ``z = x_hat * weight + bias`` with a normalized input ``x_hat`` that does not
depend on the affine parameters, so the per-sample gradients are ``sum g * x_hat`` and ``sum g``
over the positions that share the parameter. They are materialized directly (their size is that
of one parameter per sample, far below the layer's activations).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..forms import Form, SampleForm


def _affine_forms(
    module: nn.Module, x_hat: Tensor, g: Tensor, channel_dim: int, vectors: int
) -> dict[str, Form]:
    """Per-row forms of ``weight``/``bias`` for ``z = x_hat * w + b``; ``x_hat`` ``[N, ...]``,
    ``g`` ``[K N, ...]``.

    ``channel_dim``: ``-1`` when the parameters cover the trailing ``w.ndim`` axes (LayerNorm,
    RMSNorm), ``1`` when they cover axis 1 (GroupNorm, BatchNorm).
    """
    N = g.shape[0]
    forms: dict[str, Form] = {}
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    ref = weight if weight is not None else bias
    assert ref is not None
    if channel_dim == 1:
        C = g.shape[1]

        def reduce(t: Tensor) -> Tensor:
            return t.reshape(N, C, -1).sum(2)
    else:
        shape = ref.shape

        def reduce(t: Tensor) -> Tensor:
            return t.reshape(N, -1, *shape).sum(1)

    if isinstance(weight, nn.Parameter) and weight.requires_grad:
        product = (g.view(vectors, -1, *g.shape[1:]) * x_hat).view(g.shape)
        forms["weight"] = SampleForm(reduce(product), vectors)
    if isinstance(bias, nn.Parameter) and bias.requires_grad:
        forms["bias"] = SampleForm(reduce(g), vectors)
    return forms


def layer_norm_forms(
    module: nn.LayerNorm, x: Tensor, g: Tensor, vectors: int = 1
) -> dict[str, Form]:
    x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine_forms(module, x_hat, g, -1, vectors)


def rms_norm_forms(module: nn.Module, x: Tensor, g: Tensor, vectors: int = 1) -> dict[str, Form]:
    x_hat = F.rms_norm(x, module.normalized_shape, None, module.eps)  # type: ignore[arg-type]
    return _affine_forms(module, x_hat, g, -1, vectors)


def group_norm_forms(
    module: nn.GroupNorm, x: Tensor, g: Tensor, vectors: int = 1
) -> dict[str, Form]:
    x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine_forms(module, x_hat, g, 1, vectors)


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a batch-norm layer normalizes with the statistics of the current batch (which
    couples the samples of a batch)."""
    return module.training or module.running_mean is None  # type: ignore[union-attr]


def batch_norm_forms(
    module: nn.modules.batchnorm._BatchNorm, x: Tensor, g: Tensor, vectors: int = 1
) -> dict[str, Form]:
    if uses_batch_statistics(module):
        # Only the summed gradient is requested here (the engine rejects per-sample
        # quantities); with batch statistics, x_hat uses the mean/variance of this batch.
        x_hat = F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
    else:
        x_hat = F.batch_norm(
            x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps
        )
    return _affine_forms(module, x_hat, g, 1, vectors)
