"""The materialized form: the rows themselves (biases, normalization layers, the generic rule)."""

from __future__ import annotations

from torch import Tensor

from .base import Form, row_index


class SampleForm(Form):
    """Materialized rows ``values`` of shape ``[K N, *shape]``."""

    def __init__(self, values: Tensor, vectors: int = 1):
        self.values, self.vectors = values, vectors
        self.shape = values.shape[1:]
        self.num_samples = values.shape[0] // vectors

    def select(self, index: Tensor) -> SampleForm:
        rows = row_index(index, self.vectors, self.num_samples)
        return SampleForm(self.values.index_select(0, rows), self.vectors)

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        return self.values if out is None else out.copy_(self.values)

    def _grad(self) -> Tensor:
        return self.values.sum(0)
