"""Structured symmetric operators with closed forms, as building blocks that compose.

Every block is a :class:`StructuredOperator`: besides products it knows its spectrum
(``spectrum()``: all eigenvalues in its own order, ``eigenvectors(index)`` for chosen ones),
``inverse(damping)`` (always another structured operator), ``logdet(damping)`` and
``trace()``. ``eigvalsh()`` and ``eigh(k, which)`` follow from the spectrum.

* :class:`Diagonal` -- ``diag(values)``.
* :class:`Kronecker` -- ``L kron R`` per group (``[G, r, r]``, ``[G, c, c]``) on vectors laid
  out ``[G, r, c]`` row-major (``L M R^T`` per group).
* :class:`KroneckerEigen` -- ``(Q_L kron Q_R) diag(s) (Q_L kron Q_R)^T``: a Kronecker
  eigenbasis with any eigenvalues (EKFAC; every inverse of a Kronecker block).
* :class:`BlockDiagonal` -- blocks acting on disjoint index sets of the vector (any
  permutation: the KFAC blocks of a model, in parameter order).
* :class:`~beyondgrad.linops.LowRank` -- ``U diag(lambda) U^T + shift I``.

Sums of operators (``A + B``, :class:`~beyondgrad.linops.base.Sum`) have no closed forms; their
``inverse`` runs a solver.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import group as dist_group
from ..linalg import eigenbasis as eb
from ..linalg import normal_range
from . import _engine
from .base import LinearOperator, columns_first, copy_rows_
from .data import DataSet


def select(values: Tensor, k: int | None, which: str, n: int) -> Tensor:
    """Indices of the ``k`` largest (``which="largest"``) or smallest entries of ``values`` in
    that order (``k=None``: all ``n``)."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return torch.sort(values, descending=which == "largest", stable=True).indices[:k]


class StructuredOperator(LinearOperator):
    """A symmetric operator with a closed-form spectrum, inverse, log-determinant and trace."""

    symmetric = True

    def spectrum(self) -> Tensor:
        """All ``n`` eigenvalues, in the operator's own (unsorted) order."""
        raise NotImplementedError

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors ``[n, m]`` of the eigenvalues ``spectrum()[index]``."""
        raise NotImplementedError

    def inverse(self, damping: float = 0.0) -> StructuredOperator:  # type: ignore[override]
        """``(A + damping I)^{-1}`` as a structured operator."""
        raise NotImplementedError

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + damping I)``."""
        raise NotImplementedError

    def trace(self) -> Tensor:
        """``trace(A)``."""
        raise NotImplementedError

    def eigvalsh(self) -> Tensor:
        """All ``n`` eigenvalues, ascending."""
        return torch.sort(self.spectrum()).values

    def eigh(self, k: int | None = None, which: str = "largest") -> tuple[Tensor, Tensor]:
        """The ``k`` largest (or smallest) eigenpairs in closed form, in ``which`` order
        (like :func:`beyondgrad.linalg.eigsh`).

        Args:
            k: number of pairs; ``None``: all ``n`` (a dense ``[n, n]`` matrix).
            which: ``"largest"`` or ``"smallest"`` (algebraically).

        Returns:
            ``(eigenvalues [k], eigenvectors [n, k])``.
        """
        values = self.spectrum()
        index = select(values, k, which, values.numel())
        return values[index], self.eigenvectors(index)


