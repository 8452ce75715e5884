"""The outer-product form of Linear layers and unfolded convolutions: rows are sums over a shared
axis of outer products of output gradients and layer inputs, reduced without forming the rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import result_pool
from .base import CHUNK_ELEMENTS, Form, row_index


def _tracked(*tensors: Tensor) -> bool:
    """Whether autograd records operations on ``tensors`` (then ``out=`` is not allowed)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


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
        rows = row_index(index, self.vectors, self.num_samples)
        return OuterForm(
            self.A.index_select(0, index), self.G.index_select(0, rows), self.shape, self.vectors
        )

    def _per_row(self, G: Tensor, A: Tensor, out: Tensor | None = None) -> Tensor:
        """``[k, n, O, I]`` products for ``G`` ``[k, n, S, O]`` and ``A`` ``[n, S, I]``: one
        batched GEMM per vector, reading ``G`` in place (stacking the vectors of a sample into
        one ``[S, k O]`` operand first costs a copy of ``G`` that outweighs the larger GEMM:
        measured 1.3-2x slower on the cnn's convolutions)."""
        k, n, S, O = G.shape
        I = A.shape[2]
        if S == 1 and out is None and _tracked(G, A):  # differentiable rows: no out=
            return G.reshape(k, n, O, 1) * A.reshape(1, n, 1, I)
        if out is None:
            out = result_pool.empty((k, n, O, I), G)
        if S == 1:
            return torch.mul(G.reshape(k, n, O, 1), A.reshape(1, n, 1, I), out=out)
        for j in range(k):
            torch.bmm(G[j].transpose(1, 2), A, out=out[j])
        return out

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

    def _A_matrix(self) -> Tensor:
        """The inputs as one ``[N S, I]`` matrix, copied once per form if they are a strided
        view (conv patches), shared by :meth:`project` and :meth:`combine`."""
        _K, N, S, I, _O = self._sizes
        return self._memo("A_matrix", lambda: self.A.reshape(N * S, I))

    def _project(self, vectors: Tensor) -> Tensor:
        # <G_r^T A_n, V_c> = sum_s G[r, s] . (V_c A[n, s]): never forms the rows
        K, N, S, I, O = self._sizes
        V = vectors.reshape(-1, I)  # [c O, I]
        AV = (self._A_matrix() @ V.T).view(1, N, S, -1, O)  # one GEMM
        return (self.G.view(K, N, S, 1, O) * AV).sum((2, 4)).reshape(K * N, -1)

    def _combine(self, coefficients: Tensor) -> Tensor:
        K, N, S, _I, O = self._sizes
        weighted = torch.einsum(
            "knc,knso->cnso", coefficients.view(K, N, -1), self.G.view(K, N, S, O)
        )
        # sum over (n, s) as one GEMM per vector with the shared input matrix (an einsum
        # with the strided conv patches copied them again: cnn EmpiricalFisher @ v ~5 ms)
        out = torch.matmul(self._A_matrix().T, weighted.reshape(-1, N * S, O))  # [c, I, O]
        return out.transpose(1, 2).reshape(-1, *self.shape)

    def _chunks(self) -> list[tuple[int, int]]:
        """Sample ranges whose rows of one vector (``[n, O, I]``) stay within the chunk bound."""
        _K, N, _S, I, O = self._sizes
        step = max(1, CHUNK_ELEMENTS // max(1, I * O))
        return [(a, min(N, a + step)) for a in range(0, N, step)]

    def _vector_rows(self, k: int, a: int, b: int) -> Tensor:
        """The rows of vector ``k`` for samples ``a:b``, ``[b - a, O, I]``."""
        K, N, S, _I, O = self._sizes
        G = self.G.view(K, N, S, O)[k, a:b]
        return torch.bmm(G.transpose(1, 2), self.A[a:b])

    def _sum_grad_squared(self) -> Tensor:
        K, N, S, I, O = self._sizes
        if S == 1:
            g2 = self.G.reshape(K, N, O).pow(2)
            g2 = g2.sum(0) if K > 1 else g2[0]
            return (g2.T @ self.A.reshape(N, I).pow(2)).reshape(self.shape)
        # materialize rows chunk by chunk, vector by vector; for one vector (the loss
        # gradient) their sum is the gradient, kept at the cost of one more reduction
        total = self.A.new_zeros(O, I)
        keep_grad = K == 1 and "grad" not in self.__dict__.get("_cache", {})
        grad = self.A.new_zeros(O, I) if keep_grad else None
        for a, b in self._chunks():
            for k in range(K):
                rows = self._vector_rows(k, a, b)
                if grad is not None:
                    grad += rows.sum(0)
                total += rows.square_().sum(0)
        if grad is not None:
            self.provide("grad", grad.reshape(self.shape))
        return total.reshape(self.shape)

    def _batch_sum_grad_squared(self) -> Tensor:
        K, N, S, I, O = self._sizes
        if S == 1:
            g2 = self.G.reshape(K, N, O).pow(2)
            g2 = g2.sum(0) if K > 1 else g2[0]
            a2 = self.A.reshape(N, I).pow(2)
            if _tracked(g2, a2):  # differentiable squares: no out=
                return (g2.unsqueeze(2) * a2.unsqueeze(1)).reshape(N, *self.shape)
            out = result_pool.empty((N, O, I), a2)
            return torch.mul(g2.unsqueeze(2), a2.unsqueeze(1), out=out).reshape(N, *self.shape)
        out = result_pool.zeros((N, O, I), self.A)
        for a, b in self._chunks():
            for k in range(K):
                out[a:b] += self._vector_rows(k, a, b).square_()
        return out.reshape(N, *self.shape)
