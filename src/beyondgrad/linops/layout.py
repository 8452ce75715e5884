"""Vectors in the parameters' layout: per-parameter tensors instead of one flat vector.

``A @ [t_1, ..., t_p]`` (in the operator's ``names`` order), ``A @ (t_1, ..., t_p)`` or
``A @ {name: t}``: each ``t`` has its parameter's shape (one vector) or ``[k, *shape]`` (a block
of ``k``, leading like ``vmap``'s and ``autograd.grad(is_grads_batched=True)``'s); the product
comes back in the same kind of container (a list, a plain tuple, a dict) and layout, in the
operator's dtype and on its device (where the vectors must be). :func:`parameter_block` checks
and normalizes the input, :func:`in_layout_of` packs the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import columns_first

ParameterVectors = Sequence[Tensor] | Mapping[str, Tensor]


def is_parameter_layout(other: Any) -> bool:
    """Whether ``other`` is a container of per-parameter tensors (list, tuple or dict)."""
    return isinstance(other, (list, tuple, Mapping))


def parameter_block(
    other: ParameterVectors,
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[list[Tensor], bool]:
    """Per parameter ``[k, *shape]`` blocks (``dtype``, contiguous) of vectors in the
    parameters' layout.

    Args:
        other: a list or tuple (in ``names`` order) or a dict keyed by ``names``.
        names: the operator's parameter names.
        shapes: their shapes.
        dtype: the operator's dtype (the tensors are cast to it).
        device: the operator's device.

    Returns:
        The blocks, and whether ``other`` held single vectors (``k = 1``).

    Raises:
        KeyError: a dict whose keys are not ``names``.
        TypeError: an entry that is not a tensor.
        ValueError: a wrong number of tensors, or a tensor of the wrong shape or device (the
            vectors must be on the operator's device; they are cast to its dtype).
    """
    if isinstance(other, Mapping):
        if set(other) != set(names):
            raise KeyError(
                "a product in the parameters' layout needs one tensor per parameter name: "
                f"missing {sorted(set(names) - set(other))}, "
                f"unknown {sorted(set(other) - set(names))}"
            )
        values = [other[n] for n in names]
    else:
        values = list(other)
        if len(values) != len(names):
            raise ValueError(
                f"expected {len(names)} tensors (one per parameter, in the order of "
                f"{list(names[:3])}...), got {len(values)}"
            )
    if not all(isinstance(v, Tensor) for v in values):
        raise TypeError("a product in the parameters' layout takes tensors only")
    single = values[0].ndim == len(shapes[0])
    k = 1 if single else int(values[0].shape[0])
    blocks = []
    for name, shape, v in zip(names, shapes, values):
        want = tuple(shape) if single else (k, *shape)
        if tuple(v.shape) != want or v.device != device:
            raise ValueError(
                f"{name}: expected a tensor of shape {want} on {device} (the parameter's "
                f"shape{'' if single else ', after the k vectors'}), got {tuple(v.shape)} on "
                f"{v.device}"
            )
        v = v.to(dtype).contiguous()
        blocks.append(v.unsqueeze(0) if single else v)
    return blocks, single


def in_layout_of(
    other: ParameterVectors, names: Sequence[str], out: list[Tensor], single: bool
) -> Any:
    """The per-parameter results ``out`` (``[k, *shape]`` each) in ``other``'s container and
    layout (``[*shape]`` each where ``other`` held single vectors)."""
    out = [t[0] for t in out] if single else out
    if isinstance(other, Mapping):
        return dict(zip(names, out))
    return tuple(out) if isinstance(other, tuple) else out


def flat_block(blocks: list[Tensor]) -> Tensor:
    """Per parameter ``[k, *shape]`` blocks as one column-major ``[P, k]`` block (one copy)."""
    k = blocks[0].shape[0]
    return torch.cat([b.reshape(k, -1) for b in blocks], 1).T


def split_block(M: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """A ``[P, k]`` block (any strides) as per parameter contiguous ``[k, *shape]`` tensors:
    views where ``M`` is column-major, else transposing copies in cache-sized blocks
    (:func:`~beyondgrad.linops.base.columns_first`)."""
    k = M.shape[1]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [columns_first(b).view(k, *s) for b, s in zip(torch.split(M, sizes, 0), shapes)]


__all__ = [
    "ParameterVectors",
    "flat_block",
    "in_layout_of",
    "is_parameter_layout",
    "parameter_block",
    "split_block",
]