class Diagonal(StructuredOperator):
    """``diag(values)``, e.g. the engine's ``DiagGGN`` summed over a data set.

    Args:
        diagonal: ``[n]`` values, or parameter-shaped tensors by name (flattened in order).
    """

    def __init__(self, diagonal: Mapping[str, Tensor] | Tensor):
        values = (
            diagonal
            if isinstance(diagonal, Tensor)
            else torch.cat([d.reshape(-1) for d in diagonal.values()])
        )
        super().__init__((values.numel(),) * 2, values.dtype, values.device)  # type: ignore[arg-type]
        self.values = values

    def _matmat(self, M: Tensor) -> Tensor:
        return self.values.unsqueeze(1) * M

    def inverse(self, damping: float = 0.0) -> Diagonal:  # type: ignore[override]
        """``diag(1 / (values + damping))`` (raises on a zero entry)."""
        d = self.values + damping
        if bool((d == 0).any()):
            raise ValueError("singular diagonal; add damping")
        return Diagonal(1.0 / d)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + damping I)`` from the closed-form spectrum."""
        return (self.values + damping).log().sum()

    def trace(self) -> Tensor:
        """``trace(A)`` in closed form."""
        return self.values.sum()

    def spectrum(self) -> Tensor:
        """All ``n`` eigenvalues, in the block's own order."""
        return self.values

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors ``[n, m]`` of the eigenvalues ``spectrum()[index]``."""
        U = torch.zeros(self.shape[0], index.numel(), dtype=self.dtype, device=self.device)
        U[index, torch.arange(index.numel(), device=self.device)] = 1.0
        return U

    @classmethod
    def from_engine(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[tuple[Any, Tensor]],
        quantity: Any,
        params: Sequence[str] | None = None,
        num_data: int | None = None,
        generator: torch.Generator | None = None,
        process_group: Any = None,
    ) -> Diagonal:
        """A diagonal quantity (``DiagGGN``, ``DiagGGN(mc_samples=M)``, ``DiagHessian``)
        summed over the batches of ``data`` (streamed once) with the data-set weights of
        :class:`~beyondgrad.linops.CurvatureOperator`, over ``params`` (default: all
        trainable parameters).

        Args:
            model: the model.
            loss_fn: a supported loss module; its reduction sets the batch weights.
            data: an iterable of ``(X, y)`` batches, read once (a one-shot iterator works
                with ``num_data``).
            quantity: the engine quantity giving a parameter-shaped diagonal per batch.
            params: parameter names (default: all trainable ones).
            num_data: the data-set size (default: counted in the pass).
            generator: the random generator of MC quantities.
            process_group: as for the operators (:mod:`beyondgrad.distributed`): under an
                initialized ``torch.distributed`` with several ranks, ``data`` is this rank's
                shard and the diagonal (and ``num_data``) are summed over the ranks;
                ``"local"``: no reduction.

        Returns:
            A :class:`Diagonal` ``[P]`` of the data-set loss ``R_D * sum_n l_n`` (``R_D =
            1/num_data`` for a mean, 1 for a sum), flattened in ``params`` order.
        """
        names = params or [n for n, p in model.named_parameters() if p.requires_grad]
        ds = DataSet(
            data, loss_fn, num_data, passes="one", who="Diagonal.from_engine",
            process_group=process_group,
        )  # fmt: skip
        total: dict[str, Tensor] = {}
        for X, y, N in ds.batches():
            values = _engine.batch_diagonal(model, loss_fn, X, y, quantity, generator)
            w = float(N) if ds.mean else 1.0  # a sum over the batch's samples
            for n in names:
                total[n] = total[n] + w * values[n] if n in total else w * values[n]
        if ds.group is not None:  # each rank summed its shard; a rank may have none
            named = dict(model.named_parameters())
            total = {n: total[n] if n in total else torch.zeros_like(named[n]) for n in names}
            dist_group.all_reduce_tensors_([total[n] for n in names], ds.group)
        scale = ds.normalizer()
        return cls({n: total[n] * scale for n in names})


def _grouped(t: Tensor) -> Tensor:
    return t if t.ndim == 3 else t[None]


_Stamp = tuple[tuple[Tensor, ...], tuple[object, ...]]


def _stamp(*tensors: Tensor) -> _Stamp:
    """The tensors and their in-place version counters: a cache key for what is derived from
    them (an inference tensor has no counter: a fresh object, equal to nothing)."""
    versions: list[object] = []
    for t in tensors:
        try:
            versions.append(t._version)
        except RuntimeError:
            versions.append(object())
    return tensors, tuple(versions)


def _same_stamp(a: _Stamp, b: _Stamp) -> bool:
    """Whether two stamps name the same tensors, unchanged in between."""
    return all(x is y for x, y in zip(a[0], b[0])) and a[1] == b[1]


class KroneckerEigen(StructuredOperator):
    """``(Q_L kron Q_R) diag(values) (Q_L kron Q_R)^T`` per group, on vectors laid out
    ``[G, r, c]`` row-major.

    Args:
        q_left: ``[G, r, r]`` orthonormal columns.
        values: ``[G, r, c]`` eigenvalues (entry ``(g, i, j)`` belongs to the eigenvector
            ``q_left[g][:, i] q_right[g][:, j]^T``).
        q_right: ``[G, c, c]`` orthonormal columns.
    """

    def __init__(self, q_left: Tensor, values: Tensor, q_right: Tensor):
        self.q_left, self.q_right = _grouped(q_left), _grouped(q_right)
        self.values = _grouped(values)
        n = self.values.numel()
        super().__init__((n, n), values.dtype, values.device)
        self._scaled: tuple[_Stamp, tuple[Tensor, Tensor | None]] | None = None

    def product_values(self) -> tuple[Tensor, Tensor | None]:
        """``(values, None)``, or where products would run through subnormal numbers (tiny
        eigenvalues, :mod:`~beyondgrad.linalg.normal_range`), the eigenvalues scaled into the
        normal range and the scales ``[G]`` (float64 where the dtype cannot hold them) to
        multiply a product by. Made again when the values were replaced or changed in place."""
        key = _stamp(self.values)
        if self._scaled is None or not _same_stamp(self._scaled[0], key):
            found = normal_range.scaled_factors(self.values)
            made = (self.values, None) if found is None else (found[0][0], found[1])
            self._scaled = (key, made)
        return self._scaled[1]

    def _matmat(self, M: Tensor) -> Tensor:
        values, scale = self.product_values()
        G, k = values.shape[0], M.shape[1]
        if k == 1:
            X = M.reshape(*values.shape, 1)
            Y = eb.eigenbasis_apply(self.q_left, values, self.q_right, X)
            return (Y if scale is None else Y.mul_(scale.view(G, 1, 1, 1))).reshape(M.shape)
        X = _vectors_first(M, *values.shape)  # as Kronecker's
        ql, qr = self.q_left.unsqueeze(1), self.q_right.unsqueeze(1)
        coords = (ql.mT @ X @ qr).mul_(values.unsqueeze(1))
        Y = ql @ coords @ qr.mT
        return _column_major(Y if scale is None else Y.mul_(scale.view(G, 1, 1, 1)))

    def inverse(self, damping: float = 0.0) -> KroneckerEigen:  # type: ignore[override]
        """The same basis with eigenvalues ``1 / (values + damping)`` (raises unless all
        are positive)."""
        return KroneckerEigen(self.q_left, eb.damped_inverse(self.values, damping), self.q_right)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + damping I)`` from the closed-form spectrum."""
        return eb.logdet(self.values, damping)

    def trace(self) -> Tensor:
        """``trace(A)`` in closed form."""
        return self.values.sum()

    def spectrum(self) -> Tensor:
        """All ``n`` eigenvalues, in the block's own order."""
        return self.values.reshape(-1)

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors ``[n, m]`` of the eigenvalues ``spectrum()[index]``."""
        G, r, c = self.values.shape
        g, rem = index // (r * c), index % (r * c)
        i, j = rem // c, rem % c
        outer = self.q_left[g, :, i].unsqueeze(2) * self.q_right[g, :, j].unsqueeze(1)
        U = torch.zeros(index.numel(), G, r, c, dtype=self.dtype, device=self.device)
        U[torch.arange(index.numel(), device=index.device), g] = outer
        return U.reshape(index.numel(), -1).T


def _vectors_first(M: Tensor, G: int, r: int, c: int) -> Tensor:
    """A block ``M`` ``[G r c, k]`` as ``[G, k, r, c]`` (the blocked transpose of
    :func:`~beyondgrad.linops.base.columns_first`; a view for a column-major ``M``)."""
    return columns_first(M).view(M.shape[1], G, r, c).transpose(0, 1)


def _column_major(Y: Tensor) -> Tensor:
    """``[G, k, r, c]`` products as the column-major ``[G r c, k]`` result (a view for one
    group)."""
    return Y.transpose(0, 1).reshape(Y.shape[1], -1).T


class Kronecker(StructuredOperator):
    """``L kron R`` per group (block-diagonal over groups) on vectors laid out ``[G, r, c]``
    row-major: ``M -> L M R^T``. A weight ``W [O, I]`` flattened row-major with the KFAC
    block ``B kron A`` is ``Kronecker(B, A)``.

    Args:
        left: ``[G, r, r]`` (or ``[r, r]``) symmetric.
        right: ``[G, c, c]`` (or ``[c, c]``) symmetric.

    The eigendecomposition (robust: :func:`~beyondgrad.linalg.eigenbasis.symmetric_eigh`) is
    computed once, on the first call that needs it (inverse, logdet, spectrum). Factors so small
    that products would run through subnormal numbers (a confident classifier's output layer)
    are multiplied in a scaled copy (:mod:`~beyondgrad.linalg.normal_range`), made on the first
    product.
    """

    def __init__(self, left: Tensor, right: Tensor):
        self.left, self.right = _grouped(left), _grouped(right)
        if self.left.shape[0] != self.right.shape[0]:
            raise ValueError(f"group counts differ: {self.left.shape} and {self.right.shape}")
        G, r, c = self.left.shape[0], self.left.shape[-1], self.right.shape[-1]
        super().__init__((G * r * c,) * 2, left.dtype, left.device)  # type: ignore[arg-type]
        self._eigen: KroneckerEigen | None = None
        self._factors: tuple[_Stamp, tuple[Tensor, Tensor, Tensor | None]] | None = None

    def product_factors(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(L, R, scale)`` with ``self.left kron self.right = scale * (L kron R)`` per group
        (up to the entries below :func:`~beyondgrad.linalg.normal_range.zeroed_below` of the
        largest): the factors themselves and ``None``, or where products with them would reach
        the subnormal range, copies scaled into the normal range and the scales ``[G]`` (float64
        where the dtype cannot hold them). Made again when a factor was replaced or changed in
        place."""
        key = _stamp(self.left, self.right)
        if self._factors is None or not _same_stamp(self._factors[0], key):
            found = normal_range.scaled_factors(self.left, self.right)
            made = (self.left, self.right, None) if found is None else (*found[0], found[1])
            self._factors = (key, made)
        return self._factors[1]

    def _matmat(self, M: Tensor) -> Tensor:
        G, r, c = self.left.shape[0], self.left.shape[-1], self.right.shape[-1]
        left, right, scale = self.product_factors()
        k = M.shape[1]
        if k == 1:  # two batched products: ~15% faster than the einsum's layouts
            Y = left @ M.reshape(G, r, c) @ right.mT
            return (Y if scale is None else Y.mul_(scale.view(G, 1, 1))).reshape(M.shape)
        # the k vectors first, batched products, a column-major result. Measured (2 threads,
        # k = 16) against one einsum on [G, r, c, k]: [1, 512, 785] 84 -> 76 ms, [1, 256, 513]
        # 17.0 -> 15.1 ms
        X = _vectors_first(M, G, r, c)
        Y = left.unsqueeze(1) @ X @ right.mT.unsqueeze(1)
        return _column_major(Y if scale is None else Y.mul_(scale.view(G, 1, 1, 1)))

    def eigen(self) -> KroneckerEigen:
        """The same operator in its eigenbasis (computed once)."""
        if self._eigen is None:
            l_left, q_left = eb.symmetric_eigh(self.left)
            l_right, q_right = eb.symmetric_eigh(self.right)
            values = eb.kronecker_eigenvalues(l_left, l_right)
            self._eigen = KroneckerEigen(q_left, values, q_right)
        return self._eigen

    def inverse(self, damping: float = 0.0) -> KroneckerEigen:  # type: ignore[override]
        """``(A + damping I)^{-1}`` in closed form (see the class docstring)."""
        return self.eigen().inverse(damping)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + damping I)`` from the closed-form spectrum."""
        return self.eigen().logdet(damping)

    def trace(self) -> Tensor:
        """``trace(A)`` in closed form."""
        tr_left = torch.diagonal(self.left, dim1=-2, dim2=-1).sum(-1)
        tr_right = torch.diagonal(self.right, dim1=-2, dim2=-1).sum(-1)
        return (tr_left * tr_right).sum()

    def spectrum(self) -> Tensor:
        """All ``n`` eigenvalues, in the block's own order."""
        return self.eigen().spectrum()

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors ``[n, m]`` of the eigenvalues ``spectrum()[index]``."""
        return self.eigen().eigenvectors(index)


@dataclass(frozen=True)
class _RowsWithLastColumn:
    """A block index of the layout ``[rows, cols + 1]`` read from two contiguous ranges of the
    vector: a row-major ``[rows, cols]`` range starting at ``first`` (a weight) and a column of
    ``rows`` entries starting at ``last`` (its bias): the layout of a Kronecker block with a
    joint bias. Read and written through views (one copy each way) instead of a gather and a
    scatter by an index tensor (measured, ``[512, 1153]``, one vector: 0.1 vs 1.2 ms each)."""

    first: int
    last: int
    rows: int
    cols: int

    def gather(self, M: Tensor) -> Tensor:
        """``M[index]`` (``M`` ``[n, k]``, any strides), as a new ``[rows * (cols + 1), k]``
        tensor."""
        weight = M[self.first : self.first + self.rows * self.cols].unflatten(0, self.shape)
        bias = M[self.last : self.last + self.rows].unsqueeze(1)
        return torch.cat([weight, bias], 1).flatten(0, 1)

    def scatter(self, out: Tensor, values: Tensor) -> None:
        """``out[index] = values`` (``values`` ``[rows * (cols + 1), k]``; the targets are
        views of ``out`` whatever its strides: ``unflatten`` of the leading axis always is)."""
        V = values.unflatten(0, (self.rows, self.cols + 1))
        weight = out[self.first : self.first + self.rows * self.cols].unflatten(0, self.shape)
        weight.copy_(V[:, : self.cols])
        out[self.last : self.last + self.rows].copy_(V[:, self.cols])

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the first range."""
        return (self.rows, self.cols)

    def index(self, device: torch.device) -> Tensor:
        """The flat index this layout stands for."""
        weight = self.first + torch.arange(self.rows * self.cols, device=device)
        bias = self.last + torch.arange(self.rows, device=device)
        return torch.cat([weight.view(self.shape), bias[:, None]], 1).view(-1)


