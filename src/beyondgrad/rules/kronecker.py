"""Kronecker statistics of the layers with Kronecker structure (KFAC).

For one call with input ``x`` ``[N, ...]`` and output gradients ``g`` ``[K N, ...]`` of ``K``
backpropagated vectors, each function returns :class:`KronStats`: the input-side sum
``A_sum`` and its count (A = A_sum / count), the output-side sum ``B_sum``, all with a leading
group axis for grouped convolutions. Inputs are augmented by a constant 1 when the layer has a
trainable bias (the last row/column of ``A``).

* KFAC-expand: the shared axis (sequence/spatial positions) is treated like more data:
  ``A_sum = sum_{n,s} a a^T`` (count ``N S``), ``B_sum = sum_{k,n,s} g g^T``.
* KFAC-reduce: ``A_sum = sum_n abar abar^T`` with ``abar`` the mean of ``a`` over the shared
  axis (count ``N``), ``B_sum = sum_{k,n} gsum gsum^T`` with ``gsum`` the sum of ``g`` over it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conv import unfold, unfold_transpose
from ..conv.einsum import averaged_patches
from .conv import padded_input, realized_output_padding


@dataclass
class KronStats:
    A_sum: Tensor  # [G, I(+1), I(+1)]
    count: int
    B_sum: Tensor  # [G, O, O]
    order: str = "B kron A"
    weight_perm: tuple[int, ...] | None = None

    def __add__(self, other: KronStats) -> KronStats:
        return KronStats(
            self.A_sum + other.A_sum,
            self.count + other.count,
            self.B_sum + other.B_sum,
            self.order,
            self.weight_perm,
        )


def _has_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return bias is not None and bias.requires_grad


SYMMETRIC_MIN = 320
"""Below this size a Gram matrix is one full product (:func:`gram_into`); from it on (CPU,
at least :data:`SYMMETRIC_MIN_ROWS` rows), only the blocks on and above the diagonal are
multiplied and the rest mirrored."""
SYMMETRIC_MIN_ROWS = 1024
"""Fewer rows make the product too cheap for the blocks to pay (measured, one thread: 1.4x
slower at 128 rows, 0.9x at 256-512, 0.55-0.8x from 1024 on, ``D`` 384-1153; two threads,
quiet: 1.26x at 256 rows, 0.89x at 1024, 0.67-0.86x from 2048 on, ``D`` 384-1001)."""


def _block_size(D: int) -> int:
    """Rows per block of the half-triangle product: about ``D / 4`` rounded up to a multiple
    of 64, at least 128, i.e. three or four blocks: 5/8 to 2/3 of the multiply-adds; measured
    on CPU (one thread, ``n = 2048``) 0.75-0.8 of the full product's time at ``D`` 384-513,
    0.65 at 1000. More, smaller blocks save more multiply-adds but pay per call, most with
    several threads on a loaded machine."""
    return max(128, -(-D // 256) * 64)


def _blocked(flat: Tensor) -> bool:
    """Whether :func:`gram_into` forms ``flat^T flat`` by half-triangle blocks."""
    D, n = flat.shape[-1], flat.shape[0]
    return D >= SYMMETRIC_MIN and n >= SYMMETRIC_MIN_ROWS and flat.device.type == "cpu"


def gram_into(out: Tensor, flat: Tensor) -> Tensor:
    """``flat^T flat`` (``flat`` ``[n, D]``) written into ``out`` ``[D, D]`` (may be a view)
    and returned.

    On CPU from :data:`SYMMETRIC_MIN` columns and :data:`SYMMETRIC_MIN_ROWS` rows on, the
    product is formed by row blocks of the upper triangle, ``out[i:j, i:] = flat[:, i:j]^T
    flat[:, i:]``, and the strictly lower triangle is mirrored from it: about ``(b + 1) /
    (2 b)`` of the multiply-adds for ``b`` blocks (a ``syrk`` in spirit; torch has none).
    Elsewhere (small sizes, CUDA) it is one product.
    """
    D = flat.shape[-1]
    if not _blocked(flat):  # straight into ``out`` (a strided view is fine for gemm)
        out.addmm_(flat.T, flat, beta=0)
        return out
    step = _block_size(D)
    for lo in range(0, D, step):
        hi = min(lo + step, D)
        out[lo:hi, lo:] = flat[:, lo:hi].T @ flat[:, lo:]
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


def gram_add_upper_(out: Tensor, flat: Tensor) -> None:
    """Add ``flat^T flat`` (``flat`` ``[n, D]``) to ``out`` ``[D, D]`` where it is needed for
    the upper triangle: by the blocks on and above the diagonal where :func:`gram_into` uses
    them (the part below the diagonal blocks is not updated), else the whole product. After
    the last addition :func:`mirror_upper_` makes ``out`` the symmetric sum."""
    if not _blocked(flat):
        out.addmm_(flat.T, flat)
        return
    D = flat.shape[-1]
    step = _block_size(D)
    for lo in range(0, D, step):
        hi = min(lo + step, D)
        out[lo:hi, lo:].addmm_(flat[:, lo:hi].T, flat[:, lo:])


def mirror_upper_(out: Tensor) -> Tensor:
    """``out`` ``[D, D]`` with its strictly lower triangle replaced by the transposed upper
    one (in place; returned)."""
    lower = torch.ones_like(out, dtype=torch.bool).tril_(-1)
    return out.copy_(torch.where(lower, out.mT, out))


def _gram(rows: Tensor) -> Tensor:
    """``rows^T rows`` over all leading axes: ``[..., D] -> [D, D]``."""
    flat = rows.reshape(-1, rows.shape[-1])
    if not _blocked(flat):
        return flat.T @ flat
    D = flat.shape[-1]
    return gram_into(flat.new_empty(D, D), flat)


CHANNEL_GRAM_MIN_POSITIONS = 96
"""From this many positions on (CPU, fewer than :data:`SYMMETRIC_MIN` channels), the Gram
matrix of a convolution's output gradients is summed from per-sample batched products
(:func:`_channel_gram`) instead of one product of their transposed ``[K N P, F]`` copy.
Measured (2 threads; ``[B, F, P]`` -> ms, transposed copy + product vs batched): ``[640, 64,
784]`` 65 vs 24, ``[640, 96, 144]`` 21 vs 11, ``[640, 128, 100]`` 16 vs 13, ``[1280, 32,
1024]`` 82 vs 18; but ``[640, 128, 64]`` 9 vs 10, ``[640, 128, 36]`` 4.6 vs 7.4."""
CHANNEL_GRAM_CHUNK = 1 << 21
"""Entries of the ``[b, F, F]`` per-sample products summed at a time (8 MiB in float32)."""


def _channel_gram(G: Tensor) -> Tensor:
    """``sum_b G_b G_b^T`` ``[F, F]`` for ``G`` ``[B, F, P]`` (channels first, as a
    convolution's output gradients come; any batch stride): batched products summed in chunks
    where the positions are many (:data:`CHANNEL_GRAM_MIN_POSITIONS`; CPU, float32/64), else
    :func:`_gram` of the transposed ``[B P, F]`` rows."""
    B, F, P = G.shape
    small = P < CHANNEL_GRAM_MIN_POSITIONS or F >= SYMMETRIC_MIN
    # float32/64 only: half-precision per-sample products would be rounded before the sum
    if small or G.device.type != "cpu" or G.dtype not in (torch.float32, torch.float64):
        return _gram(G.transpose(1, 2))
    chunk = max(1, CHANNEL_GRAM_CHUNK // (F * F))
    out = G.new_zeros(F, F)
    for start in range(0, B, chunk):
        part = G[start : start + chunk]
        out += torch.bmm(part, part.transpose(1, 2)).sum(0)
    return out


TINY_GRADIENTS = 2.0**-20
"""Output gradients whose largest magnitude is below this (CPU, float32/bfloat16) are scaled
by a power of two before their Gram matrix is formed (:func:`_output_gram`)."""


def _times_power_of_two_(t: Tensor, exponent: int) -> Tensor:
    """``t *= 2**exponent`` in place, in steps whose factor is a normal float32 number."""
    while exponent:
        step = max(-100, min(100, exponent))
        t.mul_(2.0**step)
        exponent -= step
    return t


def _output_gram(gram: Callable[[Tensor], Tensor], G: Tensor) -> Tensor:
    """``gram(G)`` for output gradients ``G``; on CPU in float32/bfloat16, where ``G``'s
    largest magnitude ``m`` is below :data:`TINY_GRADIENTS`, ``gram(2^-k G) 4^k`` with ``2^k
    <= m < 2^(k+1)``. Scaling by a power of two rounds nothing, so the result is the same but
    for products that would otherwise underflow into subnormal floats, which x86 CPUs compute
    in microcode: the output gradients of a confident classifier (the benchmarks'
    transformer, largest entries ~1e-13: its fc1 output-gradient Gram 71.9 -> 2.2 ms, qkv 35.6
    -> 0.9 ms; Intel Xeon, 2 threads)."""
    if G.device.type != "cpu" or G.dtype not in (torch.float32, torch.bfloat16) or not G.numel():
        return gram(G)
    if float(G[(0,) * (G.ndim - 1)].abs().amax()) >= TINY_GRADIENTS:  # one row: not tiny
        return gram(G)  # (the common case decided for ~5 us, not a pass over G)
    low, high = torch.aminmax(G)  # one pass, no |G| copy (a third of abs().amax()'s time)
    m = max(-float(low), float(high))
    if not 0.0 < m < TINY_GRADIENTS:  # also inf and NaN: left to the finiteness checks
        return gram(G)
    k = math.floor(math.log2(m))
    return _times_power_of_two_(gram(_times_power_of_two_(G.clone(), -k)), 2 * k)


def _augmented_gram(rows: Tensor, bias: bool) -> Tensor:
    """The Gram matrix of ``rows`` ``[..., D]`` augmented by a constant 1 column when ``bias``,
    without forming the augmented copy: the Gram matrix is written into the top-left block of
    the ``[D + 1, D + 1]`` result, the column sums ``rows^T 1`` into its last row and column
    and the row count into its corner."""
    flat = rows.reshape(-1, rows.shape[-1])
    if not bias:
        return _gram(flat)
    D = flat.shape[-1]
    out = flat.new_empty(D + 1, D + 1)
    gram_into(out[:D, :D], flat)
    out[D, :D] = flat.sum(0)
    out[:D, D] = out[D, :D]
    out[D, D] = flat.shape[0]
    return out


def _stats(A_in: Tensor, G: Tensor, approx: str, bias: bool) -> KronStats:
    """``A_in`` ``[N, S, I]``, ``G`` ``[K, N, S, O]`` (one group)."""
    N, S, _ = A_in.shape
    if approx == "expand" or S == 1:  # one position: reduce is expand (no mean/sum copies)
        return KronStats(_augmented_gram(A_in, bias)[None], N * S, _output_gram(_gram, G)[None])
    B = _output_gram(_gram, G.sum(2))
    return KronStats(_augmented_gram(A_in.mean(1), bias)[None], N, B[None])


def linear_kron_sums(
    x: Tensor, g: Tensor, I: int, O: int, vectors: int, approx: str, module: nn.Module
) -> KronStats:
    """Kronecker sums of a Linear map ``[O, I]`` for inputs ``x`` ``[N, *, I]`` and output
    gradients ``g`` ``[K N, *, O]``; ``module``'s trainable bias augments the input side."""
    N = x.shape[0]
    A_in = x.reshape(N, -1, I)
    G = g.reshape(vectors, N, -1, O)
    return _stats(A_in, G, approx, _has_bias(module))


def linear_kron(module: nn.Linear, x: Tensor, g: Tensor, vectors: int, approx: str) -> KronStats:
    """``nn.Linear``: see :func:`linear_kron_sums`."""
    return linear_kron_sums(x, g, module.in_features, module.out_features, vectors, approx, module)


def conv_kron(
    module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor, vectors: int, approx: str
) -> KronStats:
    x = padded_input(module, x)
    N = x.shape[0]
    Gr = module.groups
    F_out = g.shape[1]
    G = (
        g.reshape(vectors, N, Gr, F_out // Gr, -1).movedim(2, 0).transpose(-1, -2)
    )  # [Gr, K, N, O, F]
    bias = _has_bias(module)
    A_sums, B_sums = [], []
    if approx == "expand":
        U = unfold(x, module.kernel_size, module.dilation, 0, module.stride)  # [N, C*K, O]
        U = U.reshape(N, Gr, -1, U.shape[-1]).transpose(-1, -2)  # [N, Gr, O, C/G*K]
        count = N * U.shape[2]
        G_first = g.reshape(vectors * N, Gr, F_out // Gr, -1)  # channels first: [K N, Gr, F, P]
        for gr in range(Gr):
            A_sums.append(_augmented_gram(U[:, gr], bias))
            B_sums.append(_output_gram(_channel_gram, G_first[:, gr]))
    else:  # index patterns summed over the output axis: the unfolded input is never formed
        abar = averaged_patches(x, module.kernel_size, module.stride, 0, module.dilation)
        abar = abar.reshape(N, Gr, -1)
        count = N
        for gr in range(Gr):
            A_sums.append(_augmented_gram(abar[:, gr], bias))
            B_sums.append(_output_gram(_gram, G[gr].sum(2)))
    return KronStats(torch.stack(A_sums), count, torch.stack(B_sums))


def conv_transpose_kron(
    module: nn.modules.conv._ConvTransposeNd, x: Tensor, g: Tensor, vectors: int, approx: str
) -> KronStats:
    """Transposed convolutions: per group the weight gradient is ``G^T U`` over
    ``[C_out/G, C_in/G * prod(K)]``, i.e. the weight ``[C_in, C_out/G, *K]`` with its first two
    axes swapped (``weight_perm``). Both approximations use the unfolded input here."""
    d = len(module.kernel_size)
    out_pad = realized_output_padding(module, x, g)
    U = unfold_transpose(
        x, module.kernel_size, module.dilation, module.padding, module.stride, out_pad
    )
    N = x.shape[0]
    Gr = module.groups
    F_out = g.shape[1]
    G = g.reshape(vectors, N, Gr, F_out // Gr, -1).movedim(2, 0).transpose(-1, -2)
    U = U.reshape(N, Gr, -1, U.shape[-1]).transpose(-1, -2)  # [N, Gr, O, C/G*K]
    bias = _has_bias(module)
    A_sums, B_sums = [], []
    for gr in range(Gr):
        stats = _stats(U[:, gr], G[gr], approx, bias)
        A_sums.append(stats.A_sum[0])
        B_sums.append(stats.B_sum[0])
    count = N * U.shape[2] if approx == "expand" else N
    perm = (1, 0, *range(2, 2 + d))
    return KronStats(torch.stack(A_sums), count, torch.stack(B_sums), "B kron A", perm)


def embedding_kron(
    module: nn.Embedding, x: Tensor, g: Tensor, vectors: int, approx: str
) -> KronStats:
    """The input side is one-hot: ``A`` is diagonal (index frequencies); weight ``[V, d]`` has
    the input side first (order ``A kron B``)."""
    N = x.shape[0]
    index = x.reshape(N, -1)
    G = g.reshape(vectors, N, index.shape[1], module.embedding_dim)
    V = module.num_embeddings
    keep = None  # every position is data
    if module.padding_idx is not None:  # padding positions receive no gradient: not data
        keep = index != module.padding_idx
        G = G * keep.unsqueeze(-1).to(G.dtype)
    if approx == "expand":  # the count needs no host synchronization without padding
        count = index.numel() if keep is None else int(keep.sum())
        used = index.reshape(-1) if keep is None else index[keep]
        counts = torch.bincount(used, minlength=V).to(g.dtype)
        return KronStats(torch.diag(counts)[None], count, _output_gram(_gram, G)[None], "A kron B")
    onehot = F.one_hot(index, V).to(g.dtype)
    if keep is not None:
        onehot = onehot * keep.unsqueeze(-1).to(g.dtype)
    onehot_mean = onehot.mean(1)  # [N, V]
    B = _output_gram(_gram, G.sum(2))
    return KronStats(_gram(onehot_mean)[None], N, B[None], "A kron B")
