"""im2col for any number of spatial dimensions: ``unfold``, ``unfold_transpose`` and ``fold``.

``unfold(x)`` for ``x`` of shape ``[N, C, I_1, ..., I_d]`` returns ``[N, C * prod(K), prod(O)]``
(channel-major, then kernel taps in row-major order: the layout of ``F.unfold``) such that a
convolution is ``conv(x, W) = W.reshape(C_out, -1) @ unfold(x)``. It is built from strided
views of the padded input (``Tensor.unfold``), so only the final reshape copies memory.

``unfold_transpose(x)`` is the same for a transposed convolution:
``conv_transpose(x, W)[c_out, o] = sum_{c_in, k} W[c_in, c_out, k] U[c_in, k, o]``.

``fold`` is the adjoint of ``unfold`` (col2im: overlapping patches are summed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..buffers import contiguous
from .patterns import Padding, _pair_padding, as_paddings, as_tuple, conv_transpose_output_size


def _spatial_dims(x: Tensor, name: str) -> int:
    if x.ndim < 3:
        raise ValueError(
            f"{name}: expected input [N, C, *spatial] with >= 1 spatial dim, got {tuple(x.shape)}"
        )
    return x.ndim - 2


def _pad_widths(
    kernel: tuple[int, ...], dilation: tuple[int, ...], padding: Sequence[Padding]
) -> list[int]:
    """``F.pad`` widths (last dimension first) for per-dimension paddings."""
    widths: list[int] = []
    for k, d, p in reversed(list(zip(kernel, dilation, padding))):
        widths += list(_pair_padding(p, k, d))
    return widths


def _patches(
    x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
) -> Tensor:
    """``[N, C, O_1..O_d, K_1..K_d]`` strided view of an already padded input."""
    d = len(kernel)
    u = x
    for j in range(d):
        span = dilation[j] * (kernel[j] - 1) + 1
        if x.shape[2 + j] < span:
            raise ValueError(
                f"kernel {kernel} with dilation {dilation} does not fit the padded input "
                f"{tuple(x.shape[2:])}"
            )
        u = u.unfold(2 + j, span, stride[j])[..., :: dilation[j]]
    return u


def _to_columns(u: Tensor, d: int) -> Tensor:
    """The one copy: ``[N, C, O.., K..]`` patches to columns ``[N, C prod(K), prod(O)]`` (into
    a pooled buffer inside :func:`beyondgrad.buffers.pooled`)."""
    N, C = u.shape[:2]
    out_sizes, taps = u.shape[2 : 2 + d], u.shape[2 + d :]
    u = contiguous(u.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d)))
    return u.view(N, C * math.prod(taps), math.prod(out_sizes))


def unfold(
    x: Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    stride: int | Sequence[int] = 1,
) -> Tensor:
    """im2col for a convolution with ``d >= 1`` spatial dimensions (see the module docstring).

    Rows are channel-major, then kernel taps in row-major order (the layout of ``F.unfold``), so
    ``conv(x, W) == W.reshape(C_out, -1) @ unfold(x)``. In 2-d the result equals
    ``torch.nn.functional.unfold``.

    Args:
        x: Input ``[N, C, I_1, ..., I_d]``.
        kernel_size: Kernel size ``K``: an int or one int per spatial dimension.
        dilation: Dilation: an int or one per dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` (stride 1 only) or
            ``"valid"``.
        stride: Stride: an int or one per dimension.

    Returns:
        The columns ``[N, C * prod(K), prod(O)]`` with ``O`` the convolution's output sizes
        (``beyondgrad.conv.conv_output_size``).

    Raises:
        ValueError: If ``x`` has no spatial dimension, a per-dimension argument has the wrong
            length, ``"same"`` is combined with a stride, or the kernel does not fit.
    """
    d = _spatial_dims(x, "unfold")
    kernel = as_tuple(kernel_size, d, "kernel_size")
    dil = as_tuple(dilation, d, "dilation")
    st = as_tuple(stride, d, "stride")
    pads = as_paddings(padding, d)
    if any(isinstance(p, str) and p == "same" for p in pads) and any(s != 1 for s in st):
        raise ValueError("padding='same' needs stride 1 (as in PyTorch)")
    widths = _pad_widths(kernel, dil, pads)
    if any(widths):
        x = F.pad(x, widths)
    return _to_columns(_patches(x, kernel, dil, st), d)


def unfold_transpose(
    x: Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    stride: int | Sequence[int] = 1,
    output_padding: int | Sequence[int] = 0,
) -> Tensor:
    """im2col for a transposed convolution (see the module docstring).

    A transposed convolution is a stride-1 convolution of the input with ``stride - 1`` zeros
    inserted between entries, padded by ``d (K - 1) - p`` (plus ``output_padding`` on the right),
    with the kernel flipped; negative paddings crop. With ``U = unfold_transpose(x)``,
    ``conv_transpose(x, W)[n, c_out, o] = sum_{c_in, k} W[c_in, c_out, k] U[n, (c_in, k), o]``.

    Args:
        x: Input ``[N, C, I_1, ..., I_d]``.
        kernel_size: Kernel size ``K``: an int or one int per spatial dimension.
        dilation: Dilation ``d``: an int or one per dimension.
        padding: Padding ``p`` of the transposed convolution: an int or one per dimension.
        stride: Stride ``s``: an int or one per dimension.
        output_padding: Extra output length on the right: an int or one per dimension.

    Returns:
        The columns ``[N, C * prod(K), prod(O_t)]`` with ``O_t`` the transposed convolution's
        output sizes (``beyondgrad.conv.conv_transpose_output_size``).

    Raises:
        ValueError: If ``x`` has no spatial dimension or a size or hyper-parameter is invalid.
    """
    d = _spatial_dims(x, "unfold_transpose")
    kernel = as_tuple(kernel_size, d, "kernel_size")
    dil = as_tuple(dilation, d, "dilation")
    st = as_tuple(stride, d, "stride")
    pad = as_tuple(padding, d, "padding")
    out_pad = as_tuple(output_padding, d, "output_padding")
    for j in range(d):  # validates sizes and output_padding
        conv_transpose_output_size(x.shape[2 + j], kernel[j], st[j], pad[j], dil[j], out_pad[j])
    if any(s > 1 for s in st):
        N, C = x.shape[:2]
        sizes = [(i - 1) * s + 1 for i, s in zip(x.shape[2:], st)]
        spread = x.new_zeros(N, C, *sizes)
        spread[(slice(None), slice(None), *(slice(None, None, s) for s in st))] = x
        x = spread
    widths: list[int] = []
    for k, dl, p, op in reversed(list(zip(kernel, dil, pad, out_pad))):
        edge = dl * (k - 1) - p
        widths += [edge, edge + op]
    if any(widths):
        x = F.pad(x, widths)
    u = _patches(x, kernel, dil, (1,) * d)
    u = u.flip(list(range(2 + d, 2 + 2 * d)))
    return _to_columns(u, d)


def fold(
    columns: Tensor,
    output_size: int | Sequence[int],
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    stride: int | Sequence[int] = 1,
) -> Tensor:
    """col2im, the adjoint of ``unfold`` (overlapping patch entries are summed).

    In 2-d it equals ``torch.nn.functional.fold``.

    Args:
        columns: Columns ``[N, C * prod(K), prod(O)]`` laid out as ``unfold`` returns them.
        output_size: Spatial size ``I_1, ..., I_d`` of the image to rebuild (an int for 1-d).
        kernel_size: Kernel size ``K``: an int or one int per spatial dimension.
        dilation: Dilation: an int or one per dimension.
        padding: Zero padding as in ``unfold``.
        stride: Stride: an int or one per dimension.

    Returns:
        The image ``[N, C, *output_size]``.

    Raises:
        ValueError: If ``columns`` is not 3-d or its shape does not match the arguments.
    """
    if columns.ndim != 3:
        raise ValueError(f"fold: expected columns [N, C * prod(K), L], got {tuple(columns.shape)}")
    sizes = (output_size,) if isinstance(output_size, int) else tuple(output_size)
    d = len(sizes)
    kernel = as_tuple(kernel_size, d, "kernel_size")
    taps = math.prod(kernel)
    if columns.shape[1] % taps:
        raise ValueError(f"fold: {columns.shape[1]} rows are not a multiple of prod(K) = {taps}")
    N, C = columns.shape[0], columns.shape[1] // taps
    template = columns.new_zeros(N, C, *sizes)
    expected = unfold(template, kernel, dilation, padding, stride).shape
    if tuple(expected) != tuple(columns.shape):
        raise ValueError(f"fold: columns {tuple(columns.shape)} do not match {tuple(expected)}")
    _, adjoint = torch.func.vjp(lambda t: unfold(t, kernel, dilation, padding, stride), template)
    return adjoint(columns)[0]
