"""Curvature blocks returned per layer by :class:`~beyondgrad.KFAC`.

:class:`KroneckerFactors` -- a block ``B kron A`` (row-major flattening of a weight ``[O, I]``:
output side ``B`` first) or ``A kron B`` (an embedding table ``[V, d]`` whose rows are the input
side), possibly block-diagonal over convolution groups (leading group axis on ``A`` and ``B``).

:class:`DiagonalFactors` -- the documented fallback for layers without Kronecker structure
(normalization layers, the generic rule): the diagonal of the same curvature.

Scaling (KFAC-tutorial convention, adapted so that the factors need no further scaling):
``A`` is the input second moment averaged over the data (``(1/(N S)) sum_{n,s} a a^T`` for
KFAC-expand, ``(1/N) sum_n abar abar^T`` with ``abar`` the mean over the shared axis for
KFAC-reduce) and ``B`` sums the output-gradient outer products of all backpropagated vectors,
which carry the loss reduction factor ``R``. With one sample and no shared axis,
``B kron A`` is exactly the GGN (type-2) block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .linalg.eigenbasis import (
    damped_inverse,
    eigenbasis_apply,
    kronecker_eigenvalues,
    symmetric_eigh,
)
from .linalg.eigenbasis import logdet as eigen_logdet


@dataclass
class KroneckerFactors:
    """A Kronecker-factored curvature block of one layer.

    ``A``: input side ``[I, I]`` (``[G, I, I]`` for G groups); with ``bias="joint"`` the last
    row/column belongs to the bias (inputs augmented by a constant 1). ``B``: output side
    ``[O, O]`` (``[G, O, O]``). ``order``: ``"B kron A"`` (weight ``[O, I]`` row-major, e.g.
    Linear/conv; a conv weight ``[O, C, *K]`` is ``[O, C*prod(K)]``) or ``"A kron B"``
    (embedding ``[V, d]``). ``params``: the parameter names covered (weight, then bias).
    ``bias``: ``"joint"`` (bias in ``A``), ``"separate"`` (``bias_block`` holds ``B`` times the
    bias's ``A``-scalar), or ``None``. ``R``: the loss reduction factor; ``num_data``: N.
    ``weight_perm``: when set, the block refers to ``weight.permute(weight_perm)`` (transposed
    convolutions: ``[C_out/G, C_in, *K]`` from ``[C_in, C_out/G, *K]``; with groups, per
    group), which ``to_dense``/``@``/``inverse`` expect flattened row-major.
    ``fisher_type`` and ``kfac_approx``: the settings of the :class:`~beyondgrad.KFAC` that
    computed the block (``"type-2"``, ``"mc"``, ``"empirical"``, ``"forward-only"``;
    ``"expand"`` or ``"reduce"``).
    """

    A: Tensor
    B: Tensor
    order: str
    params: tuple[str, ...]
    bias: str | None
    fisher_type: str
    kfac_approx: str
    R: float
    num_data: int
    bias_block: Tensor | None = None
    weight_perm: tuple[int, ...] | None = None
    _eig: tuple[Tensor, Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def groups(self) -> int:
        """``G``, the number of convolution groups (1 without a leading group axis)."""
        return self.A.shape[0] if self.A.ndim == 3 else 1

    def _ordered(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        """(first, second) Kronecker operands in ``order``."""
        return (right, left) if self.order == "A kron B" else (left, right)

    def to_dense(self) -> Tensor:
        """The block as a matrix over the flattened covered parameters (weight ``[O, I]``
        row-major; with a joint bias over ``[O, I + 1]``; groups block-diagonal)."""
        if self.A.ndim == 3:
            return torch.block_diag(
                *(torch.kron(*self._ordered(b, a)) for a, b in zip(self.A, self.B))
            )
        return torch.kron(*self._ordered(self.B, self.A))

    def eigh(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eigendecompositions ``(lambda_A, Q_A, lambda_B, Q_B)`` (batched over groups;
        robust to rank-deficient factors, see
        :func:`~beyondgrad.linalg.eigenbasis.symmetric_eigh`); cached."""
        if self._eig is None:
            la, qa = symmetric_eigh(self.A)
            lb, qb = symmetric_eigh(self.B)
            self._eig = (la, qa, lb, qb)
        return self._eig

    def kronecker_eigen(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(values [G, rows, cols], left [G, rows, rows], right [G, cols, cols])``: the
        block's eigenvalues and eigenbases in its layout ``[G, rows, cols]`` (first operand of
        ``order`` on the rows); eigenvector ``(g, i, j)`` is ``left[g][:, i] right[g][:, j]^T``."""
        la, qa, lb, qb = self.eigh()
        if la.ndim == 1:
            la, qa, lb, qb = la[None], qa[None], lb[None], qb[None]
        if self.order == "B kron A":
            return kronecker_eigenvalues(lb, la), qb, qa
        return kronecker_eigenvalues(la, lb), qa, qb

    def _matrix(self, V: Tensor) -> Tensor:
        """View ``V`` (flattened ``[P]``, ``[P, k]`` or parameter-shaped ``[O, I]``) as
        ``[G, left, right, k]`` in the Kronecker order."""
        left = self.B.shape[-1] if self.order == "B kron A" else self.A.shape[-1]
        right = self.A.shape[-1] if self.order == "B kron A" else self.B.shape[-1]
        return V.reshape(self.groups, left, right, -1)

    def _apply(self, V: Tensor, fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        M = self._matrix(V)
        return fn(
            M,
            *self._ordered(
                self.B if self.B.ndim == 3 else self.B[None],
                self.A if self.A.ndim == 3 else self.A[None],
            ),
        ).reshape(V.shape)

    def __matmul__(self, V: Tensor) -> Tensor:
        """``(first kron second) vec_r(V)`` for ``V`` of ``P`` entries (or ``[P, k]``)."""
        return self._apply(V, lambda M, L, Rt: torch.einsum("gij,gjkc,glk->gilc", L, M, Rt))

    def inverse(self, damping: float = 0.0) -> Callable[[Tensor], Tensor]:
        """``V -> (first kron second + damping I)^{-1} V``, exactly (eigendecompositions).

        Args:
            damping: added to every eigenvalue of the block.

        Returns:
            A function of ``V`` (``P`` entries: ``[P]``, ``[P, k]`` or parameter-shaped) with
            the shape of ``V`` (``bg.linops.KFAC(...).inverse`` gives operators).

        Raises:
            ValueError: the damped block is singular or indefinite.
        """
        values, left, right = self.kronecker_eigen()
        scale = damped_inverse(values, damping)

        def apply(V: Tensor) -> Tensor:
            return eigenbasis_apply(left, scale, right, self._matrix(V)).reshape(V.shape)

        return apply

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(first kron second + damping I)`` (raises if the damped block is singular
        or indefinite)."""
        return eigen_logdet(self.kronecker_eigen()[0], damping)


@dataclass
class DiagonalFactors:
    """Fallback block for layers without Kronecker structure: the diagonal of the same
    curvature (``fisher_type``), parameter-shaped, per covered parameter.

    Args:
        diagonal: ``{parameter name: parameter-shaped diagonal}`` on the loss's scale.
        fisher_type: the curvature's type, as in :class:`~beyondgrad.KFAC`.
        R: the loss reduction factor, ``loss = R * sum_n l_n`` (``1/N``, or ``1/(N S)`` for
            a mean over ``S`` further entries per sample; 1 for a sum).
        num_data: ``N``, the number of samples of the batch.
    """

    diagonal: dict[str, Tensor]
    fisher_type: str
    R: float
    num_data: int

    @property
    def params(self) -> tuple[str, ...]:
        """The covered parameter names, in the order of the flattened diagonal."""
        return tuple(self.diagonal)

    def to_dense(self) -> Tensor:
        """The block as a diagonal matrix ``[P, P]`` over the covered parameters, flattened
        and concatenated in :attr:`params` order."""
        return torch.diag(torch.cat([d.reshape(-1) for d in self.diagonal.values()]))

    def inverse(self, damping: float = 0.0) -> Callable[[Tensor], Tensor]:
        """``V -> (diag + damping)^{-1} V`` for ``V`` with the covered entries on its first
        axis (raises unless the damped diagonal is positive)."""
        flat = torch.cat([d.reshape(-1) for d in self.diagonal.values()]) + damping
        if bool((flat <= 0).any()):
            raise ValueError("the damped diagonal is not positive; increase damping")
        return lambda V: V / flat.reshape(-1, *([1] * (V.ndim - 1)))

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``sum log(diag + damping)``."""
        return (torch.cat([d.reshape(-1) for d in self.diagonal.values()]) + damping).log().sum()


def to_block_layout(
    W: Tensor, b: Tensor | None, order: str, weight_perm: tuple[int, ...] | None, groups: int
) -> Tensor:
    """Weight-shaped tensors ``W [k, *weight.shape]`` (and a joint bias ``b [k, *bias.shape]``)
    as ``[k, G, rows, cols]`` in the layout of a :class:`KroneckerFactors` block: row-major
    ``[O, I]`` per group with the bias as the last column, the embedding table as is, and for
    ``weight_perm`` (transposed convolutions) each group's slice of the leading axis permuted."""
    k = W.shape[0]
    if order == "A kron B":
        return W.reshape(k, 1, W.shape[1], -1)
    if weight_perm is not None:
        w = W.reshape(k, groups, W.shape[1] // groups, *W.shape[2:])
        w = w.permute(0, 1, *(i + 2 for i in weight_perm))
        M = w.reshape(k, groups, w.shape[2], -1)
    else:
        M = W.reshape(k, groups, W.shape[1] // groups, -1)
    if b is not None:
        M = torch.cat([M, b.reshape(k, groups, -1, 1)], -1)
    return M


def from_block_layout(
    M: Tensor,
    weight_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None,
    order: str,
    weight_perm: tuple[int, ...] | None,
    groups: int,
) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`to_block_layout`: ``M [k, G, rows, cols]`` to ``(W [k, *weight_shape],
    b [k, *bias_shape] or None)``."""
    k = M.shape[0]
    if order == "A kron B":
        return M.reshape(k, *weight_shape), None
    b = None
    if bias_shape is not None:
        M, b = M[..., :-1], M[..., -1].reshape(k, *bias_shape)
    if weight_perm is None:
        return M.reshape(k, *weight_shape), b
    per_group = (groups, weight_shape[0] // groups, *weight_shape[1:])
    permuted = [per_group[0]] + [per_group[i + 1] for i in weight_perm]
    inverse = [0] * len(weight_perm)
    for i, j in enumerate(weight_perm):
        inverse[j] = i
    w = M.reshape(k, *permuted).permute(0, 1, *(i + 2 for i in inverse))
    return w.reshape(k, *weight_shape), b


__all__ = ["DiagonalFactors", "KroneckerFactors", "from_block_layout", "to_block_layout"]
