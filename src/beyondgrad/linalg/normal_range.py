"""Keeping products of small factors out of the subnormal range.

A Kronecker factor can be tiny: the output-gradient factor of a confident classifier's last
layer (softmax probabilities of ``1e-20`` and below: the MC Fisher of the benchmarks' transformer
head has its largest entry at ``6e-23``, a third of its entries subnormal in float32). Products
with such factors (``L X R^T``) then run through numbers below the dtype's smallest normal one
(float32 / bfloat16: ``1.2e-38``), which x86 CPUs handle in microcode unless flush-to-zero is set
on every thread (``torch.set_flush_denormal`` sets it on the calling thread only): measured on
that head's ``[256, 256] kron [128, 128]`` block with 16 vectors, 88 ms against 2.1 ms with
factors brought into the normal range (Intel Xeon, 2 threads).

:func:`scaled_factors` brings them there: each factor divided by its largest magnitude (per
group), entries below ``sqrt(tiny / eps)`` of that set to zero (``3e-16`` in float32: a
change of at most ``n sqrt(tiny / eps)`` of the factor's norm, far below its rounding; a
product of two scaled entries and a vector's ``eps`` stays normal), the product of the scales
returned for the caller to apply once to the result (in float64 where the dtype cannot hold
it). It returns ``None``, and the factors are used as they are, where their smallest nonzero
magnitudes multiply to at least ``tiny / eps`` (products with vectors of entries from ``eps``
on stay normal), where a factor is not finite (scaling would turn an ``inf`` entry's
neighbours into NaN), and for the dtypes where scaling cannot help or is not needed: float16
(its ``sqrt(tiny / eps)`` is 0.25: the zeroed entries would matter) and float64 (its
subnormals, below ``2.2e-308``, are out of reach of curvature factors in practice: left alone
by choice).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def zeroed_below(dtype: torch.dtype) -> float:
    """``sqrt(tiny / eps)`` of ``dtype``: entries of a factor scaled to unit maximum below it
    are set to zero, so that a product of two entries and a vector's ``eps`` stays normal."""
    info = torch.finfo(dtype)
    return math.sqrt(info.tiny / info.eps)


def _magnitudes(F: Tensor) -> tuple[float, float]:
    """The smallest nonzero and the largest magnitude of ``F`` (``inf`` and 0 when it is
    zero or empty)."""
    if F.numel() == 0:
        return math.inf, 0.0
    a = F.abs()
    return float(a.masked_fill(a == 0, math.inf).amin()), float(a.amax())


def needs_scaling(*factors: Tensor) -> bool:
    """Whether products of ``factors`` (any shapes, one floating dtype) with vectors of entries
    from ``eps`` on can reach the dtype's subnormal range and scaling keeps them out: a dtype
    whose :func:`zeroed_below` is under ``eps^2`` (float32, bfloat16; not float16, and float64
    by choice), finite factors, and smallest nonzero magnitudes multiplying to less than
    ``tiny / eps``."""
    dtype = factors[0].dtype
    if dtype == torch.float64 or not dtype.is_floating_point:
        return False
    info = torch.finfo(dtype)
    if zeroed_below(dtype) >= info.eps**2:  # float16: the zeroed entries would matter
        return False
    smallest, largest = zip(*(_magnitudes(F) for F in factors))
    if not all(math.isfinite(x) for x in largest):
        return False
    return math.prod(smallest) < info.tiny / info.eps


def scaled_to_unit_max(F: Tensor) -> tuple[Tensor, Tensor]:
    """``F / s`` with ``s`` the largest magnitude per group (the leading axis of a ``[G, ...]``
    stack; 1 for a zero group) and entries below :func:`zeroed_below` of ``s`` set to zero;
    and ``s``.

    Args:
        F: ``[G, ...]`` floating, finite.

    Returns:
        The scaled factor (a new tensor like ``F``) and the scales ``[G]`` in float64.
    """
    s = F.abs().flatten(1).amax(1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    out = F / s.view(-1, *[1] * (F.ndim - 1))
    return out.masked_fill_(out.abs() < zeroed_below(F.dtype), 0), s.double()


def scaled_factors(*factors: Tensor) -> tuple[list[Tensor], Tensor] | None:
    """The factors brought into the normal range (:func:`scaled_to_unit_max`) and the product
    of their scales ``[G]`` (multiply a product of the scaled factors by it): in the factors'
    dtype where it is a normal number there, else in float64; or ``None`` where they need no
    care (:func:`needs_scaling`).

    Args:
        factors: ``[G, ...]`` stacks of one dtype and group count.
    """
    if not needs_scaling(*factors):
        return None
    pairs = [scaled_to_unit_max(F) for F in factors]
    scale = pairs[0][1]
    for _, s in pairs[1:]:
        scale = scale * s
    info = torch.finfo(factors[0].dtype)
    if bool(((scale >= info.tiny) & (scale <= info.max)).all()):  # the common case: a
        scale = scale.to(factors[0].dtype)  # multiply without casting (~1.5 ms per 800k)
    return [F for F, _ in pairs], scale
