"""Per-sample gradient *forms*: how a parameter's per-sample gradients are represented.

A rule turns what the engine captured for a layer (its inputs ``x`` and the backpropagated output
gradients ``g``) into one form per parameter. A form knows how to reduce itself to every
quantity, choosing the cheapest contraction for its shapes; most never build the tensor of
per-sample gradients unless it is asked for.

**Rows.** The engine backpropagates ``K`` output-space vectors per sample (``K = 1`` for the
loss gradient; ``C`` loss-Hessian columns for exact curvature; ``M`` Monte-Carlo draws). A form
holds the ``K * N`` per-(vector, sample) gradients ``g_{k,n}``, ordered vector-major: row
``k * N + n``. For ``K = 1`` the rows are the per-sample gradients. The layer input is shared by
the ``K`` vectors of a sample and is never repeated.

Forms:

* :class:`OuterForm` -- ``g_{k,n} = sum_s G[k n, s]^T A[n, s]`` (``nn.Linear``, unfolded
  convolutions); ``s`` runs over the *shared axis* (sequence or spatial positions, calls).
* :class:`ScatterForm` -- ``g_{k,n} = sum_s onehot(I[n, s]) G[k n, s]^T`` (``nn.Embedding``).
* :class:`SampleForm` -- the rows themselves, ``[K N, *shape]`` (biases, normalization layers,
  the generic rule).
* :class:`SumForm`, :class:`ConcatForm`, :class:`PermutedForm` -- compositions (tied weights,
  grouped convolutions, transposed-convolution weights).

Conventions: the rows sum (over ``n``) to the gradient of the loss as ``loss_fn`` defines it when
``K = 1``; with loss-Hessian vectors, ``sum_{k,n} g_{k,n} g_{k,n}^T`` is the GGN.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Chunking bound for temporaries of per-row gradients that are reduced right away: number of
# elements per chunk.
_CHUNK_ELEMENTS = 1 << 24


def _row_index(index: Tensor, vectors: int, num_samples: int) -> Tensor:
    """Rows ``k * N + index[j]`` for every vector ``k`` (vector-major)."""
    if vectors == 1:
        return index
    offsets = torch.arange(vectors, device=index.device).unsqueeze(1) * num_samples
    return (offsets + index.unsqueeze(0)).reshape(-1)


class Form(ABC):
    """Per-row gradients of one parameter of shape ``shape``: ``vectors`` (K) vectors for each
    of ``num_samples`` (N) samples.

    The public reductions are memoized per form, so several quantities requested together
    share work; once the rows are materialized, the other reductions read them instead of
    recomputing. Subclasses implement the ``_``-prefixed methods.
    """

    shape: torch.Size
    num_samples: int
    vectors: int

    @property
    def rows(self) -> int:
        return self.vectors * self.num_samples

    @abstractmethod
    def select(self, index: Tensor) -> Form:
        """The form restricted to the samples ``index`` (1-d long tensor), all vectors kept."""

    def dots_with_sum(self) -> Tensor:
        """``<g_r, sum_q g_q>`` per row, ``[rows]`` (the cockpit's gradient tests)."""
        return self._memo("dots_with_sum", lambda: self.project(self.grad()[None])[:, 0])

    def worth_materializing(self, budget: int) -> bool:
        """Whether several reductions of this form (norms, dots, projections, entries) are
        cheaper from the materialized rows than each from the factors, with the rows taking at
        most ``budget`` elements. Default: no (forms without a cheaper closed form materialize
        on demand anyway)."""
        return False

    def entries(self, rows: Tensor, flat: Tensor) -> Tensor:
        """Single entries of the rows: ``g_{rows[e]}[flat[e]]`` (flattened index into
        ``shape``), ``[E]``. Default: materialize the distinct rows asked for."""
        if self.materialized:
            return self.batch_grad().reshape(self.rows, -1)[rows, flat]
        distinct, where = torch.unique(rows, return_inverse=True)
        sample = distinct % self.num_samples
        picked = (
            self.select(sample).batch_grad() if self.vectors == 1 else self.batch_grad()[distinct]
        )
        return picked.reshape(picked.shape[0], -1)[where, flat]

    def _memo(self, key: str, fn: Callable[[], Tensor]) -> Tensor:
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    def seed(self, key: str, value: Tensor) -> None:
        """Provide a reduction computed elsewhere (e.g. the gradient from autograd)."""
        self.__dict__.setdefault("_cache", {})[key] = value

    @property
    def materialized(self) -> bool:
        return "batch_grad" in self.__dict__.get("_cache", {})

    def batch_grad(self, out: Tensor | None = None) -> Tensor:
        """The rows, ``[K N, *shape]``; written into ``out`` if given (memory reuse across
        calls: a fresh allocation of this size costs more than computing it)."""
        if out is None:
            return self._memo("batch_grad", self._batch_grad)
        if out.shape != (self.rows, *self.shape):
            raise ValueError(
                f"out has shape {tuple(out.shape)}, expected {(self.rows, *self.shape)}"
            )
        self.seed("batch_grad", self._batch_grad(out))
        return out

    def grad(self) -> Tensor:
        """Sum of the rows, ``shape``."""
        if self.materialized:
            return self._memo("grad", lambda: self.batch_grad().sum(0))
        return self._memo("grad", self._grad)

    def batch_l2(self) -> Tensor:
        """Squared Euclidean norms of the rows, ``[K N]``."""
        if self.materialized:
            return self._memo("batch_l2", lambda: Form._batch_l2(self))
        return self._memo("batch_l2", self._batch_l2)

    def batch_dot(self) -> Tensor:
        """Inner products of the rows, ``[K N, K N]`` (for ``K > 1``: the Gram matrix of the
        GGN factor, whose nonzero eigenvalues are the GGN's)."""
        if self.materialized:
            return self._memo("batch_dot", lambda: Form._batch_dot(self))
        return self._memo("batch_dot", self._batch_dot)

    def sum_grad_squared(self) -> Tensor:
        """Sum over rows of their element-wise squares, ``shape`` (for loss-Hessian vectors:
        the GGN diagonal)."""
        if self.materialized:
            return self._memo("sgs", lambda: Form._sum_grad_squared(self))
        return self._memo("sgs", self._sum_grad_squared)

    def batch_sum_grad_squared(self) -> Tensor:
        """Per sample, the sum over its ``K`` rows of their element-wise squares,
        ``[N, *shape]`` (per-sample GGN diagonals)."""
        if self.materialized:
            return self._memo("bsgs", lambda: Form._batch_sum_grad_squared(self))
        return self._memo("bsgs", self._batch_sum_grad_squared)

    def cross_dot(self, other: Form) -> Tensor:
        """Inner products of this form's rows with ``other``'s rows (same parameter, same
        layer inputs, other backpropagated vectors), ``[rows, other.rows]``."""
        return self._cross_dot(other)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Linear combinations of the rows, ``sum_r coefficients[r, j] g_r``: ``[c, *shape]``
        for ``coefficients`` ``[rows, c]`` (e.g. GGN eigenvectors ``V u``)."""
        if self.materialized:
            return Form._combine(self, coefficients)
        return self._combine(coefficients)

    def project(self, vectors: Tensor) -> Tensor:
        """Inner products of the rows with ``vectors`` ``[c, *shape]``: ``[rows, c]`` (with
        :meth:`combine`, products with ``sum_r g_r g_r^T`` without forming the rows)."""
        if self.materialized:
            return Form._project(self, vectors)
        return self._project(vectors)

    # -- defaults from materialized rows -------------------------------------------------------
    def _cross_dot(self, other: Form) -> Tensor:
        return self.batch_grad().flatten(1) @ other.batch_grad().flatten(1).T

    def _combine(self, coefficients: Tensor) -> Tensor:
        flat = self.batch_grad().flatten(1)
        return (coefficients.T @ flat).reshape(-1, *self.shape)

    def _project(self, vectors: Tensor) -> Tensor:
        return self.batch_grad().flatten(1) @ vectors.reshape(vectors.shape[0], -1).T

    @abstractmethod
    def _batch_grad(self, out: Tensor | None = None) -> Tensor: ...

    def _grad(self) -> Tensor:
        return self.batch_grad().sum(0)

    def _batch_l2(self) -> Tensor:
        return torch.linalg.vector_norm(self.batch_grad().flatten(1), dim=1).square()

    def _batch_dot(self) -> Tensor:
        flat = self.batch_grad().flatten(1)
        return flat @ flat.T

    def _sum_grad_squared(self) -> Tensor:
        return self.batch_grad().pow(2).sum(0)

    def _batch_sum_grad_squared(self) -> Tensor:
        squares = self.batch_grad().pow(2)
        return squares.reshape(self.vectors, self.num_samples, *self.shape).sum(0)


class SampleForm(Form):
    """Materialized rows ``values`` of shape ``[K N, *shape]``."""

    def __init__(self, values: Tensor, vectors: int = 1):
        self.values, self.vectors = values, vectors
        self.shape = values.shape[1:]
        self.num_samples = values.shape[0] // vectors

    def select(self, index: Tensor) -> SampleForm:
        rows = _row_index(index, self.vectors, self.num_samples)
        return SampleForm(self.values.index_select(0, rows), self.vectors)

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        return self.values if out is None else out.copy_(self.values)

    def _grad(self) -> Tensor:
        return self.values.sum(0)


class OuterForm(Form):
    """``g_{k,n} = sum_s G[k N + n, s]^T A[n, s]`` reshaped to ``shape``.

    ``A``: ``[N, S, I]`` (layer inputs, the *input side*), ``G``: ``[K N, S, O]`` (output
    gradients, the *output side*), with ``prod(shape) == O * I`` and the row-major layout
    ``[O, I]`` of ``nn.Linear.weight``.
    """

    def __init__(self, A: Tensor, G: Tensor, shape: Sequence[int], vectors: int = 1):
        if G.shape[0] != vectors * A.shape[0] or A.shape[1] != G.shape[1]:
            raise ValueError(f"OuterForm: A {tuple(A.shape)} and G {tuple(G.shape)} disagree")
        self.A, self.G, self.shape, self.vectors = A, G, torch.Size(shape), vectors
        self.num_samples = A.shape[0]

    @property
    def _sizes(self) -> tuple[int, int, int, int, int]:
        N, S, I = self.A.shape
        return self.vectors, N, S, I, self.G.shape[2]

    def worth_materializing(self, budget: int) -> bool:
        """With ``S > 1`` positions each reduction from the factors costs a GEMM over all
        positions (``K N S I O``), like materializing the rows once; without positions the
        closed forms are cheaper than any materialization."""
        K, N, S, I, O = self._sizes
        return S > 1 and K * N * I * O <= budget

    def entries(self, rows: Tensor, flat: Tensor) -> Tensor:
        """``sum_s G[r, s, o] A[r mod N, s, i]`` for ``(o, i) = divmod(flat, I)``: no row is
        materialized."""
        if self.materialized:
            return Form.entries(self, rows, flat)
        I = self.A.shape[2]
        o, i = flat // I, flat % I
        g = self.G[rows, :, o]  # [E, S]
        a = self.A[rows % self.num_samples, :, i]  # [E, S]
        return (g * a).sum(1)

    def select(self, index: Tensor) -> OuterForm:
        rows = _row_index(index, self.vectors, self.num_samples)
        return OuterForm(
            self.A.index_select(0, index), self.G.index_select(0, rows), self.shape, self.vectors
        )

    def _per_row(self, G: Tensor, A: Tensor, out: Tensor | None = None) -> Tensor:
        """``[k, n, O, I]`` products for ``G`` ``[k, n, S, O]`` and ``A`` ``[n, S, I]``."""
        k, n, S, O = G.shape
        I = A.shape[2]
        if S == 1:
            return torch.mul(G.reshape(k, n, O, 1), A.reshape(1, n, 1, I), out=out)
        if k == 1:
            res = torch.bmm(G[0].transpose(1, 2), A, out=None if out is None else out[0])
            return res.unsqueeze(0)
        # all vectors of a sample in one product, A never repeated: [n, S, k O]^T [n, S, I]
        stacked = G.permute(1, 2, 0, 3).reshape(n, S, k * O)
        res = torch.bmm(stacked.transpose(1, 2), A).view(n, k, O, I).transpose(0, 1)
        return res if out is None else out.copy_(res)

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        K, N, S, I, O = self._sizes
        target = None if out is None else out.view(K, N, O, I)
        res = self._per_row(self.G.view(K, N, S, O), self.A, target)
        return res.reshape(K * N, *self.shape)

    def _grad(self) -> Tensor:
        K, N, S, I, O = self._sizes
        G = self.G.reshape(K, N * S, O).sum(0) if K > 1 else self.G.reshape(N * S, O)
        return (G.T @ self.A.reshape(N * S, I)).reshape(self.shape)

    def _batch_l2(self) -> Tensor:
        K, N, S, I, O = self._sizes
        if S == 1:
            a2 = self.A.reshape(1, N, I).pow(2).sum(2)
            return (self.G.reshape(K, N, O).pow(2).sum(2) * a2).reshape(K * N)
        if S * (I + O) <= I * O:  # Gram trick: sum_{s,t} (A_s . A_t)(G_s . G_t)
            gram_a = torch.bmm(self.A, self.A.transpose(1, 2))
            gram_g = torch.bmm(self.G, self.G.transpose(1, 2)).view(K, N, S, S)
            return (gram_a * gram_g).sum((2, 3)).reshape(K * N)
        return Form._batch_l2(self)

    def dots_with_sum(self) -> Tensor:
        K, N, S, I, O = self._sizes
        if self.materialized:
            return Form.dots_with_sum(self)
        if (K * N * S) ** 2 * (I + O) < K * N * S * I * O:  # the Gram matrix is cheaper
            return self._memo("dots_with_sum", lambda: self.batch_dot().sum(1))
        return Form.dots_with_sum(self)

    def _batch_dot(self) -> Tensor:
        K, N, S, I, O = self._sizes
        R = K * N
        gram_cost = (R * S) ** 2 * (I + O)
        materialize_cost = R * S * I * O + R * R * I * O
        if gram_cost <= materialize_cost:
            A, G = self.A.reshape(N * S, I), self.G.reshape(R * S, O)
            gram_a = (A @ A.T).view(1, N, S, 1, N, S)
            gram_g = (G @ G.T).view(K, N, S, K, N, S)
            return (gram_g * gram_a).sum((2, 5)).reshape(R, R)
        return Form._batch_dot(self)

    def _cross_dot(self, other: Form) -> Tensor:
        if not (isinstance(other, OuterForm) and other.A.shape == self.A.shape):
            return Form._cross_dot(self, other)
        _, N, S, I, O = self._sizes
        R1, R2 = self.rows, other.rows
        gram_entries = (R1 * S) * (R2 * S)
        if gram_entries * (I + O) > (R1 + R2) * S * I * O or gram_entries > (R1 + R2) * I * O:
            return Form._cross_dot(self, other)  # materializing the rows is cheaper
        A = self.A.reshape(N * S, I)
        gram_a = (A @ A.T).view(1, N, S, 1, N, S)
        gram_g = (self.G.reshape(R1 * S, O) @ other.G.reshape(R2 * S, O).T).view(
            self.vectors, N, S, other.vectors, N, S
        )
        return (gram_g * gram_a).sum((2, 5)).reshape(R1, R2)

    def _project(self, vectors: Tensor) -> Tensor:
        # <G_r^T A_n, V_c> = sum_s G[r, s] . (V_c A[n, s]): never forms the rows
        K, N, S, I, O = self._sizes
        V = vectors.reshape(-1, I)  # [c O, I]
        # the inputs as a matrix, copied once if they are a strided view (conv patches)
        A = self._memo("A_matrix", lambda: self.A.reshape(N * S, I))
        AV = (A @ V.T).view(1, N, S, -1, O)  # one GEMM
        return (self.G.view(K, N, S, 1, O) * AV).sum((2, 4)).reshape(K * N, -1)

    def _combine(self, coefficients: Tensor) -> Tensor:
        K, N, S, _I, O = self._sizes
        weighted = torch.einsum(
            "knc,knso->cnso", coefficients.view(K, N, -1), self.G.view(K, N, S, O)
        )
        return torch.einsum("cnso,nsi->coi", weighted, self.A).reshape(-1, *self.shape)

    def _chunks(self, per_chunk: int) -> list[tuple[int, int]]:
        K, N, _S, I, O = self._sizes
        step = max(1, _CHUNK_ELEMENTS // max(1, K * I * O * per_chunk))
        return [(a, min(N, a + step)) for a in range(0, N, step)]

    def _sum_grad_squared(self) -> Tensor:
        K, N, S, I, O = self._sizes
        if S == 1:
            g2 = self.G.reshape(K, N, O).pow(2)
            g2 = g2.sum(0) if K > 1 else g2[0]
            return (g2.T @ self.A.reshape(N, I).pow(2)).reshape(self.shape)
        # materialize rows chunk by chunk; their sum is the gradient, kept for free
        G = self.G.view(K, N, S, O)
        total = self.A.new_zeros(O, I)
        grad = self.A.new_zeros(O, I)
        for a, b in self._chunks(1):
            rows = self._per_row(G[:, a:b], self.A[a:b])
            grad += rows.sum((0, 1))
            total += rows.square_().sum((0, 1))
        if "grad" not in self.__dict__.get("_cache", {}):
            self.seed("grad", grad.reshape(self.shape))
        return total.reshape(self.shape)

    def _batch_sum_grad_squared(self) -> Tensor:
        K, N, S, I, O = self._sizes
        if S == 1:
            g2 = self.G.reshape(K, N, O).pow(2)
            g2 = g2.sum(0) if K > 1 else g2[0]
            a2 = self.A.reshape(N, I).pow(2)
            return (g2.unsqueeze(2) * a2.unsqueeze(1)).reshape(N, *self.shape)
        G = self.G.view(K, N, S, O)
        parts = [self._per_row(G[:, a:b], self.A[a:b]).square_().sum(0) for a, b in self._chunks(1)]
        return torch.cat(parts, 0).reshape(N, *self.shape)


class ScatterForm(Form):
    """``g_{k,n}[v] = sum_{s : I[n, s] = v} G[k N + n, s]``: an embedding table ``[num, d]``.

    ``index``: ``[N, S]`` long, ``G``: ``[K N, S, d]``. Rows of ``G`` whose index must not
    receive gradient (``padding_idx``) are expected to be zeroed by the rule.
    """

    def __init__(self, index: Tensor, G: Tensor, num: int, vectors: int = 1):
        self.index, self.G, self.num, self.vectors = index, G, num, vectors
        self.shape = torch.Size((num, G.shape[-1]))
        self.num_samples = index.shape[0]

    def select(self, index: Tensor) -> ScatterForm:
        rows = _row_index(index, self.vectors, self.num_samples)
        return ScatterForm(
            self.index.index_select(0, index), self.G.index_select(0, rows), self.num, self.vectors
        )

    @property
    def _row_indices(self) -> Tensor:
        """The index of every row, ``[K N, S]``."""
        return self.index if self.vectors == 1 else self.index.repeat(self.vectors, 1)

    def _flat(self) -> tuple[Tensor, Tensor]:
        return self._row_indices.reshape(-1), self.G.reshape(-1, self.G.shape[-1])

    def _grad(self) -> Tensor:
        idx, G = self._flat()
        return G.new_zeros(self.shape).index_add_(0, idx, G)

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        R, S = self.rows, self.index.shape[1]
        idx, G = self._flat()
        row = torch.arange(R, device=idx.device).repeat_interleave(S)
        res = (
            G.new_zeros(R * self.num, G.shape[1])
            if out is None
            else out.view(R * self.num, -1).zero_()
        )
        res.index_add_(0, row * self.num + idx, G)
        return res.reshape(R, *self.shape)

    def _batch_l2(self) -> Tensor:
        index = self._row_indices
        same = index.unsqueeze(2) == index.unsqueeze(1)
        gram_g = torch.bmm(self.G, self.G.transpose(1, 2))
        return (gram_g * same).sum((1, 2))

    def _batch_dot(self) -> Tensor:
        R, S = self.rows, self.index.shape[1]
        idx, G = self._flat()
        same = idx.unsqueeze(1) == idx.unsqueeze(0)
        return ((G @ G.T) * same).reshape(R, S, R, S).sum((1, 3))

    def _sum_grad_squared(self) -> Tensor:
        R, S = self.rows, self.index.shape[1]
        idx, G = self._flat()
        row = torch.arange(R, device=idx.device).repeat_interleave(S)
        keys, inverse = torch.unique(row * self.num + idx, return_inverse=True)
        sums = G.new_zeros(keys.numel(), G.shape[1]).index_add_(0, inverse, G)
        return G.new_zeros(self.shape).index_add_(0, keys % self.num, sums.pow(2))


class SumForm(Form):
    """The sum of forms of one parameter that cannot be merged into one (e.g. a weight tied
    between an ``nn.Embedding`` and an ``nn.Linear``)."""

    def __init__(self, parts: Sequence[Form]):
        self.parts = list(parts)
        self.shape = self.parts[0].shape
        self.num_samples = self.parts[0].num_samples
        self.vectors = self.parts[0].vectors

    def select(self, index: Tensor) -> SumForm:
        return SumForm([p.select(index) for p in self.parts])

    def _grad(self) -> Tensor:
        return sum((p.grad() for p in self.parts[1:]), self.parts[0].grad())

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        first = self.parts[0]._batch_grad(out)
        if out is None:
            first = first.clone()
        for p in self.parts[1:]:
            first += p.batch_grad()
        return first

    def _combine(self, coefficients: Tensor) -> Tensor:
        return sum(
            (p.combine(coefficients) for p in self.parts[1:]), self.parts[0].combine(coefficients)
        )

    def _batch_l2(self) -> Tensor:
        """``|sum_i a_i|^2 = sum_i |a_i|^2 + 2 sum_{i<j} <a_i, a_j>`` with cross terms that avoid
        materializing where a contraction exists (outer x scatter: a tied embedding)."""
        total = sum((p.batch_l2() for p in self.parts[1:]), self.parts[0].batch_l2())
        for i, a in enumerate(self.parts):
            for b in self.parts[i + 1 :]:
                total = total + 2 * _cross_dot(a, b)
        return total


class ConcatForm(Form):
    """A parameter whose leading axis is the concatenation of the parts' parameters (the
    groups of a grouped convolution)."""

    def __init__(self, parts: Sequence[Form]):
        self.parts = list(parts)
        first = self.parts[0]
        self.shape = torch.Size((sum(p.shape[0] for p in self.parts), *first.shape[1:]))
        self.num_samples, self.vectors = first.num_samples, first.vectors

    def select(self, index: Tensor) -> ConcatForm:
        return ConcatForm([p.select(index) for p in self.parts])

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        return torch.cat([p.batch_grad() for p in self.parts], 1, out=out)

    def _grad(self) -> Tensor:
        return torch.cat([p.grad() for p in self.parts], 0)

    def _batch_l2(self) -> Tensor:
        return sum((p.batch_l2() for p in self.parts[1:]), self.parts[0].batch_l2())

    def _batch_dot(self) -> Tensor:
        return sum((p.batch_dot() for p in self.parts[1:]), self.parts[0].batch_dot())

    def _sum_grad_squared(self) -> Tensor:
        return torch.cat([p.sum_grad_squared() for p in self.parts], 0)

    def _batch_sum_grad_squared(self) -> Tensor:
        return torch.cat([p.batch_sum_grad_squared() for p in self.parts], 1)

    def _cross_dot(self, other: Form) -> Tensor:
        if isinstance(other, ConcatForm) and len(other.parts) == len(self.parts):
            return sum(
                (a.cross_dot(b) for a, b in zip(self.parts[1:], other.parts[1:])),
                self.parts[0].cross_dot(other.parts[0]),
            )
        return Form._cross_dot(self, other)

    def _combine(self, coefficients: Tensor) -> Tensor:
        return torch.cat([p.combine(coefficients) for p in self.parts], 1)

    def _project(self, vectors: Tensor) -> Tensor:
        out, start = 0, 0
        for p in self.parts:
            size = p.shape[0]
            out = out + p.project(vectors[:, start : start + size])
            start += size
        return out  # type: ignore[return-value]


class PermutedForm(Form):
    """The parameter is ``base``'s parameter with its axes permuted by ``perm`` (the weight of
    a transposed convolution, ``[C_in, C_out, *K]``, from an outer form over
    ``[C_out, C_in, *K]``)."""

    def __init__(self, base: Form, perm: Sequence[int]):
        self.base, self.perm = base, tuple(perm)
        self.shape = torch.Size(base.shape[p] for p in self.perm)
        self.num_samples, self.vectors = base.num_samples, base.vectors

    def select(self, index: Tensor) -> PermutedForm:
        return PermutedForm(self.base.select(index), self.perm)

    def _leading(self, t: Tensor) -> Tensor:
        return t.permute(0, *(p + 1 for p in self.perm))

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        res = self._leading(self.base.batch_grad())
        return res if out is None else out.copy_(res)

    def _grad(self) -> Tensor:
        return self.base.grad().permute(self.perm)

    def _batch_l2(self) -> Tensor:
        return self.base.batch_l2()

    def _batch_dot(self) -> Tensor:
        return self.base.batch_dot()

    def _sum_grad_squared(self) -> Tensor:
        return self.base.sum_grad_squared().permute(self.perm)

    def _batch_sum_grad_squared(self) -> Tensor:
        return self._leading(self.base.batch_sum_grad_squared())

    def _cross_dot(self, other: Form) -> Tensor:
        if isinstance(other, PermutedForm) and other.perm == self.perm:
            return self.base.cross_dot(other.base)
        return Form._cross_dot(self, other)

    def _combine(self, coefficients: Tensor) -> Tensor:
        return self._leading(self.base.combine(coefficients))

    def _project(self, vectors: Tensor) -> Tensor:
        inverse = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inverse[p] = i
        return self.base.project(vectors.permute(0, *(p + 1 for p in inverse)))


def _cross_dot(a: Form, b: Form) -> Tensor:
    """Row-wise inner products ``<a_r, b_r>``, ``[K N]``."""
    if isinstance(a, ScatterForm) and isinstance(b, OuterForm):
        a, b = b, a
    if isinstance(a, OuterForm) and isinstance(b, ScatterForm):
        # <sum_t G_t A_t^T, sum_s onehot(I_s) E_s^T> = sum_{t,s} G[t, I_s] (A_t . E_s)
        K, N = a.vectors, a.num_samples
        R, T, _ = a.G.shape
        S = b.index.shape[1]
        E = b.G.view(K, N, S, -1)
        inner = torch.matmul(a.A.unsqueeze(0), E.transpose(-1, -2)).reshape(R, T, S)
        picked = a.G.gather(2, b._row_indices.unsqueeze(1).expand(R, T, S))  # G[r, t, I[r, s]]
        return (inner * picked).sum((1, 2))
    return (a.batch_grad() * b.batch_grad()).flatten(1).sum(1)


def merge_forms(forms: Sequence[Form]) -> Form:
    """One form for the sum of ``forms`` (all of one parameter, same samples and vectors).

    Outer and scatter forms of equal feature sizes are merged by concatenating their shared
    axes (exact: the per-row gradient is a sum over that axis); compositions merge part by
    part; anything else becomes a :class:`SumForm`.
    """
    if len(forms) == 1:
        return forms[0]
    first = forms[0]
    K = first.vectors
    if all(isinstance(f, OuterForm) for f in forms):
        outer: list[OuterForm] = forms  # type: ignore[assignment]
        if len({(f.A.shape[2], f.G.shape[2]) for f in outer}) == 1:
            return OuterForm(
                torch.cat([f.A for f in outer], 1),
                torch.cat([f.G for f in outer], 1),
                first.shape,
                K,
            )
    if all(isinstance(f, ScatterForm) for f in forms):
        scatter: list[ScatterForm] = forms  # type: ignore[assignment]
        return ScatterForm(
            torch.cat([f.index for f in scatter], 1),
            torch.cat([f.G for f in scatter], 1),
            scatter[0].num,
            K,
        )
    if all(isinstance(f, ConcatForm) for f in forms):
        concat: list[ConcatForm] = forms  # type: ignore[assignment]
        if len({len(f.parts) for f in concat}) == 1:
            return ConcatForm([merge_forms(parts) for parts in zip(*(f.parts for f in concat))])
    if all(isinstance(f, PermutedForm) for f in forms):
        permuted: list[PermutedForm] = forms  # type: ignore[assignment]
        if len({f.perm for f in permuted}) == 1:
            return PermutedForm(merge_forms([f.base for f in permuted]), permuted[0].perm)
    if all(isinstance(f, SampleForm) for f in forms):
        samples: list[SampleForm] = forms  # type: ignore[assignment]
        return SampleForm(sum((f.values for f in samples[1:]), samples[0].values), K)
    return SumForm(forms)