def _view_or_index(index: Tensor) -> Tensor | slice | _RowsWithLastColumn:
    """A contiguous ascending index as a slice (views instead of gathers), the layout of
    :class:`_RowsWithLastColumn` as such, else the index."""
    if index.numel() == 0:
        return index
    start, n = int(index[0]), index.numel()
    ramp = torch.arange(start, start + n, device=index.device)
    same = index == ramp
    if bool(same.all()):
        return slice(start, start + n)
    cols = int(same.long().argmin())  # the first entry off the ramp: the last column's first
    if cols == 0 or n % (cols + 1):
        return index
    rows = n // (cols + 1)
    pattern = _RowsWithLastColumn(start, int(index[cols]), rows, cols)
    return pattern if bool((pattern.index(index.device) == index).all()) else index


class BlockDiagonal(StructuredOperator):
    """Structured blocks acting on disjoint sets of the vector's entries: block ``b`` maps
    ``v[index_b]`` to ``(A v)[index_b]`` (``index_b`` in the block's own order, so any
    permutation between the vector and the block's layout is part of the index).

    Args:
        blocks: ``(index [n_b] long tensor, operator of shape (n_b, n_b))`` pairs whose
            indices partition ``range(size)``.
        size: the length ``n`` of the vectors.
    """

    def __init__(self, blocks: Sequence[tuple[Tensor, StructuredOperator]], size: int):
        if not blocks:
            raise ValueError("BlockDiagonal needs at least one block")
        counts = torch.zeros(size, dtype=torch.long)
        for index, op in blocks:
            if index.numel() != op.shape[0]:
                raise ValueError(f"an index of {index.numel()} entries for a {op.shape} block")
            counts.index_add_(0, index.cpu(), torch.ones_like(index, device="cpu"))
        if not bool((counts == 1).all()):
            raise ValueError("the block indices must cover every entry exactly once")
        first = blocks[0][1]
        super().__init__((size, size), first.dtype, first.device)
        self.indices = [index.to(first.device) for index, _ in blocks]
        self.operators = [op for _, op in blocks]
        self._where = [_view_or_index(index) for index in self.indices]

    def _children(self) -> Sequence[LinearOperator]:
        return self.operators

    def _matmat(self, M: Tensor) -> Tensor:
        # column-major for a block (the blocks' products are): no transposing copy per block
        out = torch.empty_like(M) if M.shape[1] == 1 else M.new_empty(M.shape[1], M.shape[0]).T
        for where, op in zip(self._where, self.operators):
            if isinstance(where, _RowsWithLastColumn):
                where.scatter(out, op._matmat(where.gather(M)))
            elif isinstance(where, slice):  # a row-major result (a diagonal's) into `out`
                copy_rows_(out[where], op._matmat(M[where]))
            else:
                out[where] = op._matmat(M[where])
        return out

    def inverse(self, damping: float = 0.0) -> BlockDiagonal:  # type: ignore[override]
        """The block-wise inverses, in the same layout.

        Args:
            damping: added to every block's diagonal before inverting.

        Returns:
            A :class:`BlockDiagonal` of the blocks' ``(block + damping I)^{-1}``.
        """
        inverses = [op.inverse(damping) for op in self.operators]
        return BlockDiagonal(list(zip(self.indices, inverses)), self.shape[0])

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + damping I)`` from the closed-form spectrum."""
        return torch.stack([op.logdet(damping) for op in self.operators]).sum()

    def trace(self) -> Tensor:
        """``trace(A)`` in closed form."""
        return torch.stack([op.trace() for op in self.operators]).sum()

    def spectrum(self) -> Tensor:
        """All ``n`` eigenvalues, in the block's own order."""
        return torch.cat([op.spectrum() for op in self.operators])

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors ``[n, m]`` of the eigenvalues ``spectrum()[index]``."""
        sizes = torch.tensor([op.shape[0] for op in self.operators], device=index.device)
        starts = torch.cumsum(sizes, 0) - sizes
        owner = torch.searchsorted(torch.cumsum(sizes, 0), index, right=True)
        U = torch.zeros(self.shape[0], index.numel(), dtype=self.dtype, device=self.device)
        for b in torch.unique(owner).tolist():
            cols = (owner == b).nonzero().flatten()
            local = self.operators[b].eigenvectors(index[cols] - starts[b])
            U[self.indices[b].unsqueeze(1), cols.unsqueeze(0)] = local
        return U


__all__ = [
    "BlockDiagonal",
    "Diagonal",
    "Kronecker",
    "KroneckerEigen",
    "StructuredOperator",
    "select",
]
