"""The KFAC block of a parameter shared by several modules (tied weights): the sum of the
modules' blocks, e.g. GPT-2's token embedding tied to its output layer,
``A_emb kron B_emb + B_head kron A_head`` over the table ``[V, d]``.

:class:`KroneckerSum` acts exactly (the sum of the terms' products) and knows its trace
exactly. When exactly two ungrouped Kronecker terms cover the same weight (one may also cover a
joint bias: the other is padded with zeros there), the sum has a closed form by one congruence
(:mod:`beyondgrad.linalg.kronecker_sum`): its inverse and log-determinant are exact for
``damping = 0`` or when the damping folds into a term (a factor equal to ``c I``). Any other
damped inverse is solved exactly by conjugate gradients preconditioned by the factored-damping
closed form (``method="exact"``, the default), or replaced by that closed form
(``method="factored"``: an approximation of ``(K + d I)^{-1}``, labelled as such). Spectra
(``eigh``) and log-determinants without a closed form come from the dense block when it has at
most :attr:`KroneckerSum.dense_limit` entries and are refused above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..linalg import kronecker_sum as ks
from ..linalg.eigenbasis import symmetric_eigh
from .structures import Kronecker, StructuredOperator

METHODS = ("exact", "factored")


def _padded_term(op: Kronecker, where: Tensor, cols: int) -> ks.Term | None:
    """``op`` (an ungrouped ``L kron R`` on ``[r_t, c_t]``) as a term ``(L', R')`` over the host
    layout ``[r, cols]``, zero outside its entries, or ``None`` when its entries (``where``:
    their flat host positions, in the term's layout) are no sub-grid of the host's (or of
    its transpose: then ``R`` acts on the host's rows)."""
    L, R = op.left[0], op.right[0]
    P = where.reshape(L.shape[0], R.shape[0])
    for grid, left, right in ((P, L, R), (P.T, R, L)):
        rows, colv = grid[:, 0] // cols, grid[0, :] % cols
        if bool((grid == rows[:, None] * cols + colv[None, :]).all()):
            r = int(where.max()) // cols + 1 if where.numel() else 0
            return _embed(left, rows, r), _embed(right, colv, cols)
    return None


def _embed(M: Tensor, index: Tensor, n: int) -> Tensor:
    """``M [k, k]`` at rows and columns ``index`` of an ``[n, n]`` zero matrix."""
    out = M.new_zeros(n, n)
    out[index[:, None], index[None, :]] = M
    return out


def host_terms(
    terms: Sequence[tuple[Tensor, StructuredOperator]], size: int
) -> tuple[list[ks.Term], tuple[int, int]] | None:
    """The terms as Kronecker products over one ``[r, c]`` layout (the first term's), or
    ``None`` when they have no such form (a non-Kronecker or grouped term, or entries outside
    the first term's).

    Args:
        terms: ``(index into the block, operator)`` pairs; the first term is the host and its
            index must be ``arange(size)``.
        size: the block's number of entries.

    Returns:
        ``([(L [r, r], R [c, c]) per term], (r, c))`` or ``None``.
    """
    ops = [op for _, op in terms]
    if not all(isinstance(op, Kronecker) and op.left.shape[0] == 1 for op in ops):
        return None
    host = ops[0]
    assert isinstance(host, Kronecker)
    if host.shape[0] != size:
        return None
    r, c = host.left.shape[-1], host.right.shape[-1]
    out: list[ks.Term] = []
    for index, op in terms:
        assert isinstance(op, Kronecker)
        found = _padded_term(op, index, c)
        if found is None:
            return None
        L, R = found
        out.append((_embed_rows(L, r), R))
    return out, (r, c)


def _embed_rows(L: Tensor, r: int) -> Tensor:
    """``L [k, k]`` (k <= r) as the leading block of an ``[r, r]`` zero matrix."""
    if L.shape[0] == r:
        return L
    out = L.new_zeros(r, r)
    out[: L.shape[0], : L.shape[0]] = L
    return out


def _dense_eigh(op: StructuredOperator, limit: int) -> tuple[Tensor, Tensor]:
    n = op.shape[0]
    if n > limit:
        raise ValueError(
            f"a tied-weight block of {n} entries has no closed-form spectrum or "
            f"log-determinant here, and is larger than dense_limit={limit} for a dense "
            "decomposition; raise KroneckerSum.dense_limit, or leave the tied parameter out "
            "(params=...)"
        )
    return symmetric_eigh(op.to_dense())


class KroneckerSum(StructuredOperator):
    """The sum of several modules' curvature blocks over the entries of a shared parameter.

    Args:
        terms: ``(index [n_t] into this block's entries, operator [n_t, n_t])`` per module;
            the first term's index must be ``arange(n_0)`` (the host layout).
        size: ``n``, the number of entries (the union of the terms' entries).
        method: ``"exact"`` (closed form where it exists, else preconditioned CG to ``tol``)
            or ``"factored"`` (the closed-form factored-damping approximation of damped
            inverses; needs two Kronecker terms).
        tol: the relative residual of CG solves (default ``max(1e-10, 100 eps)``).
        max_iter: the most CG iterations per solve.
        shift: a multiple of the identity added to the sum (``inverse(0)`` of an inverse).
    """

    #: the largest block whose spectrum is taken from its dense matrix
    dense_limit = 4096

    def __init__(
        self,
        terms: Sequence[tuple[Tensor, StructuredOperator]],
        size: int,
        method: str = "exact",
        tol: float | None = None,
        max_iter: int = 500,
        shift: float = 0.0,
    ):
        if method not in METHODS:
            raise ValueError(f"tied_inverse must be one of {METHODS}, got {method!r}")
        first = terms[0][1]
        super().__init__((size, size), first.dtype, first.device)
        self.terms = [(index.to(first.device), op) for index, op in terms]
        self.method, self.max_iter, self.shift = method, max_iter, shift
        self.tol = tol if tol is not None else max(1e-10, 100 * torch.finfo(first.dtype).eps)
        self.kron = host_terms(self.terms, size)
        self._eig: tuple[Tensor, Tensor] | None = None

    def _matmat(self, M: Tensor) -> Tensor:
        out = self.shift * M if self.shift else torch.zeros_like(M)
        for index, op in self.terms:
            out.index_add_(0, index, op._matmat(M[index]))
        return out

    def shifted(self, shift: float) -> KroneckerSum:
        """The same sum plus ``shift I``."""
        return KroneckerSum(
            self.terms, self.shape[0], self.method, self.tol, self.max_iter, self.shift + shift
        )

    def closed_form(self, damping: float) -> ks.KroneckerSumCongruence | None:
        """The exact congruence of ``K + damping I`` where the damping folds, else ``None``."""
        if self.kron is None or len(self.kron[0]) != 2:
            return None
        folded = ks.fold_damping(*self.kron[0], self.shift + damping)
        return None if folded is None else ks.congruence(*folded)

    def factored(self, damping: float) -> ks.KroneckerSumCongruence | None:
        """The congruence of the factored-damping approximation of ``K + damping I`` (the two
        terms of largest trace; ``None`` without a Kronecker form)."""
        if self.kron is None or len(self.kron[0]) < 2:
            return None
        terms = sorted(self.kron[0], key=lambda t: -float(t[0].trace() * t[1].trace()))[:2]
        return ks.congruence(*ks.split_damping(terms, self.shift + damping))

    def inverse(self, damping: float = 0.0) -> KroneckerSumInverse:  # type: ignore[override]
        """``(K + damping I)^{-1}``: closed form where it is exact, else CG preconditioned by
        the factored closed form (``method="exact"``); ``method="factored"``: the factored
        closed form itself (an approximation for ``damping > 0``)."""
        exact = self.closed_form(damping)
        if exact is not None:
            return KroneckerSumInverse(self, damping, exact, solve=False, approximate=False)
        approx = self.factored(damping)
        if self.method == "factored":
            if approx is None:
                raise ValueError(
                    "tied_inverse='factored' needs two Kronecker terms over one weight; use "
                    "tied_inverse='exact'"
                )
            return KroneckerSumInverse(self, damping, approx, solve=False, approximate=True)
        return KroneckerSumInverse(self, damping, approx, solve=True, approximate=False)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(K + damping I)``: closed form where the damping folds, else from the dense
        block (at most :attr:`dense_limit` entries)."""
        exact = self.closed_form(damping)
        if exact is not None:
            return exact.logdet()
        values = self.spectrum() + damping
        if bool((values <= 0).any()):
            raise ValueError("the damped tied block is singular or indefinite; add damping")
        return values.log().sum()

    def trace(self) -> Tensor:
        """``trace(K)``: the sum of the terms' traces (exact)."""
        total = torch.stack([op.trace() for _, op in self.terms]).sum()
        return total + self.shift * self.shape[0]

    def spectrum(self) -> Tensor:
        """All eigenvalues (from the dense block; at most :attr:`dense_limit` entries)."""
        if self._eig is None:
            self._eig = _dense_eigh(self, self.dense_limit)
        return self._eig[0]

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors ``[n, m]`` of ``spectrum()[index]`` (dense block)."""
        self.spectrum()
        assert self._eig is not None
        return self._eig[1][:, index]


class KroneckerSumInverse(StructuredOperator):
    """``(K + damping I)^{-1}`` of a :class:`KroneckerSum` ``K``: through a congruence
    (``solve=False``: exact, or the factored approximation when ``approximate``) or by CG
    preconditioned by it (``solve=True``).

    Attributes:
        approximate: whether this is the factored-damping approximation, not the inverse.
    """

    def __init__(
        self,
        block: KroneckerSum,
        damping: float,
        congruence: ks.KroneckerSumCongruence | None,
        solve: bool,
        approximate: bool,
    ):
        super().__init__(block.shape, block.dtype, block.device)  # type: ignore[arg-type]
        self.block, self.damping, self.congruence = block, damping, congruence
        self.solve, self.approximate = solve, approximate
        self.info: dict = {}

    def _apply_congruence(self, M: Tensor) -> Tensor:
        assert self.congruence is not None
        r, c = self.congruence.values.shape
        return self.congruence.solve(M.reshape(r, c, -1)).reshape(M.shape)

    def _matmat(self, M: Tensor) -> Tensor:
        if not self.solve:
            return self._apply_congruence(M)
        d = self.damping
        X, self.info = ks.block_cg(
            lambda V: self.block._matmat(V) + d * V,
            M,
            self._apply_congruence if self.congruence is not None else None,
            self.block.tol,
            self.block.max_iter,
        )
        return X

    def inverse(self, damping: float = 0.0) -> StructuredOperator:  # type: ignore[override]
        """``damping = 0``: the damped block ``K + d I`` again (exact inverses only)."""
        if damping != 0 or self.approximate:
            raise ValueError(
                "the inverse of a tied block's inverse exists only undamped and for the exact "
                "inverse"
            )
        return self.block.shifted(self.damping)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det`` of this operator (plus ``damping I``: dense only)."""
        if damping == 0 and not self.solve:
            assert self.congruence is not None
            return -self.congruence.logdet()
        if damping == 0:
            return -self.block.logdet(self.damping)
        values = self.spectrum() + damping
        return values.log().sum()

    def trace(self) -> Tensor:
        """``trace``: closed form through the congruence, else from the dense block."""
        if not self.solve:
            assert self.congruence is not None
            return self.congruence.inverse_trace()
        return self.spectrum().sum()

    def spectrum(self) -> Tensor:
        """All eigenvalues: ``1 / (eig(K) + damping)`` for the exact inverse (dense block),
        the dense approximation's otherwise."""
        if self.approximate:
            return _dense_eigh(self, self.block.dense_limit)[0]
        values = self.block.spectrum() + self.damping
        if bool((values <= 0).any()):
            raise ValueError("the damped tied block is singular or indefinite; add damping")
        return 1.0 / values

    def eigenvectors(self, index: Tensor) -> Tensor:
        """Unit eigenvectors of ``spectrum()[index]``."""
        if self.approximate:
            return _dense_eigh(self, self.block.dense_limit)[1][:, index]
        return self.block.eigenvectors(index)


__all__ = ["METHODS", "KroneckerSum", "KroneckerSumInverse", "host_terms"]
