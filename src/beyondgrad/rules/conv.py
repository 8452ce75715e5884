"""Rules for ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` (any stride, padding, dilation,
groups, bias, and padding mode).

The weight gradient of sample ``n`` is ``G_n^T U_n`` per group, with ``U_n`` the unfolded
input ``[O, C_in/G * prod(K)]`` (one row per output position: the shared axis) and ``G_n`` the
output gradient ``[O, C_out/G]``, i.e. an :class:`~beyondgrad.forms.OuterForm`; the form
chooses between the Gram trick and materializing per-sample gradients by their costs. For
``Conv{1,2,3}d`` the form (:class:`LazyConvForm`) unfolds only when such a reduction needs
``U``: products with vectors, their combination and the gradient run as convolutions.
Non-zero padding modes (``reflect``, ``replicate``, ``circular``) and ``padding="same"`` are
handled exactly by padding the input first, as the layer itself does, and unfolding without
padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import result_pool
from ..buffers import BufferPool, active_pool, pooled, private_copy
from ..conv import unfold, unfold_transpose
from ..forms import ConcatForm, Form, OuterForm, PermutedForm, SampleForm

BLOCK_ELEMENTS = 1 << 16
"""Rows of one vector per block of samples in the squared sums (``[c, O, I]`` with
``c O I <= BLOCK_ELEMENTS``, at least one sample): small enough to stay in cache between the
product that writes them and the fused square-accumulate that reads them."""

SAMPLE_ELEMENTS = 1 << 22
"""Up to this many entries (``K O I``), the rows of all ``K > 1`` vectors of one sample are
formed by one product (exact diagonals: measured on the cnn's convolutions, 10 vectors,
``DiagGGN()`` 504-535 -> 476-491 ms, two A/B runs: fewer, larger products than one per
sample and vector); larger ones go block by block (:data:`BLOCK_ELEMENTS`)."""


class ConvOuterForm(OuterForm):
    """:class:`~beyondgrad.forms.OuterForm` of an unfolded convolution (``A``: the unfolded
    input ``[N, S, I]`` with ``S`` output positions, ``G``: the output gradients
    ``[K N, S, O]``), with the sums of squared rows over ``K > 1`` vectors (exact diagonals,
    ``DiagGGN`` / ``BatchDiagGGN``) formed block by block: one batched product per block of
    samples and vector into a reused buffer, then one fused ``addcmul_`` per row while the
    block is in cache (instead of squaring and reducing whole ``[N, O, I]`` products through
    memory; measured 1.6x faster on the cnn's last convolution, equal on the others)."""

    def _blocks(self, accumulate: Callable[[int, Tensor], None]) -> None:
        """``accumulate(n, row)`` for every sample ``n`` and vector, ``row``: ``[O, I]``
        (a reused buffer: read it before returning)."""
        K, N, S, I, O = self._sizes
        G = self.G.view(K, N, S, O)
        if 1 < K and K * O * I <= SAMPLE_ELEMENTS:
            buffer = self.A.new_empty(K, O, I)
            for n in range(N):  # one product per sample for all its vectors
                for row in torch.matmul(G[:, n].transpose(1, 2), self.A[n], out=buffer):
                    accumulate(n, row)
            return
        step = max(1, min(N, BLOCK_ELEMENTS // max(1, O * I)))
        buffer = self.A.new_empty(step, O, I)
        for a in range(0, N, step):
            b = min(N, a + step)
            for k in range(K):
                rows = torch.bmm(G[k, a:b].transpose(1, 2), self.A[a:b], out=buffer[: b - a])
                for i, row in enumerate(rows):
                    accumulate(a + i, row)

    def _fused(self) -> bool:
        """Blocks for ``S > 1`` positions on the CPU (the cache argument; elsewhere one kernel
        per row would cost more launches than it saves), outside autograd (products into a
        reused buffer are not differentiable). Also for one vector (``K = 1``, e.g. a
        one-sample Monte-Carlo diagonal): the cnn's ``DiagGGN(mc_samples=1)`` 117 -> 109 ms
        against whole-chunk products (fresh ``[n, O, I]`` chunks)."""
        _K, _N, S, _I, _O = self._sizes
        tracked = torch.is_grad_enabled() and (self.A.requires_grad or self.G.requires_grad)
        return S > 1 and self.A.device.type == "cpu" and not tracked

    def _sum_grad_squared(self) -> Tensor:
        if not self._fused():
            return super()._sum_grad_squared()
        total = self.A.new_zeros(self.G.shape[2], self.A.shape[2])
        self._blocks(lambda n, row: total.addcmul_(row, row))
        return total.reshape(self.shape)

    def _batch_sum_grad_squared(self) -> Tensor:
        if not self._fused():
            return super()._batch_sum_grad_squared()
        out = result_pool.zeros((self.num_samples, self.G.shape[2], self.A.shape[2]), self.A)
        self._blocks(lambda n, row: out[n].addcmul_(row, row))
        return out.reshape(self.num_samples, *self.shape)


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution without padding (the input is padded already), as the unfolding and the
    convolutions of :class:`LazyConvForm` need it."""

    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    out_sizes: tuple[int, ...]

    def convolve(self, x: Tensor, weight: Tensor) -> Tensor:
        """``conv(x, weight)`` ``[N, F, *out_sizes]`` for ``weight`` ``[F, C, *kernel]``."""
        d = len(self.kernel)
        zeros = [0] * d
        with _gemm_precision(x):
            return torch.convolution(
                x, weight, None, list(self.stride), zeros, list(self.dilation), False, zeros, 1
            )

    def weight_grad(self, x: Tensor, grad_out: Tensor) -> Tensor:
        """The weight gradient ``[F, C, *kernel]`` of ``conv(x, weight)`` for the output
        gradient ``grad_out`` ``[N, F, *out_sizes]``, summed over the samples (the layer's
        own backward kernel: no unfolded copy of ``x``)."""
        d = len(self.kernel)
        zeros = [0] * d
        shape = (grad_out.shape[1], x.shape[1], *self.kernel)
        weight = x.new_empty(shape)  # its shape is what the kernel reads
        with _gemm_precision(x):
            return torch.ops.aten.convolution_backward(
                grad_out.contiguous(), x, weight, None, list(self.stride), zeros,
                list(self.dilation), False, zeros, 1, [False, True, False],
            )[1]  # fmt: skip


@contextmanager
def _gemm_precision(x: Tensor) -> Iterator[None]:
    """cuDNN convolutions at the precision of float32 matrix products: cuDNN runs float32
    convolutions in TF32 by default where matrix products do not, so products that the
    unfolded path forms by GEMMs would otherwise lose about 13 bits (CUDA only; the user's
    TF32 setting for matrix products is followed)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if x.device.type != "cuda" or x.dtype != torch.float32 or conv is None:
        yield
        return
    before = conv.fp32_precision
    conv.fp32_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


class LazyConvForm(ConvOuterForm):
    """:class:`ConvOuterForm` that keeps the (padded) layer input ``x`` ``[N, C, *spatial]``
    and unfolds it into ``A`` only when a reduction needs the rows' factors (norms, Gram
    matrices, squared sums, per-sample rows). Products with vectors (:meth:`project`), their
    combination (:meth:`combine`) and the sum of the rows (:meth:`grad`) run as
    convolutions instead: a forward of ``x`` with the vectors as weights, and the layer's
    weight-gradient kernel, both on the output gradients in their own layout. That skips the
    unfolded copy of the input and its transposed ``[N S, I]`` copy, the dominant extra cost of
    matrix-free products through convolutions (``EmpiricalFisher @ v``, the Cockpit's
    ``Alpha``). The unfolding, when it comes, writes into the buffer pool that was active
    when the form was made (the same round).

    Args:
        x: the padded input ``[N, C, *spatial]`` (one group's channels; the rule passes its
            own copy, never the caller's tensor, which a data loader or an optimizer step may
            overwrite before a later product reads it).
        G: the output gradients ``[K N, S, O]`` (a transposed view of ``[K N, O, S]``).
        shape: the weight's shape per group.
        vectors: ``K``.
        geometry: the convolution.
    """

    def __init__(
        self, x: Tensor, G: Tensor, shape: tuple[int, ...], vectors: int, geometry: ConvGeometry
    ):
        N, S = x.shape[0], math.prod(geometry.out_sizes)
        if G.shape[0] != vectors * N or G.shape[1] != S:
            raise ValueError(f"LazyConvForm: x {tuple(x.shape)} and G {tuple(G.shape)} disagree")
        self._x, self._A, self.G = x, None, G
        self.shape, self.vectors, self.num_samples = torch.Size(shape), vectors, N
        self._geometry = geometry
        self._pool: BufferPool | None = active_pool()

    @property  # type: ignore[override]
    def A(self) -> Tensor:
        """The unfolded input ``[N, S, I]`` (a transposed view of ``[N, I, S]``), formed on
        first use."""
        if self._A is None:
            g = self._geometry
            with pooled(self._pool) if self._pool is not None else nullcontext():
                U = unfold(self._x, g.kernel, g.dilation, 0, g.stride)
            self._A = U.transpose(1, 2)
        return self._A

    @property
    def _sizes(self) -> tuple[int, int, int, int, int]:
        g = self._geometry
        I = self._x.shape[1] * math.prod(g.kernel)
        return self.vectors, self.num_samples, math.prod(g.out_sizes), I, self.G.shape[2]

    def _by_convolution(self) -> bool:
        """Whether the products go through convolutions: while ``A`` is not unfolded (once it
        is, they read it as the eager form does; in the Cockpit's economy step on the cnn the
        rows are materialized by then, and forcing convolutions measured the same)."""
        return self._A is None

    def _output_gradients(self) -> Tensor:
        """``[K, N, O, S]``: the output gradients in their own layout (a view)."""
        K, N, S, _I, O = self._sizes
        return self.G.transpose(1, 2).reshape(K, N, O, S)

    def _project(self, vectors: Tensor) -> Tensor:
        if not self._by_convolution():
            return super()._project(vectors)
        K, N, S, _I, O = self._sizes
        c = vectors.shape[0]
        weight = vectors.reshape(c * O, self._x.shape[1], *self._geometry.kernel)
        AV = self._geometry.convolve(self._x, weight).reshape(N, c, O * S)  # [N, c, O S]
        G = self._output_gradients().reshape(K, N, O * S).transpose(0, 1)  # [N, K, O S]
        return torch.bmm(G, AV.transpose(1, 2)).transpose(0, 1).reshape(K * N, c)

    def _combine(self, coefficients: Tensor) -> Tensor:
        if not self._by_convolution():
            return super()._combine(coefficients)
        K, N, _S, _I, O = self._sizes
        c = coefficients.shape[1]
        weighted = torch.einsum(
            "knc,knos->cnos", coefficients.view(K, N, c), self._output_gradients()
        )
        sizes = self._geometry.out_sizes
        out = [self._geometry.weight_grad(self._x, w.reshape(N, O, *sizes)) for w in weighted]
        return torch.stack(out).reshape(c, *self.shape)

    def _grad(self) -> Tensor:
        if not self._by_convolution():
            return super()._grad()
        K, N, _S, _I, O = self._sizes
        G = self._output_gradients()
        G = G.sum(0) if K > 1 else G[0]
        grad = self._geometry.weight_grad(self._x, G.reshape(N, O, *self._geometry.out_sizes))
        return grad.reshape(self.shape)


def _check_batched(module: nn.Module, x: Tensor, d: int) -> None:
    if x.ndim != d + 2:
        raise RuntimeError(
            f"{type(module).__name__} got input of shape {tuple(x.shape)}; per-sample "
            f"quantities need a batched input [N, C, *spatial] with {d} spatial dims"
        )


def _grouped_outer(
    U: Tensor,
    g: Tensor,
    groups: int,
    shape_per_group: tuple[int, ...],
    perm: tuple[int, ...] | None,
    vectors: int,
) -> Form:
    """Forms for weight gradients ``G_g^T U_g`` of each group; ``U``: ``[N, C*K, O]``,
    ``g``: ``[K N, F, O]``."""
    rows = U.shape[1]
    F_out = g.shape[1]
    parts: list[Form] = []
    for gr in range(groups):
        A = U[:, gr * rows // groups : (gr + 1) * rows // groups].transpose(1, 2)
        G = g[:, gr * F_out // groups : (gr + 1) * F_out // groups].transpose(1, 2)
        form: Form = ConvOuterForm(A, G, shape_per_group, vectors)
        parts.append(PermutedForm(form, perm) if perm is not None else form)
    return parts[0] if groups == 1 else ConcatForm(parts)


def _bias_form(module: nn.Module, g: Tensor, vectors: int) -> dict[str, Form]:
    if module.bias is not None and module.bias.requires_grad:
        return {"bias": SampleForm(g.reshape(g.shape[0], g.shape[1], -1).sum(2), vectors)}
    return {}


def padded_input(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """The input as the convolution sees it after its own padding (any ``padding_mode``,
    ``"same"`` included), so that the rest uses padding 0."""
    widths = module._reversed_padding_repeated_twice
    if any(widths):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, widths, mode=mode)
    return x


def realized_output_padding(
    module: nn.modules.conv._ConvTransposeNd, x: Tensor, g: Tensor
) -> tuple[int, ...]:
    """``output_padding`` as realized by the call (``forward(input, output_size)`` may choose
    it), from the input and output-gradient shapes."""
    return tuple(
        o - ((i - 1) * s - 2 * p + dl * (k - 1) + 1)
        for o, i, s, p, dl, k in zip(
            g.shape[2:],
            x.shape[2:],
            module.stride,
            module.padding,
            module.dilation,
            module.kernel_size,
        )
    )


def conv_forms(
    module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, vectors: int = 1
) -> dict[str, Form]:
    d = len(module.kernel_size)
    _check_batched(module, x, d)
    padded = padded_input(module, x)
    forms = _bias_form(module, g, vectors)
    if module.weight.requires_grad:
        R, F_out = g.shape[:2]
        geometry = ConvGeometry(
            tuple(module.kernel_size), tuple(module.dilation), tuple(module.stride),
            tuple(g.shape[2:]),
        )  # fmt: skip
        shape = (F_out // module.groups, *module.weight.shape[1:])
        G = g.reshape(R, F_out, -1)
        if padded is x:  # the caller's tensor: a copy, as the unfolded input was one
            padded = private_copy(x)
        x = padded
        C, groups = x.shape[1], module.groups
        parts: list[Form] = [
            LazyConvForm(
                x[:, gr * C // groups : (gr + 1) * C // groups],
                G[:, gr * F_out // groups : (gr + 1) * F_out // groups].transpose(1, 2),
                shape,
                vectors,
                geometry,
            )
            for gr in range(groups)
        ]
        forms["weight"] = parts[0] if groups == 1 else ConcatForm(parts)
    return forms


def conv_transpose_forms(
    module: nn.modules.conv._ConvTransposeNd, x: Tensor, g: Tensor, vectors: int = 1
) -> dict[str, Form]:
    d = len(module.kernel_size)
    _check_batched(module, x, d)
    forms = _bias_form(module, g, vectors)
    if module.weight.requires_grad:
        out_pad = realized_output_padding(module, x, g)
        U = unfold_transpose(
            x, module.kernel_size, module.dilation, module.padding, module.stride, out_pad
        )
        R, F_out = g.shape[:2]
        C_in = x.shape[1]
        shape = (F_out // module.groups, C_in // module.groups, *module.kernel_size)
        perm = (1, 0, *range(2, 2 + d))
        G = g.reshape(R, F_out, -1)
        forms["weight"] = _grouped_outer(U, G, module.groups, shape, perm, vectors)
    return forms
