"""Linear operators on flat parameter-space vectors, in PyTorch.

:class:`LinearOperator` needs one method, ``_matmat(M)`` for a block ``M`` of shape ``[n, k]``;
everything else is inherited: ``A @ v`` (``[n]``), ``A @ V`` (``[n, k]``), ``A @ B`` (another
operator), ``+``, ``-``, scalar ``*``, ``.T``, ``to_dense()`` and ``to_scipy()`` (a
``scipy.sparse.linalg.LinearOperator`` for SciPy's solvers, float64 on the host).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..linalg.solve import InverseOperator

TRANSPOSE_CHUNK_BYTES = 512 * 1024
"""Bytes of the source read per step of :func:`columns_first`'s blocked transpose: measured on
this project's CPU (2 threads), ``[401408, 16]`` float32 -> ``[16, 401408]`` takes 10.5 ms as
one ``.T.contiguous()``, 2.1 ms in blocks of 512 KiB (256 KiB: 3.0, 1 MiB: 2.3); ``[131072,
16]`` 1.8 vs 0.5 ms; ``[10^6, 2]`` 3.6 vs 0.3 ms (the strided copy of a whole tall block
misses the cache on every row)."""


def copy_rows_(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)`` for ``[n, k]`` blocks, in cache-sized row blocks
    (:data:`TRANSPOSE_CHUNK_BYTES`) where the two layouts differ on the CPU (one strided copy
    of a whole tall block between row- and column-major misses the cache on every row).
    Returns ``dst``."""
    n, k = src.shape
    rows = max(1, TRANSPOSE_CHUNK_BYTES // max(1, k * src.element_size()))
    if n <= rows or src.device.type != "cpu" or dst.stride() == src.stride():
        return dst.copy_(src)
    for start in range(0, n, rows):
        dst[start : start + rows].copy_(src[start : start + rows])
    return dst


def columns_first(B: Tensor) -> Tensor:
    """``B.T`` ``[k, n]`` as a contiguous tensor, for ``B`` ``[n, k]`` (a view where it already
    is; else a transposing copy in cache-sized row blocks, :func:`copy_rows_`)."""
    if B.T.is_contiguous():
        return B.T
    out = torch.empty(B.shape[1], B.shape[0], dtype=B.dtype, device=B.device)
    copy_rows_(out.T, B)
    return out


class LinearOperator:
    """A linear map ``R^n -> R^m`` of shape ``(m, n)`` acting on ``dtype``/``device`` tensors."""

    symmetric: bool = False
    #: ``_matmat`` returns tensors nobody else holds, so algorithms may update them in place
    #: (``bg.linalg``'s Lanczos does); a subclass returning a buffer it keeps must set False
    returns_new_tensors: bool = True

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device):
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype, self.device = dtype, device

    # -- to implement --------------------------------------------------------------------------
    def _matmat(self, M: Tensor) -> Tensor:
        """``A @ M`` for ``M`` of shape ``[n, k]``."""
        raise NotImplementedError

    def _rmatmat(self, M: Tensor) -> Tensor:
        """``A^T @ M`` for ``M`` of shape ``[m, k]``."""
        if self.symmetric:
            return self._matmat(M)
        raise NotImplementedError(f"{type(self).__name__} has no transpose product")

    # -- inherited -----------------------------------------------------------------------------
    @contextmanager
    def repeated_products(self) -> Iterator[LinearOperator]:
        """A context for many products in a row (iterative algorithms enter it): operators
        with reusable per-batch state (graphs, forms) keep it meanwhile; composite operators
        enter it on their parts."""
        with ExitStack() as stack:
            for child in self._children():
                stack.enter_context(child.repeated_products())
            yield self

    def _children(self) -> Sequence[LinearOperator]:
        return ()

    def __matmul__(self, other: Tensor | LinearOperator) -> Tensor | LinearOperator:
        if isinstance(other, LinearOperator):
            return _Product(self, other)
        if not isinstance(other, Tensor):
            raise TypeError(
                f"{type(self).__name__} acts on flat vectors [n] and blocks [n, k] (or other "
                f"operators), got a {type(other).__name__}; vectors in the parameters' layout "
                "(lists, tuples, dicts of per-parameter tensors) are taken by the data-set "
                "operators (Hessian, GGN, EmpiricalFisher, Fisher) and by KFAC/EKFAC "
                "themselves, not by their inverses or compositions"
            )
        if other.ndim not in (1, 2) or other.shape[0] != self.shape[1]:
            n = self.shape[1]
            raise ValueError(f"expected a vector [{n}] or block [{n}, k], got {tuple(other.shape)}")
        M = other.to(self.dtype) if other.dtype != self.dtype else other
        out = self._matmat(M if M.ndim == 2 else M.unsqueeze(1))
        return out if other.ndim == 2 else out.squeeze(1)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        return Sum([self, other], [1.0, 1.0])

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return Sum([self, other], [1.0, -1.0])

    def __mul__(self, scalar: float) -> LinearOperator:
        return Sum([self], [float(scalar)])

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return Sum([self], [-1.0])

    def inverse(self, damping: float = 0.0, method: str = "cg", **kwargs: Any) -> LinearOperator:
        """``(A + damping I)^{-1}`` as an operator whose products run a solver of
        :func:`beyondgrad.linalg.solve` (``method``: ``"cg"``, ``"minres"``, ``"neumann"``;
        ``kwargs`` go to it). Structured operators (KFAC, EKFAC, diagonal, low-rank) override
        this with closed forms.

        Args:
            damping: added to the diagonal.
            method: the solver.

        Returns:
            A :class:`LinearOperator` of the same shape.
        """
        return SolverInverse(self, damping, method, **kwargs)

    @property
    def T(self) -> LinearOperator:
        """The transpose (the operator itself when symmetric)."""
        return self if self.symmetric else _Transposed(self)

    def to_dense(self, chunk: int = 256) -> Tensor:
        """The matrix, built from products with identity blocks (small problems).

        Args:
            chunk: identity columns per product (memory vs. number of passes).

        Returns:
            The dense matrix of the operator's shape, dtype and device.
        """
        n = self.shape[1]
        cols = []
        for start in range(0, n, chunk):
            width = min(chunk, n - start)
            block = torch.zeros(n, width, dtype=self.dtype, device=self.device)
            idx = torch.arange(width, device=self.device)
            block[start + idx, idx] = 1.0
            cols.append(self._matmat(block))
        return torch.cat(cols, 1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def mat(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            return (self @ t).detach().cpu().double().numpy()

        def rmat(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            t2 = t if t.ndim == 2 else t.unsqueeze(1)
            out = self._rmatmat(t2)
            return (out if t.ndim == 2 else out.squeeze(1)).detach().cpu().double().numpy()

        return ScipyOperator(
            self.shape, matvec=mat, matmat=mat, rmatvec=rmat, rmatmat=rmat, dtype=np.float64
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class Sum(LinearOperator):
    """``sum_i weights[i] * ops[i]`` (what ``+``, ``-`` and scalar ``*`` build)."""

    def __init__(self, ops: Sequence[LinearOperator], weights: Sequence[float]):
        first = ops[0]
        if any(op.shape != first.shape for op in ops):
            raise ValueError(f"shapes differ: {[op.shape for op in ops]}")
        super().__init__(first.shape, first.dtype, first.device)
        self.ops, self.weights = list(ops), list(weights)
        self.symmetric = all(op.symmetric for op in ops)

    def _children(self) -> Sequence[LinearOperator]:
        return self.ops

    def _matmat(self, M: Tensor) -> Tensor:
        return sum(w * op._matmat(M) for op, w in zip(self.ops, self.weights))  # type: ignore[return-value]

    def _rmatmat(self, M: Tensor) -> Tensor:
        return sum(w * op._rmatmat(M) for op, w in zip(self.ops, self.weights))  # type: ignore[return-value]


_Sum = Sum  # the former private name


class _Product(LinearOperator):
    def __init__(self, left: LinearOperator, right: LinearOperator):
        if left.shape[1] != right.shape[0]:
            raise ValueError(f"cannot compose {left.shape} with {right.shape}")
        super().__init__((left.shape[0], right.shape[1]), left.dtype, left.device)
        self.left, self.right = left, right

    def _children(self) -> Sequence[LinearOperator]:
        return (self.left, self.right)

    def _matmat(self, M: Tensor) -> Tensor:
        return self.left._matmat(self.right._matmat(M))

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.right._rmatmat(self.left._rmatmat(M))


class _Transposed(LinearOperator):
    def __init__(self, op: LinearOperator):
        super().__init__((op.shape[1], op.shape[0]), op.dtype, op.device)
        self.op = op

    def _children(self) -> Sequence[LinearOperator]:
        return (self.op,)

    def _matmat(self, M: Tensor) -> Tensor:
        return self.op._rmatmat(M)

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.op._matmat(M)


class DenseOperator(LinearOperator):
    """A matrix as an operator (tests, small problems).

    Args:
        matrix: ``[m, n]``.
        symmetric: whether the matrix is symmetric (default: checked with ``allclose``).
    """

    def __init__(self, matrix: Tensor, symmetric: bool | None = None):
        super().__init__(tuple(matrix.shape), matrix.dtype, matrix.device)  # type: ignore[arg-type]
        self.matrix = matrix
        self.symmetric = bool(torch.allclose(matrix, matrix.T)) if symmetric is None else symmetric

    def _matmat(self, M: Tensor) -> Tensor:
        return self.matrix @ M

    def _rmatmat(self, M: Tensor) -> Tensor:
        return self.matrix.T @ M


class SolverInverse(LinearOperator):
    """``(A + damping I)^{-1}`` for a symmetric operator ``A``, its products computed by
    :class:`beyondgrad.linalg.InverseOperator` (``"cg"``/``"minres"`` column by column, or a
    truncated Neumann series). Returned by :meth:`LinearOperator.inverse`.

    Args:
        A: a square symmetric operator.
        damping: added to the diagonal of ``A``.
        method: ``"cg"``, ``"minres"`` or ``"neumann"``.
        **kwargs: solver options, see :class:`beyondgrad.linalg.InverseOperator`.

    Raises:
        ValueError: ``A`` is not square and symmetric.
    """

    symmetric = True

    def __init__(self, A: LinearOperator, damping: float = 0.0, method: str = "cg", **kwargs: Any):
        if A.shape[0] != A.shape[1] or not A.symmetric:
            raise ValueError(
                f"the solvers need a square symmetric operator, got {type(A).__name__} of "
                f"shape {A.shape} (symmetric={A.symmetric})"
            )
        super().__init__(A.shape, A.dtype, A.device)
        self.A = A
        self.solver = InverseOperator(A, damping, method, **kwargs)

    def _children(self) -> Sequence[LinearOperator]:
        return (self.A,)

    def _matmat(self, M: Tensor) -> Tensor:
        return self.solver @ M
