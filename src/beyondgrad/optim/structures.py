"""Structured square matrices for the inverse-free optimizers (SINGD, SIRFShampoo).

A structure is a set of ``n x n`` matrices closed under multiplication (a matrix group's Lie
algebra and group share the pattern), so the multiplicative factor updates
``K <- K (I - beta m)`` of SINGD/SIRFShampoo never leave it. Each structure stores its matrices
in a compact tensor (the optimizer state) and offers the few operations the optimizers need:

``eye``, ``to_dense``, ``project`` (orthogonal projection of a dense matrix onto the pattern),
``mul`` (product of two structured matrices, exact because the pattern is closed), ``matmul``
(``K @ X`` or ``K^T @ X`` for a dense ``X [n, k]``; ``apply`` is its deprecated name),
``inner`` (``project(K^T S K)`` for a dense symmetric ``S``, or ``project(K^T K)``), ``trace``
and ``frobenius``.

Structures by name (:func:`structure`):

==========================  =====================================================  ==========
name                        pattern                                                storage
==========================  =====================================================  ==========
``dense``                   every entry                                            n^2
``diagonal``                the diagonal                                           n
``block{b}diagonal``        diagonal blocks of size ``b`` (the last may be smaller) n*b
``tril`` / ``triu``         lower / upper triangle                                 n^2 (mask)
``triltoeplitz`` / ``...``  lower / upper triangular Toeplitz (one value per        n
                            diagonal)
``hierarchical{k}``         a dense leading ``k x k`` block, dense first ``k`` rows, n^2 (mask)
                            diagonal elsewhere: ``[[A, B], [0, diag]]``
==========================  =====================================================  ==========

The triangular and hierarchical patterns keep the dense storage with a mask (their products
are dense matmuls); diagonal, block-diagonal and Toeplitz matrices use less memory than the
gradient they precondition.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Structure:
    """Base: a dense ``n x n`` matrix stored as is (subclasses override the storage).

    The methods take the compact storage ``t`` of a matrix ``K`` (what :meth:`eye`,
    :meth:`project` and :meth:`mul` return) and its size ``n``.

    Args:
        name: the structure's name, as accepted by :func:`structure`.
    """

    name: str = "dense"

    # -- storage ------------------------------------------------------------------------------
    def eye(self, n: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """The ``n x n`` identity in this structure's storage.

        Args:
            n: the matrix size.
            dtype: the storage dtype.
            device: the storage device.
        """
        return self.project(torch.eye(n, dtype=dtype, device=device))

    def to_dense(self, t: Tensor, n: int) -> Tensor:
        """The stored matrix ``t`` as a dense ``[n, n]`` tensor.

        Args:
            t: the storage of ``K``.
            n: the matrix size.
        """
        return t

    def project(self, M: Tensor) -> Tensor:
        """The orthogonal projection of a dense ``[n, n]`` matrix onto the pattern.

        Args:
            M: a dense ``[n, n]`` matrix.

        Returns:
            The storage of the projection (entries outside the pattern dropped).
        """
        return M.clone()

    # -- algebra ------------------------------------------------------------------------------
    def mul(self, s: Tensor, t: Tensor, n: int) -> Tensor:
        """``S @ T`` (in the structure, because the pattern is closed under products).

        Args:
            s: the storage of ``S``.
            t: the storage of ``T``.
            n: the matrix size.

        Returns:
            The storage of ``S @ T``.
        """
        return self.project(self.to_dense(s, n) @ self.to_dense(t, n))

    def matmul(self, t: Tensor, X: Tensor, transpose: bool = False) -> Tensor:
        """``K @ X`` (or ``K^T @ X``) for a dense ``X [n, k]``.

        Args:
            t: the storage of ``K``.
            X: a dense ``[n, k]`` tensor (its dtype is kept).
            transpose: multiply by ``K^T`` instead.

        Returns:
            A dense ``[n, k]`` tensor.
        """
        K = self.to_dense(t, X.shape[0]).to(X.dtype)
        return (K.T if transpose else K) @ X

    def apply(self, t: Tensor, X: Tensor, transpose: bool = False) -> Tensor:
        """Deprecated name of :meth:`matmul` (warns with a ``DeprecationWarning``).

        Args:
            t: the storage of ``K``.
            X: a dense ``[n, k]`` tensor.
            transpose: multiply by ``K^T`` instead.
        """
        warnings.warn(
            "Structure.apply is deprecated; use Structure.matmul (same arguments)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.matmul(t, X, transpose)

    def inner(self, t: Tensor, n: int, S: Tensor | None = None) -> Tensor:
        """``project(K^T S K)`` for a symmetric ``S [n, n]``; ``S=None`` means ``I``.

        Args:
            t: the storage of ``K``.
            n: the matrix size.
            S: a dense symmetric ``[n, n]`` matrix, or ``None``.

        Returns:
            The storage of the projection.
        """
        K = self.to_dense(t, n)
        M = K.T @ K if S is None else K.T @ S.to(K.dtype) @ K
        return self.project(M)

    def gram(self, X: Tensor) -> Tensor:
        """``project(X @ X^T)`` for a dense ``X [n, k]``."""
        return self.project(X @ X.T)

    def trace(self, t: Tensor, n: int) -> Tensor:
        """``tr(K)`` (a 0-d tensor).

        Args:
            t: the storage of ``K``.
            n: the matrix size.
        """
        return torch.diagonal(self.to_dense(t, n)).sum()

    def frobenius(self, t: Tensor, n: int) -> Tensor:
        """``||K||_F`` in float32 (a 0-d tensor).

        Args:
            t: the storage of ``K``.
            n: the matrix size.
        """
        return torch.linalg.matrix_norm(self.to_dense(t, n).float())

    def numel(self, n: int) -> int:
        """Entries stored for an ``n x n`` matrix."""
        return n * n


@dataclass(frozen=True)
class Diagonal(Structure):
    name: str = "diagonal"

    def to_dense(self, t: Tensor, n: int) -> Tensor:
        return torch.diag(t)

    def project(self, M: Tensor) -> Tensor:
        return torch.diagonal(M).clone()

    def mul(self, s: Tensor, t: Tensor, n: int) -> Tensor:
        return s * t

    def matmul(self, t: Tensor, X: Tensor, transpose: bool = False) -> Tensor:
        return t.to(X.dtype).unsqueeze(1) * X

    def inner(self, t: Tensor, n: int, S: Tensor | None = None) -> Tensor:
        d = t * t
        return d if S is None else d * torch.diagonal(S).to(t.dtype)

    def gram(self, X: Tensor) -> Tensor:
        return (X * X).sum(1)

    def trace(self, t: Tensor, n: int) -> Tensor:
        return t.sum()

    def frobenius(self, t: Tensor, n: int) -> Tensor:
        return torch.linalg.vector_norm(t.float())

    def numel(self, n: int) -> int:
        return n


@dataclass(frozen=True)
class BlockDiagonal(Structure):
    """Blocks ``[nb, b, b]``; the dimension is padded to ``nb * b`` (the padding decouples)."""

    name: str = "block30diagonal"
    block: int = 30

    def _pad(self, n: int) -> int:
        return -(-n // self.block) * self.block - n

    def to_dense(self, t: Tensor, n: int) -> Tensor:
        return torch.block_diag(*t)[:n, :n]

    def project(self, M: Tensor) -> Tensor:
        n, b = M.shape[0], self.block
        pad = self._pad(n)
        P = torch.nn.functional.pad(M, (0, pad, 0, pad))
        nb = P.shape[0] // b
        blocks = P.reshape(nb, b, nb, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return blocks.contiguous()

    def eye(self, n: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        nb = (n + self._pad(n)) // self.block
        return torch.eye(self.block, dtype=dtype, device=device).repeat(nb, 1, 1)

    def mul(self, s: Tensor, t: Tensor, n: int) -> Tensor:
        return s @ t

    def _blocks_of(self, X: Tensor) -> Tensor:
        pad = self._pad(X.shape[0])
        P = torch.nn.functional.pad(X, (0, 0, 0, pad))
        return P.reshape(-1, self.block, X.shape[1])

    def matmul(self, t: Tensor, X: Tensor, transpose: bool = False) -> Tensor:
        K = t.to(X.dtype)
        out = (K.transpose(1, 2) if transpose else K) @ self._blocks_of(X)
        return out.reshape(-1, X.shape[1])[: X.shape[0]]

    def inner(self, t: Tensor, n: int, S: Tensor | None = None) -> Tensor:
        if S is None:
            return t.transpose(1, 2) @ t
        # only the diagonal blocks of S meet the diagonal blocks of K
        Sb = self.project(S.to(t.dtype))
        return t.transpose(1, 2) @ Sb @ t

    def trace(self, t: Tensor, n: int) -> Tensor:
        return torch.diagonal(t, dim1=1, dim2=2).reshape(-1)[:n].sum()

    def numel(self, n: int) -> int:
        return (n + self._pad(n)) * self.block


@dataclass(frozen=True)
class Masked(Structure):
    """A fixed sparsity pattern closed under products, stored dense with zeros outside."""

    name: str = "tril"
    kind: str = "tril"
    k: int = 0

    def mask(self, n: int, device: torch.device | str | None) -> Tensor:
        ones = torch.ones(n, n, dtype=torch.bool, device=device)
        if self.kind == "tril":
            return ones.tril()
        if self.kind == "triu":
            return ones.triu()
        # hierarchical: [[A (k x k), B (k x n-k)], [0, diagonal]]
        m = torch.eye(n, dtype=torch.bool, device=device)
        m[: self.k, :] = True
        return m

    def project(self, M: Tensor) -> Tensor:
        return M * self.mask(M.shape[0], M.device)

    def mul(self, s: Tensor, t: Tensor, n: int) -> Tensor:
        return self.project(s @ t)  # exact: the pattern is closed (projection removes round-off)


@dataclass(frozen=True)
class TriangularToeplitz(Structure):
    """Lower (``lower=True``) or upper triangular Toeplitz: ``t[k]`` is the value on the
    ``k``-th sub- (super-) diagonal. These matrices are polynomials in the shift matrix, so
    they commute and their product is the truncated convolution of the coefficients."""

    name: str = "triltoeplitz"
    lower: bool = True

    def to_dense(self, t: Tensor, n: int) -> Tensor:
        i = torch.arange(n, device=t.device)
        diff = i[:, None] - i[None, :]
        if not self.lower:
            diff = -diff
        return torch.where(diff >= 0, t[diff.clamp(min=0)], t.new_zeros(()))

    def project(self, M: Tensor) -> Tensor:
        n = M.shape[0]
        A = M if self.lower else M.T
        return torch.stack([torch.diagonal(A, offset=-k).mean() for k in range(n)])

    def mul(self, s: Tensor, t: Tensor, n: int) -> Tensor:
        full = torch.nn.functional.conv1d(
            s.flip(0).reshape(1, 1, -1), t.reshape(1, 1, -1), padding=n - 1
        )
        return full.reshape(-1).flip(0)[:n]

    def trace(self, t: Tensor, n: int) -> Tensor:
        return t[0] * n

    def numel(self, n: int) -> int:
        return n


def structure(name: str) -> Structure:
    """The structure called ``name`` (see the module docstring); unknown names raise."""
    if name == "dense":
        return Structure()
    if name == "diagonal":
        return Diagonal()
    if name in ("tril", "triu"):
        return Masked(name, name)
    if name in ("triltoeplitz", "triutoeplitz"):
        return TriangularToeplitz(name, lower=name == "triltoeplitz")
    match = re.fullmatch(r"block(\d+)diagonal", name)
    if match and int(match.group(1)) > 0:
        return BlockDiagonal(name, int(match.group(1)))
    match = re.fullmatch(r"hierarchical(\d+)", name)
    if match and int(match.group(1)) > 0:
        return Masked(name, "hierarchical", int(match.group(1)))
    raise ValueError(
        f"unknown structure {name!r}; use one of dense, diagonal, block<b>diagonal, tril, "
        "triu, triltoeplitz, triutoeplitz, hierarchical<k> (e.g. block30diagonal, "
        "hierarchical15)"
    )


STRUCTURES = (
    "dense",
    "diagonal",
    "block4diagonal",
    "tril",
    "triu",
    "triltoeplitz",
    "triutoeplitz",
    "hierarchical3",
)
"""Examples of every structure family (used by the tests)."""

__all__ = ["STRUCTURES", "Structure", "structure"]
