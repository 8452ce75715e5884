"""Clipping: one scale for all preconditioned directions of a step.

With directions ``d_i`` (before the learning rate), gradients ``g_i`` and learning rates
``lr_i`` (of each parameter's group):

- ``kl_clip`` (KFAC's trust region, Ba et al. 2017): ``scale = min(1, sqrt(kl_clip /
  |sum_i lr_i^2 d_i . g_i|))``, which bounds the quadratic model of the KL change of the step;
- ``max_update_norm``: afterwards, ``scale * sqrt(sum_i lr_i^2 ||d_i||^2)`` is capped at it.

Both are global (all layers share one scale), so each costs one synchronization per step.
"""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = ["check_clip", "clip_scale"]
