"""The scatter form of embeddings: rows are one-hot scatters of output gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import result_pool
from .base import Form, row_index


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
        rows = row_index(index, self.vectors, self.num_samples)
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
        R = self.rows
        res = result_pool.zeros((R, *self.shape), self.G) if out is None else out.zero_()
        return self.add_rows_to(res)

    def add_rows_to(self, rows: Tensor) -> Tensor:
        """``rows += g`` in place for ``rows`` ``[K N, num, d]`` (contiguous): the scatter
        added to rows formed elsewhere (a tied weight's other use) without materializing
        its own. Returns ``rows``."""
        R, S = self.rows, self.index.shape[1]
        idx, G = self._flat()
        row = torch.arange(R, device=idx.device).repeat_interleave(S)
        rows.view(R * self.num, -1).index_add_(0, row * self.num + idx, G)
        return rows

    def _batch_l2(self) -> Tensor:
        """Squared norms of the rows: by the Gram trick over positions (``S^2 d`` per row)
        when positions are few against the table, else from the scattered rows themselves
        (``(S + num) d`` per row: e.g. a relative-position bias with thousands of ``[T, T]``
        positions over a few dozen buckets)."""
        S = self.index.shape[1]
        if S * S > 16 * self.num:  # bmm is far faster per flop than index_add_
            return self._batch_grad().pow(2).sum((1, 2))
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
