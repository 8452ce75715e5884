"""Compositions of forms (tied weights, grouped and transposed convolutions) and merging the
forms of several calls of one parameter into one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import result_pool
from .base import Form
from .outer import OuterForm
from .sample import SampleForm
from .scatter import ScatterForm


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

    def worth_materializing(self, budget: int) -> bool:
        """When a part is (a weight tied between an embedding and a head applied at every
        position): the cross terms of its norms and the projections of every part each cost
        about what materializing the sum once does."""
        return any(p.worth_materializing(budget) for p in self.parts)

    def _grad(self) -> Tensor:
        return sum((p.grad() for p in self.parts[1:]), self.parts[0].grad())

    def _batch_grad(self, out: Tensor | None = None) -> Tensor:
        # scatter parts (embeddings) last: added into the others' rows in place
        first, *rest = sorted(self.parts, key=lambda p: isinstance(p, ScatterForm))
        rows = first._batch_grad(out)
        if out is None and not isinstance(first, (OuterForm, ScatterForm)):
            rows = rows.clone()  # may be the part's own tensor (a SampleForm's values)
        for p in rest:
            if isinstance(p, ScatterForm) and rows.is_contiguous():
                p.add_rows_to(rows)
            else:
                rows += p.batch_grad()
        return rows

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
        if out is None:
            out = result_pool.empty((self.rows, *self.shape), self.parts[0].batch_grad())
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
