"""Convolutions as einsum expressions over index patterns, for any number of spatial dimensions
and any ``groups``.

Along each spatial dimension ``j`` a convolution contracts the input index ``i_j`` with the
pattern ``Pi_j[k_j, o_j, i_j]`` (``beyondgrad.conv.patterns``). With ``x`` viewed as
``[N, G, C_in/G, *I]`` and ``W`` as ``[G, C_out/G, C_in/G, *K]``::

    forward       y[n,g,f,o..]    = sum x[n,g,c,i..] Pi[k,o,i].. W[g,f,c,k..]
    input VJP     dx[n,g,c,i..]   = sum dy[n,g,f,o..] Pi[k,o,i].. W[g,f,c,k..]
    weight VJP    dW[(n,)g,f,c,k..] = sum x[n,g,c,i..] dy[n,g,f,o..] Pi[k,o,i]..
    unfold        U[n,c,k..,o..]  = sum x[n,c,i..] Pi[k,o,i]..
    KFAC-expand   A[g,(c,k),(c',k')] = sum_{n,o} U[n,g,c,k,o] U[n,g,c',k',o]
    KFAC-reduce   A[g,(c,k),(c',k')] = sum_n u[n,g,c,k] u[n,g,c',k'],  u = mean_o U

In KFAC-reduce the pattern is summed over ``o`` before it meets ``x`` (``[K, O, I] -> [K, I]``),
so the unfolded input is never formed. Dimensions with a trivial pattern (no padding, dilation
1, stride >= kernel size, e.g. patchify convolutions ``K == S`` and 1x1 kernels) are simplified
to a reshape of ``x`` (``I -> (O, S)``, first ``K`` taps) and contribute no pattern operand,
so such convolutions cost a plain matrix product.

Each ``*_expression`` returns an ``Expression`` (equation, operands, and a reshape to the
documented output layout); the functions without the suffix evaluate it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .patterns import Padding, _pair_padding, as_paddings, as_tuple, conv_output_size, index_pattern

# subscripts: n sample, g group, c / C input channel (two copies), f output channel; spatial
# letters (kernel k, output o, input i per dimension) come from this pool
_POOL = "abdehjlmpqrstuvwxyzABDEHJLMPQRSTUVWXYZ"

__all__ = [
    "Expression",
    "averaged_patches",
    "forward",
    "forward_expression",
    "input_vjp",
    "input_vjp_expression",
    "kfac_expand",
    "kfac_expand_expression",
    "kfac_reduce",
    "kfac_reduce_expression",
    "unfold_expression",
    "weight_vjp",
    "weight_vjp_expression",
]


@dataclass
class Expression:
    """An einsum to evaluate: ``post(torch.einsum(equation, *operands))``.

    Calling the object evaluates it.

    Args:
        equation: The einsum equation.
        operands: Its operands (input, index patterns, weight or output gradient).
        post: A reshape/scatter to the documented output layout (default: identity).
    """

    equation: str
    operands: tuple[Tensor, ...]
    post: Callable[[Tensor], Tensor] = field(default=lambda t: t)

    def __call__(self) -> Tensor:
        """Evaluate the einsum and apply ``post``."""
        return self.post(torch.einsum(self.equation, *self.operands))


@dataclass(frozen=True)
class _Dim:
    I: int
    K: int
    S: int
    left: int
    right: int
    D: int
    O: int

    @property
    def trivial(self) -> bool:
        return self.left == 0 and self.right == 0 and self.D == 1 and self.S >= self.K


def _dims(
    input_sizes: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: Padding | Sequence[int],
    dilation: int | Sequence[int],
) -> list[_Dim]:
    d = len(input_sizes)
    K = as_tuple(kernel_size, d, "kernel_size")
    S = as_tuple(stride, d, "stride")
    D = as_tuple(dilation, d, "dilation")
    P = as_paddings(padding, d)
    out = []
    for j in range(d):
        left, right = _pair_padding(P[j], K[j], D[j])
        O = conv_output_size(input_sizes[j], K[j], S[j], (left, right), D[j])
        out.append(_Dim(input_sizes[j], K[j], S[j], left, right, D[j], O))
    return out


def _letters(d: int, count: int) -> list[str]:
    """``count`` disjoint groups of ``d`` spatial subscripts."""
    if count * d > len(_POOL):
        raise ValueError(f"too many spatial dimensions ({d})")
    return [_POOL[j * d : (j + 1) * d] for j in range(count)]


def _spatial_side(
    x: Tensor,
    first: int,
    dims: list[_Dim],
    k: str,
    o: str,
    i: str,
    simplify: bool,
    reduce_o: bool = False,
) -> tuple[Tensor, str, list[tuple[str, Tensor]]]:
    """Rewrite ``x``'s spatial axes (from axis ``first``) for the contraction with the patterns.

    Returns the (possibly reshaped) tensor, its spatial subscripts, and the pattern operands
    ``(subscripts, tensor)``. Trivial dimensions become ``(o_j, k_j)`` axes of ``x``; others keep
    an input index and get a pattern ``Pi[k, o, i]`` (or ``sum_o Pi`` as ``[k, i]`` when
    ``reduce_o``).
    """
    subs = ""
    patterns: list[tuple[str, Tensor]] = []
    axis = first
    for j, dim in enumerate(dims):
        if simplify and dim.trivial:
            length = dim.O * dim.S
            if x.shape[axis] < length:
                pad = [0, 0] * (x.ndim - axis - 1) + [0, length - x.shape[axis]]
                x = F.pad(x, pad)
            x = x.narrow(axis, 0, length).unflatten(axis, (dim.O, dim.S)).narrow(axis + 1, 0, dim.K)
            subs += o[j] + k[j]
            axis += 2
            continue
        pi = index_pattern(
            dim.I, dim.K, dim.S, (dim.left, dim.right), dim.D, device=x.device, dtype=x.dtype
        )
        if reduce_o:
            patterns.append((k[j] + i[j], pi.sum(1)))
        else:
            patterns.append((k[j] + o[j] + i[j], pi))
        subs += i[j]
        axis += 1
    return x, subs, patterns


def _groups(channels: int, groups: int, what: str) -> int:
    if groups < 1 or channels % groups:
        raise ValueError(f"{what} channels ({channels}) must be divisible by groups ({groups})")
    return channels // groups


def forward_expression(
    x: Tensor,
    weight: Tensor,
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    simplify: bool = True,
) -> Expression:
    """A convolution without bias, as ``F.conv{d}d(x, weight, ...)``.

    Args:
        x: Input ``[N, C_in, *I]``.
        weight: Kernel ``[C_out, C_in / groups, *K]``.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        groups: Number of channel groups (divides both channel counts).
        simplify: Turn dimensions with a trivial pattern (no padding, dilation 1,
            ``stride >= kernel_size``) into a reshape of ``x`` instead of a pattern operand.

    Returns:
        An ``Expression`` whose value is the output ``[N, C_out, *O]``.
    """
    d = x.ndim - 2
    N, C = x.shape[:2]
    Cg = _groups(C, groups, "input")
    F_out = weight.shape[0]
    Fg = _groups(F_out, groups, "output")
    dims = _dims(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    k, o, i = _letters(d, 3)
    xg = x.reshape(N, groups, Cg, *x.shape[2:])
    xs, subs, pats = _spatial_side(xg, 3, dims, k, o, i, simplify)
    wg = weight.reshape(groups, Fg, Cg, *weight.shape[2:])
    eq = ",".join(["ngc" + subs, *(s for s, _ in pats), "gfc" + k]) + "->ngf" + o
    out_shape = (N, F_out, *(dim.O for dim in dims))
    return Expression(eq, (xs, *(p for _, p in pats), wg), lambda t: t.reshape(out_shape))


def weight_vjp_expression(
    x: Tensor,
    grad_output: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    per_sample: bool = False,
    simplify: bool = True,
) -> Expression:
    """The weight VJP: the gradient of ``<grad_output, conv(x, W)>`` with respect to ``W``.

    Args:
        x: Input ``[N, C_in, *I]``.
        grad_output: Gradient of the output ``[N, C_out, *O]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        groups: Number of channel groups (divides both channel counts).
        per_sample: Keep one gradient per sample (no sum over ``n``).
        simplify: Turn dimensions with a trivial pattern (no padding, dilation 1,
            ``stride >= kernel_size``) into a reshape of ``x`` instead of a pattern operand.

    Returns:
        An ``Expression`` whose value is ``[C_out, C_in / groups, *K]``, or
        ``[N, C_out, C_in / groups, *K]`` with ``per_sample``.
    """
    d = x.ndim - 2
    N, C = x.shape[:2]
    Cg = _groups(C, groups, "input")
    F_out = grad_output.shape[1]
    Fg = _groups(F_out, groups, "output")
    dims = _dims(x.shape[2:], kernel_size, stride, padding, dilation)
    k, o, i = _letters(d, 3)
    xs, subs, pats = _spatial_side(
        x.reshape(N, groups, Cg, *x.shape[2:]), 3, dims, k, o, i, simplify
    )
    gg = grad_output.reshape(N, groups, Fg, *grad_output.shape[2:])
    lhs = "n" if per_sample else ""
    eq = ",".join(["ngc" + subs, *(s for s, _ in pats), "ngf" + o]) + f"->{lhs}gfc" + k
    shape = ((N,) if per_sample else ()) + (F_out, Cg, *(dim.K for dim in dims))
    return Expression(eq, (xs, *(p for _, p in pats), gg), lambda t: t.reshape(shape))


def _unfold_trivial_dims(t: Tensor, dims: Sequence[Any], simplify: bool) -> Tensor:
    """For each trivial dimension (from axis 3 on) turn ``[.., O, K]`` into ``[.., I]``: pad
    ``K`` to the stride, flatten ``O * S`` and cut or zero-pad it to the input length ``I``."""
    axis = 3
    for dim in dims:
        if simplify and dim.trivial:
            t = F.pad(t, [0, 0] * (t.ndim - axis - 2) + [0, dim.S - dim.K]).flatten(axis, axis + 1)
            length = t.shape[axis]
            if length >= dim.I:
                t = t.narrow(axis, 0, dim.I)
            else:
                t = F.pad(t, [0, 0] * (t.ndim - axis - 1) + [0, dim.I - length])
        axis += 1
    return t


def input_vjp_expression(
    grad_output: Tensor,
    weight: Tensor,
    input_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    simplify: bool = True,
) -> Expression:
    """The input VJP: the gradient of ``<grad_output, conv(x, W)>`` with respect to ``x``.

    Args:
        grad_output: Gradient of the output ``[N, C_out, *O]``.
        weight: Kernel ``[C_out, C_in / groups, *K]``.
        input_size: Spatial input size ``I`` (several inputs sizes give the same ``O``).
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        groups: Number of channel groups (divides both channel counts).
        simplify: Turn dimensions with a trivial pattern (no padding, dilation 1,
            ``stride >= kernel_size``) into a reshape of ``x`` instead of a pattern operand.

    Returns:
        An ``Expression`` whose value is ``[N, C_in, *input_size]``.
    """
    d = grad_output.ndim - 2
    N, F_out = grad_output.shape[:2]
    Fg = _groups(F_out, groups, "output")
    Cg = weight.shape[1]
    dims = _dims(tuple(input_size), weight.shape[2:], stride, padding, dilation)
    k, o, i = _letters(d, 3)
    gg = grad_output.reshape(N, groups, Fg, *grad_output.shape[2:])
    wg = weight.reshape(groups, Fg, Cg, *weight.shape[2:])
    subs, pats = "", []
    for j, dim in enumerate(dims):
        if simplify and dim.trivial:
            subs += o[j] + k[j]
            continue
        pi = index_pattern(
            dim.I, dim.K, dim.S, (dim.left, dim.right), dim.D, device=gg.device, dtype=gg.dtype
        )
        pats.append((k[j] + o[j] + i[j], pi))
        subs += i[j]
    eq = ",".join(["ngf" + o, *(s for s, _ in pats), "gfc" + k]) + "->ngc" + subs

    def post(t: Tensor) -> Tensor:
        return _unfold_trivial_dims(t, dims, simplify).reshape(N, groups * Cg, *input_size)

    return Expression(eq, (gg, *(p for _, p in pats), wg), post)


def unfold_expression(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    simplify: bool = True,
) -> Expression:
    """im2col as an einsum (the same values as ``beyondgrad.conv.unfold``).

    Args:
        x: Input ``[N, C, *I]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        simplify: Turn dimensions with a trivial pattern (no padding, dilation 1,
            ``stride >= kernel_size``) into a reshape of ``x`` instead of a pattern operand.

    Returns:
        An ``Expression`` whose value is ``[N, C * prod(K), prod(O)]`` (the layout of
        ``F.unfold``).
    """
    d = x.ndim - 2
    N, C = x.shape[:2]
    dims = _dims(x.shape[2:], kernel_size, stride, padding, dilation)
    k, o, i = _letters(d, 3)
    xs, subs, pats = _spatial_side(x, 2, dims, k, o, i, simplify)
    eq = ",".join(["nc" + subs, *(s for s, _ in pats)]) + "->nc" + k + o
    shape = (N, C * math.prod(dim.K for dim in dims), math.prod(dim.O for dim in dims))
    return Expression(eq, (xs, *(p for _, p in pats)), lambda t: t.reshape(shape))


def _kfac_expression(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: Padding | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    reduce: bool,
    simplify: bool,
) -> Expression:
    d = x.ndim - 2
    N, C = x.shape[:2]
    Cg = _groups(C, groups, "input")
    dims = _dims(x.shape[2:], kernel_size, stride, padding, dilation)
    # two copies of the input side, (c, k1, i1) and (C, k2, i2); they share the output
    # subscripts o (expand) or sum over them separately (reduce)
    k1, k2, o1, o2, i1, i2 = _letters(d, 6)
    if not reduce:
        o2 = o1
    xg = x.reshape(N, groups, Cg, *x.shape[2:])
    ops: list[Tensor] = []
    terms: list[str] = []
    for kk, oo, ii, ch in ((k1, o1, i1, "c"), (k2, o2, i2, "C")):
        xs, subs, pats = _spatial_side(xg, 3, dims, kk, oo, ii, simplify, reduce_o=reduce)
        ops.append(xs)
        terms.append("ng" + ch + subs)
        ops += [p for _, p in pats]
        terms += [t for t, _ in pats]
    eq = ",".join(terms) + "->gc" + k1 + "C" + k2
    side = Cg * math.prod(dim.K for dim in dims)
    scale = 1.0 / math.prod(dim.O for dim in dims) ** 2 if reduce else 1.0
    return Expression(eq, tuple(ops), lambda t: (t * scale).reshape(groups, side, side))


def kfac_expand_expression(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    simplify: bool = True,
) -> Expression:
    """The KFAC-expand input factor ``sum_{n,o} U_no U_no^T`` per group, unscaled.

    ``U`` is the unfolded input, rows ordered like the flattened weight.

    Args:
        x: Input ``[N, C_in, *I]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        groups: Number of channel groups (divides both channel counts).
        simplify: Turn dimensions with a trivial pattern (no padding, dilation 1,
            ``stride >= kernel_size``) into a reshape of ``x`` instead of a pattern operand.

    Returns:
        An ``Expression`` whose value is ``[G, C_in/G * prod(K), C_in/G * prod(K)]``.
    """
    return _kfac_expression(x, kernel_size, stride, padding, dilation, groups, False, simplify)


def kfac_reduce_expression(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    simplify: bool = True,
) -> Expression:
    """The KFAC-reduce input factor ``sum_n u_n u_n^T``, ``u_n = mean_o U_no``, per group.

    The unfolded input ``U`` is never formed.

    Args:
        x: Input ``[N, C_in, *I]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        groups: Number of channel groups (divides both channel counts).
        simplify: Turn dimensions with a trivial pattern (no padding, dilation 1,
            ``stride >= kernel_size``) into a reshape of ``x`` instead of a pattern operand.

    Returns:
        An ``Expression`` whose value is ``[G, C_in/G * prod(K), C_in/G * prod(K)]``.
    """
    return _kfac_expression(x, kernel_size, stride, padding, dilation, groups, True, simplify)


def forward(x: Tensor, weight: Tensor, **kwargs: object) -> Tensor:
    """Evaluate ``forward_expression``: ``conv(x, weight)`` without bias.

    Args:
        x: Input ``[N, C_in, *I]``.
        weight: Kernel ``[C_out, C_in / groups, *K]``.
        **kwargs: ``stride``, ``padding``, ``dilation``, ``groups``, ``simplify`` as in
            ``forward_expression``.

    Returns:
        The output ``[N, C_out, *O]``.
    """
    return forward_expression(x, weight, **kwargs)()  # type: ignore[arg-type]


def weight_vjp(
    x: Tensor, grad_output: Tensor, kernel_size: int | Sequence[int], **kwargs: object
) -> Tensor:
    """Evaluate ``weight_vjp_expression``: the gradient with respect to the weight.

    Args:
        x: Input ``[N, C_in, *I]``.
        grad_output: Gradient of the output ``[N, C_out, *O]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        **kwargs: ``stride``, ``padding``, ``dilation``, ``groups``, ``per_sample``,
            ``simplify`` as in ``weight_vjp_expression``.

    Returns:
        ``[C_out, C_in / groups, *K]`` (``[N, ...]`` with ``per_sample=True``).
    """
    return weight_vjp_expression(x, grad_output, kernel_size, **kwargs)()  # type: ignore[arg-type]


def input_vjp(
    grad_output: Tensor, weight: Tensor, input_size: Sequence[int], **kwargs: object
) -> Tensor:
    """Evaluate ``input_vjp_expression``: the gradient with respect to the input.

    Args:
        grad_output: Gradient of the output ``[N, C_out, *O]``.
        weight: Kernel ``[C_out, C_in / groups, *K]``.
        input_size: Spatial input size ``I``.
        **kwargs: ``stride``, ``padding``, ``dilation``, ``groups``, ``simplify`` as in
            ``input_vjp_expression``.

    Returns:
        ``[N, C_in, *input_size]``.
    """
    return input_vjp_expression(grad_output, weight, input_size, **kwargs)()  # type: ignore[arg-type]


def kfac_expand(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """The value of ``kfac_expand_expression``, ``sum_{n,o} U_no U_no^T`` per group.

    Computed as ``beyondgrad.conv.unfold`` (strided views) then one matrix product per
    group (faster than the two-copy einsum on every shape we measured).

    Args:
        x: Input ``[N, C_in, *I]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        groups: Number of channel groups (divides both channel counts).

    Returns:
        ``[G, C_in/G * prod(K), C_in/G * prod(K)]``, unscaled.
    """
    from .unfold import unfold

    N = x.shape[0]
    U = unfold(x, kernel_size, dilation, padding, stride)  # [N, C*K, O]
    U = U.reshape(N, groups, -1, U.shape[-1]).transpose(0, 1)  # [G, N, Cg*K, O]
    U = U.transpose(2, 3).reshape(groups, -1, U.shape[2])  # [G, N*O, Cg*K]
    return U.transpose(1, 2) @ U


def kfac_reduce(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> Tensor:
    """The value of ``kfac_reduce_expression``, ``sum_n u_n u_n^T`` per group.

    Computed as ``averaged_patches`` (each pattern summed over its outputs before meeting
    ``x``: the unfolded input is never formed, and ``x`` is contracted once) followed by one
    Gram matrix per group.

    Args:
        x: Input ``[N, C_in, *I]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.
        groups: Number of channel groups (divides both channel counts).

    Returns:
        ``[G, C_in/G * prod(K), C_in/G * prod(K)]`` with ``u_n = mean_o U_no``.
    """
    N = x.shape[0]
    u = averaged_patches(x, kernel_size, stride, padding, dilation).reshape(N, groups, -1)
    u = u.transpose(0, 1)  # [G, N, Cg*K]
    return u.transpose(1, 2) @ u


def averaged_patches(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """The unfolded input averaged over output positions, ``mean_o unfold(x)[:, :, o]``.

    Each index pattern is summed over its output axis before it meets ``x``, so the unfolded
    input is never formed (these are the input vectors of KFAC-reduce).

    Args:
        x: Input ``[N, C, *I]``.
        kernel_size: Kernel size ``K``: an int or one per spatial dimension.
        stride: Stride: an int or one per spatial dimension.
        padding: Zero padding: an int, one int per dimension, ``"same"`` or ``"valid"``.
        dilation: Dilation: an int or one per spatial dimension.

    Returns:
        ``[N, C * prod(K)]``.
    """
    d = x.ndim - 2
    N, _C = x.shape[:2]
    dims = _dims(x.shape[2:], kernel_size, stride, padding, dilation)
    k, o, i = _letters(d, 3)
    xs, subs, pats = _spatial_side(x, 2, dims, k, o, i, simplify=True, reduce_o=True)
    eq = ",".join(["nc" + subs, *(s for s, _ in pats)]) + "->nc" + k
    scale = 1.0 / math.prod(dim.O for dim in dims)
    return torch.einsum(eq, xs, *(p for _, p in pats)).reshape(N, -1) * scale
