"""Clipping: one scale for all preconditioned directions of a step.

With directions ``d_i`` (before the learning rate), gradients ``g_i`` and learning rates
``lr_i`` (of each parameter's group):

- ``kl_clip`` (KFAC's trust region, Ba et al. 2017): ``scale = min(1, sqrt(kl_clip /
  |sum_i lr_i^2 d_i . g_i|))``, which bounds the quadratic model of the KL change of the step;
- ``max_update_norm``: afterwards, ``scale * sqrt(sum_i lr_i^2 ||d_i||^2)`` is capped at it.

Both are global (all layers share one scale). :func:`clip_factor` (what the optimizers use)
computes the scale as a 0-d tensor on the parameters' device, so clipping costs no host
synchronization; :func:`clip_scale` is the same as a Python float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_clip(name: str, value: float | None) -> None:
    """Raise ``ValueError`` unless ``value`` is None or positive."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive or None, got {value}")


def clip_scale(
    directions: Sequence[tuple[Tensor, Tensor, float]],
    kl_clip: float | None,
    max_update_norm: float | None,
) -> float:
    """The common scale of the directions.

    Args:
        directions: ``(direction, gradient, lr)`` per parameter.
        kl_clip: the KL bound, or None.
        max_update_norm: the bound on ``lr * ||d||`` over all directions, or None.

    Returns:
        A scale in ``(0, 1]`` (1.0 when nothing clips or there are no directions).
    """
    scale = 1.0
    if not directions:
        return scale
    if kl_clip is not None:
        vg = float(sum((d * g).sum() * lr**2 for d, g, lr in directions))
        if vg != 0:
            scale = min(1.0, (kl_clip / abs(vg)) ** 0.5)
    if max_update_norm is not None:
        norm = scale * float(sum(d.square().sum() * lr**2 for d, _, lr in directions)) ** 0.5
        if norm > max_update_norm:
            scale *= max_update_norm / norm
    return scale


def clip_factor(
    directions: Sequence[tuple[Tensor, Tensor, float]],
    kl_clip: float | None,
    max_update_norm: float | None,
) -> Tensor | None:
    """:func:`clip_scale` as a 0-d float32 (at least) tensor, computed without a host
    synchronization (no Python branch on tensor values).

    Args:
        directions: ``(direction, gradient, lr)`` per parameter.
        kl_clip: the KL bound, or None.
        max_update_norm: the bound on ``lr * ||d||`` over all directions, or None.

    Returns:
        The scale in ``(0, 1]``, or None when no clipping is asked for or there are no
        directions (the scale is 1).
    """
    if not directions or (kl_clip is None and max_update_norm is None):
        return None
    work = torch.promote_types(directions[0][0].dtype, torch.float32)
    one = torch.ones((), dtype=work, device=directions[0][0].device)
    scale = one
    if kl_clip is not None:
        vg = torch.stack([(d * g).sum(dtype=work) * lr**2 for d, g, lr in directions]).sum()
        bound = (kl_clip / vg.abs()).sqrt()  # inf when vg == 0: no clipping
        scale = torch.minimum(one, bound)
    if max_update_norm is not None:
        sq = torch.stack([d.square().sum(dtype=work) * lr**2 for d, _, lr in directions])
        norm = scale * sq.sum().sqrt()
        scale = scale * torch.minimum(one, max_update_norm / norm)  # norm 0: inf, min 1
    return scale


__all__ = ["check_clip", "clip_factor", "clip_scale"]
