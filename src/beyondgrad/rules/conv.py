"""Rules for ``Conv{1,2,3}d`` and ``ConvTranspose{1,2,3}d`` (any stride, padding, dilation,
groups, bias, and padding mode).

The weight gradient of sample ``n`` is ``G_n^T U_n`` per group, with ``U_n`` the unfolded
input ``[O, C_in/G * prod(K)]`` (one row per output position: the shared axis) and ``G_n`` the
output gradient ``[O, C_out/G]``, i.e. an :class:`~beyondgrad.forms.OuterForm`; the form
chooses between the Gram trick and materializing per-sample gradients by their costs.
Non-zero padding modes (``reflect``, ``replicate``, ``circular``) and ``padding="same"`` are
handled exactly by padding the input first, as the layer itself does, and unfolding without
padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        out = self.A.new_zeros(self.num_samples, self.G.shape[2], self.A.shape[2])
        self._blocks(lambda n, row: out[n].addcmul_(row, row))
        return out.reshape(self.num_samples, *self.shape)


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
    x = padded_input(module, x)
    forms = _bias_form(module, g, vectors)
    if module.weight.requires_grad:
        U = unfold(x, module.kernel_size, module.dilation, 0, module.stride)
        R, F_out = g.shape[:2]
        shape = (F_out // module.groups, *module.weight.shape[1:])
        G = g.reshape(R, F_out, -1)
        forms["weight"] = _grouped_outer(U, G, module.groups, shape, None, vectors)
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
