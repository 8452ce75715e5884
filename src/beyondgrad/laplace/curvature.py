"""Curvature structures with closed forms for a damped, scaled precision.

Each structure holds a symmetric PSD matrix ``H`` over the flat parameter vector of ``names``
(flattened row-major, in ``names`` order, ``P`` entries) and answers, for a positive ``scale``
``s`` (scalar tensor) and a diagonal ``D = diag(prior)`` (``prior``: ``[P]`` tensor), the
closed forms of ``Pm = s H + D``:

* ``logdet(s, prior)`` -- ``log det Pm`` (differentiable in ``s`` and ``prior``),
* ``solve(s, prior, M)`` -- ``Pm^{-1} M`` for ``M`` ``[P, k]``,
* ``inverse_sqrt(s, prior, Z)`` -- ``T Z`` for a ``T`` with ``T T^T = Pm^{-1}`` (draws from
  ``N(0, Pm^{-1})`` when ``Z`` is standard normal),
* ``to_dense()`` -- ``H`` itself (tests, small models),
* ``state_dict()`` / :func:`curvature_from_state` -- plain tensors and metadata.

Structures: :class:`DenseCurvature` (any ``prior``), :class:`DiagonalCurvature` (any
``prior``), :class:`LowRankCurvature` (``H = U diag(lam) U^T``, any ``prior``, Woodbury), and
:class:`KroneckerCurvature` (blocks in Kronecker eigenbases: KFAC, EKFAC; the prior must be
constant on every Kronecker block, i.e. equal for a weight and its joint bias).

Kronecker blocks follow :mod:`beyondgrad.factors`: a weight ``W [O, I]`` flattened row-major is
``B kron A`` (``B`` output side); the block's vectors are laid out as ``[G, rows, cols]`` by
:func:`beyondgrad.factors.to_block_layout` (bias as the last column), and its eigenvectors are
``left[g][:, i] right[g][:, j]^T`` with eigenvalue ``values[g, i, j]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..factors import from_block_layout, to_block_layout


class Curvature:
    """Base: the parameter layout (``names``, ``shapes``) and the shared helpers.

    Args:
        names: the parameter names, in the order of the flat vector.
        shapes: the parameters' shapes (each flattened row-major; ``P`` entries in all).
    """

    kind: str = ""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.sizes = [s.numel() for s in self.shapes]
        self.num_params = sum(self.sizes)

    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, size)`` in the flat vector."""
        out, start = {}, 0
        for n, size in zip(self.names, self.sizes):
            out[n] = (start, size)
            start += size
        return out

    def tied(self) -> list[list[int]]:
        """Groups of parameter-tensor indices whose prior precision must be equal."""
        return [[i] for i in range(len(self.names))]

    def logdet(self, scale: Tensor, prior: Tensor) -> Tensor:
        """``log det(s H + diag(prior))``, differentiable in ``scale`` and ``prior``.

        Args:
            scale: ``s > 0``, a scalar tensor.
            prior: ``[P]``, the positive prior precision per entry.

        Returns:
            A 0-dim tensor.
        """
        raise NotImplementedError

    def solve(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        """``(s H + diag(prior))^{-1} M``.

        Args:
            scale: ``s > 0``, a scalar tensor.
            prior: ``[P]``, the positive prior precision per entry.
            M: ``[P, k]``.

        Returns:
            ``[P, k]``.
        """
        raise NotImplementedError

    def inverse_sqrt(self, scale: Tensor, prior: Tensor, Z: Tensor) -> Tensor:
        """``T Z`` for a square root ``T`` with ``T T^T = (s H + diag(prior))^{-1}``; for
        standard normal ``Z`` the columns are draws from ``N(0, (s H + diag(prior))^{-1})``.

        Args:
            scale: ``s > 0``, a scalar tensor.
            prior: ``[P]``, the positive prior precision per entry.
            Z: ``[P, k]``.

        Returns:
            ``[P, k]``.
        """
        raise NotImplementedError

    def whiten(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        """A ``W`` with ``W^T W = M^T (s H + diag(prior))^{-1} M`` (quadratic forms, e.g. the
        GLM predictive variance): ``T^T M`` for a square root ``T T^T = (s H + D)^{-1}``,
        its rows in a basis of the structure's choosing (dense: one triangular solve, half
        the work of :meth:`solve`; Kronecker: the eigenbasis, no rotation back). The base
        implementation uses :meth:`inverse_sqrt` (``T^T = T`` for symmetric roots).

        Args:
            scale: ``s > 0``, a scalar tensor.
            prior: ``[P]``, the positive prior precision per entry.
            M: ``[P, k]``.

        Returns:
            ``[P, k]``.
        """
        return self.inverse_sqrt(scale, prior, M)

    def to_dense(self) -> Tensor:
        """``H`` as a dense ``[P, P]`` matrix (tests, small models)."""
        raise NotImplementedError

    def trace(self) -> Tensor:
        """``trace(H)``."""
        return torch.diagonal(self.to_dense()).sum()

    def _tensors(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and metadata; :func:`curvature_from_state` rebuilds the structure."""
        return {
            "kind": self.kind,
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            **self._tensors(),
        }


class DenseCurvature(Curvature):
    """``H`` as a dense ``[P, P]`` matrix (Cholesky of ``s H + D``).

    Args:
        names: the parameter names, in the order of the flat vector.
        shapes: the parameters' shapes (each flattened row-major; ``P`` entries in all).
        matrix: ``H``, ``[P, P]`` (symmetrized on construction).
    """

    kind = "full"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], matrix: Tensor):
        super().__init__(names, shapes)
        self.matrix = 0.5 * (matrix + matrix.T)
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None

    def _cholesky(self, scale: Tensor, prior: Tensor) -> Tensor:
        """Cholesky factor of ``s H + D``; the last one is kept for repeated solves with the
        same (non-differentiated) ``s`` and ``prior``."""
        scale = torch.as_tensor(scale, dtype=self.matrix.dtype, device=self.matrix.device)
        if scale.requires_grad or prior.requires_grad:
            return torch.linalg.cholesky(scale * self.matrix + torch.diag(prior))
        c = self._cache
        if c is not None and torch.equal(c[0], scale) and torch.equal(c[1], prior):
            return c[2]
        L = torch.linalg.cholesky(scale * self.matrix + torch.diag(prior))
        self._cache = (scale.clone(), prior.clone(), L)
        return L

    def logdet(self, scale: Tensor, prior: Tensor) -> Tensor:
        return 2 * torch.diagonal(self._cholesky(scale, prior)).log().sum()

    def solve(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        return torch.cholesky_solve(M, self._cholesky(scale, prior))

    def inverse_sqrt(self, scale: Tensor, prior: Tensor, Z: Tensor) -> Tensor:
        L = self._cholesky(scale, prior)  # Pm = L L^T, T = L^{-T}
        return torch.linalg.solve_triangular(L.T, Z, upper=True)

    def whiten(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(self._cholesky(scale, prior), M, upper=False)

    def to_dense(self) -> Tensor:
        return self.matrix

    def _tensors(self) -> dict[str, Any]:
        return {"matrix": self.matrix}


class DiagonalCurvature(Curvature):
    """``H = diag(values)``.

    Args:
        names: the parameter names, in the order of the flat vector.
        shapes: the parameters' shapes (each flattened row-major; ``P`` entries in all).
        values: the diagonal, ``P`` entries (any shape; flattened).
    """

    kind = "diag"

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], values: Tensor):
        super().__init__(names, shapes)
        self.values = values.reshape(-1)

    def logdet(self, scale: Tensor, prior: Tensor) -> Tensor:
        return (scale * self.values + prior).log().sum()

    def solve(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        return M / (scale * self.values + prior).unsqueeze(1)

    def inverse_sqrt(self, scale: Tensor, prior: Tensor, Z: Tensor) -> Tensor:
        return Z * (scale * self.values + prior).rsqrt().unsqueeze(1)

    def to_dense(self) -> Tensor:
        return torch.diag(self.values)

    def trace(self) -> Tensor:
        return self.values.sum()

    def _tensors(self) -> dict[str, Any]:
        return {"values": self.values}


class LowRankCurvature(Curvature):
    """``H = U diag(eigenvalues) U^T`` (``U`` ``[P, k]``); ``s H + D = D + B B^T`` with
    ``B = U diag(sqrt(s lam))`` is handled by the matrix determinant lemma and Woodbury.

    Args:
        names: the parameter names, in the order of the flat vector.
        shapes: the parameters' shapes (each flattened row-major; ``P`` entries in all).
        eigenvalues: ``lam``, ``[k]`` (negative values are clamped to 0).
        eigenvectors: ``U``, ``[P, k]`` with orthonormal columns.
    """

    kind = "lowrank"

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        eigenvalues: Tensor,
        eigenvectors: Tensor,
    ):
        super().__init__(names, shapes)
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.eigenvectors = eigenvectors

    def _whitened(self, scale: Tensor, prior: Tensor) -> Tensor:
        """``W = D^{-1/2} B`` ``[P, k]``."""
        B = self.eigenvectors * (scale * self.eigenvalues).sqrt()
        return B * prior.rsqrt().unsqueeze(1)

    def logdet(self, scale: Tensor, prior: Tensor) -> Tensor:
        W = self._whitened(scale, prior)
        eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        return prior.log().sum() + torch.logdet(eye + W.T @ W)

    def solve(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        W = self._whitened(scale, prior)
        eye = torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        r = prior.rsqrt().unsqueeze(1)
        X = r * M  # (I + W W^T)^{-1} = I - W (I + W^T W)^{-1} W^T
        X = X - W @ torch.linalg.solve(eye + W.T @ W, W.T @ X)
        return r * X

    def inverse_sqrt(self, scale: Tensor, prior: Tensor, Z: Tensor) -> Tensor:
        # (I + W W^T)^{-1/2} = I + W V diag(c) V^T W^T with W^T W = V diag(x) V^T and
        # c = ((1 + x)^{-1/2} - 1) / x = -1 / (sqrt(1 + x) (1 + sqrt(1 + x))) (finite at x = 0)
        W = self._whitened(scale, prior)
        x, V = torch.linalg.eigh(W.T @ W)
        root = (1 + x.clamp_min(0)).sqrt()
        c = -1.0 / (root * (1 + root))
        WV = W @ V
        return prior.rsqrt().unsqueeze(1) * (Z + WV @ (c.unsqueeze(1) * (WV.T @ Z)))

    def whiten(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        # T = D^{-1/2} S with S symmetric (see inverse_sqrt): T^T M = S D^{-1/2} M
        W = self._whitened(scale, prior)
        x, V = torch.linalg.eigh(W.T @ W)
        root = (1 + x.clamp_min(0)).sqrt()
        c = -1.0 / (root * (1 + root))
        WV = W @ V
        Z = prior.rsqrt().unsqueeze(1) * M
        return Z + WV @ (c.unsqueeze(1) * (WV.T @ Z))

    def to_dense(self) -> Tensor:
        return self.eigenvectors @ (self.eigenvalues.unsqueeze(1) * self.eigenvectors.T)

    def trace(self) -> Tensor:
        return self.eigenvalues.sum()

    def _tensors(self) -> dict[str, Any]:
        return {"eigenvalues": self.eigenvalues, "eigenvectors": self.eigenvectors}


@dataclass
class KroneckerBlock:
    """One Kronecker block in its eigenbasis. ``names``: weight (and joint bias);
    ``values [G, rows, cols]``: eigenvalues; ``left [G, rows, rows]``, ``right [G, cols,
    cols]``: orthonormal bases; ``order``/``weight_perm``: the layout of
    :func:`beyondgrad.factors.to_block_layout`; ``joint_bias``: the bias is the last column.
    ``bases``: when ``left``/``right`` are ``None``, computes them at their first use (the
    evidence needs the eigenvalues only; the predictives and sampling need the bases)."""

    names: tuple[str, ...]
    values: Tensor
    left: Tensor | None
    right: Tensor | None
    order: str
    weight_perm: tuple[int, ...] | None
    joint_bias: bool
    bases: Callable[[], tuple[Tensor, Tensor]] | None = field(
        default=None, repr=False, compare=False
    )

    def eigenbases(self) -> tuple[Tensor, Tensor]:
        """``(left, right)``, computed by :attr:`bases` at the first call if not given."""
        if self.left is None or self.right is None:
            assert self.bases is not None, "a KroneckerBlock needs its bases or a way to them"
            self.left, self.right = self.bases()
            self.bases = None
        return self.left, self.right

    def to_layout(self, parts: dict[str, Tensor]) -> Tensor:
        """Per-parameter ``[k, *shape]`` to ``[k, G, rows, cols]``."""
        bias = parts[self.names[1]] if self.joint_bias else None
        G = self.values.shape[0]
        return to_block_layout(parts[self.names[0]], bias, self.order, self.weight_perm, G)

    def from_layout(self, M: Tensor, shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
        """Inverse of :meth:`to_layout`."""
        bias_shape = tuple(shapes[self.names[1]]) if self.joint_bias else None
        W, b = from_block_layout(
            M,
            tuple(shapes[self.names[0]]),
            bias_shape,
            self.order,
            self.weight_perm,
            self.values.shape[0],
        )
        return {self.names[0]: W} if b is None else {self.names[0]: W, self.names[1]: b}

    def rotate(self, M: Tensor) -> Tensor:
        """Coordinates in the eigenbasis: ``left^T M right`` for ``M [k, G, rows, cols]``."""
        left, right = self.eigenbases()
        return left.mT @ M @ right  # broadcast over k (batched matmuls: no einsum planning)

    def unrotate(self, M: Tensor) -> Tensor:
        """Inverse of :meth:`rotate`."""
        left, right = self.eigenbases()
        return left @ M @ right.mT

    def state(self) -> dict[str, Any]:
        left, right = self.eigenbases()
        return {
            "names": list(self.names),
            "values": self.values,
            "left": left,
            "right": right,
            "order": self.order,
            "weight_perm": None if self.weight_perm is None else list(self.weight_perm),
            "joint_bias": self.joint_bias,
        }


@dataclass
class DiagonalBlock:
    """A block without Kronecker structure: the diagonal of the curvature, flat over
    ``names``."""

    names: tuple[str, ...]
    values: Tensor

    def state(self) -> dict[str, Any]:
        return {"names": list(self.names), "values": self.values}


class KroneckerCurvature(Curvature):
    """Block-diagonal ``H``: :class:`KroneckerBlock` (KFAC: products of the factors'
    eigenvalues; EKFAC: corrected eigenvalues) and :class:`DiagonalBlock` (layers without
    Kronecker structure). The prior must be constant on each Kronecker block.

    Args:
        names: the parameter names, in the order of the flat vector.
        shapes: the parameters' shapes (each flattened row-major; ``P`` entries in all).
        blocks: the blocks, together covering every name exactly once.

    Raises:
        ValueError: the blocks do not cover ``names``.
    """

    kind = "kron"

    def __init__(
        self,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        blocks: Sequence[KroneckerBlock | DiagonalBlock],
    ):
        super().__init__(names, shapes)
        self.blocks = list(blocks)
        covered = sorted(n for b in self.blocks for n in b.names)
        if covered != sorted(self.names):
            raise ValueError(f"blocks cover {covered}, expected {sorted(self.names)}")

    def tied(self) -> list[list[int]]:
        index = {n: i for i, n in enumerate(self.names)}
        groups = [[index[n] for n in b.names] for b in self.blocks if isinstance(b, KroneckerBlock)]
        tied = {i for g in groups for i in g}
        return groups + [[i] for i in range(len(self.names)) if i not in tied]

    def _block_prior(self, block: KroneckerBlock, prior: Tensor) -> Tensor:
        offsets = self.offsets()
        values = torch.cat([prior[offsets[n][0] : sum(offsets[n])] for n in block.names])
        if bool((values.detach() != values[0].detach()).any()):
            raise ValueError(
                f"the prior precision must be constant on the Kronecker block {block.names} "
                "(use a scalar or one value per layer, equal for a weight and its bias)"
            )
        # the mean (equal to every entry) spreads the derivative over the block's entries:
        # summed over the block it is the derivative w.r.t. the block's common value
        return values.mean()

    def _diag_prior(self, block: DiagonalBlock, prior: Tensor) -> Tensor:
        offsets = self.offsets()
        return torch.cat([prior[offsets[n][0] : sum(offsets[n])] for n in block.names])

    def logdet(self, scale: Tensor, prior: Tensor) -> Tensor:
        total = prior.new_zeros(())
        for b in self.blocks:
            if isinstance(b, KroneckerBlock):
                total = total + (scale * b.values + self._block_prior(b, prior)).log().sum()
            else:
                total = total + (scale * b.values + self._diag_prior(b, prior)).log().sum()
        return total

    def _apply(
        self, M: Tensor, kron: Callable[[KroneckerBlock], Tensor], diag: Callable[..., Tensor]
    ) -> Tensor:
        """``M [P, k]`` mapped block by block: Kronecker blocks scaled by ``kron(block)``
        (``[G, rows, cols]``) in their eigenbasis, diagonal blocks by ``diag(block)``."""
        k = M.shape[1]
        offsets = self.offsets()
        shapes = dict(zip(self.names, self.shapes))
        parts = {n: M[a : a + s].T.reshape(k, *shapes[n]) for n, (a, s) in offsets.items()}
        out = torch.empty_like(M)
        for b in self.blocks:
            if isinstance(b, KroneckerBlock):
                rot = b.rotate(b.to_layout(parts)) * kron(b)
                result = b.from_layout(b.unrotate(rot), shapes)
                for n, v in result.items():
                    a, s = offsets[n]
                    out[a : a + s] = v.reshape(k, s).T
            else:
                flat = torch.cat([parts[n].reshape(k, -1) for n in b.names], 1).T
                scaled = flat * diag(b).unsqueeze(1)
                start = 0
                for n in b.names:
                    a, s = offsets[n]
                    out[a : a + s] = scaled[start : start + s]
                    start += s
        return out

    def solve(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        return self._apply(
            M,
            lambda b: 1.0 / (scale * b.values + self._block_prior(b, prior)),
            lambda b: 1.0 / (scale * b.values + self._diag_prior(b, prior)),
        )

    def inverse_sqrt(self, scale: Tensor, prior: Tensor, Z: Tensor) -> Tensor:
        return self._apply(
            Z,
            lambda b: (scale * b.values + self._block_prior(b, prior)).rsqrt(),
            lambda b: (scale * b.values + self._diag_prior(b, prior)).rsqrt(),
        )

    def whiten(self, scale: Tensor, prior: Tensor, M: Tensor) -> Tensor:
        # W = D^{-1/2} Q^T M block by block, in the eigenbases (Q orthogonal: W^T W is the
        # quadratic form of Q D^{-1} Q^T, no rotation back needed)
        k = M.shape[1]
        offsets = self.offsets()
        shapes = dict(zip(self.names, self.shapes))
        parts = {n: M[a : a + s].T.reshape(k, *shapes[n]) for n, (a, s) in offsets.items()}
        out = []
        for b in self.blocks:
            if isinstance(b, KroneckerBlock):
                root = (scale * b.values + self._block_prior(b, prior)).rsqrt()
                out.append((b.rotate(b.to_layout(parts)) * root).reshape(k, -1))
            else:
                flat = torch.cat([parts[n].reshape(k, -1) for n in b.names], 1)
                out.append(flat * (scale * b.values + self._diag_prior(b, prior)).rsqrt())
        return torch.cat(out, 1).T

    def to_dense(self) -> Tensor:
        ref = self.blocks[0].values
        eye = torch.eye(self.num_params, dtype=ref.dtype, device=ref.device)
        return self._apply(eye, lambda b: b.values, lambda b: b.values)

    def trace(self) -> Tensor:
        return sum((b.values.sum() for b in self.blocks), self.blocks[0].values.new_zeros(()))

    def _tensors(self) -> dict[str, Any]:
        return {
            "blocks": [
                {"type": "kron" if isinstance(b, KroneckerBlock) else "diag", **b.state()}
                for b in self.blocks
            ]
        }


def _block_from_state(state: dict[str, Any]) -> KroneckerBlock | DiagonalBlock:
    if state["type"] == "diag":
        return DiagonalBlock(tuple(state["names"]), state["values"])
    perm = state["weight_perm"]
    return KroneckerBlock(
        tuple(state["names"]),
        state["values"],
        state["left"],
        state["right"],
        state["order"],
        None if perm is None else tuple(perm),
        bool(state["joint_bias"]),
    )


def curvature_from_state(state: dict[str, Any]) -> Curvature:
    """Rebuild a structure from :meth:`Curvature.state_dict`.

    Args:
        state: what ``state_dict()`` returned (its ``"kind"`` selects the class).

    Returns:
        The :class:`Curvature` subclass instance.

    Raises:
        ValueError: an unknown kind.
    """
    names, shapes, kind = state["names"], state["shapes"], state["kind"]
    if kind == "full":
        return DenseCurvature(names, shapes, state["matrix"])
    if kind == "diag":
        return DiagonalCurvature(names, shapes, state["values"])
    if kind == "lowrank":
        return LowRankCurvature(names, shapes, state["eigenvalues"], state["eigenvectors"])
    if kind == "kron":
        blocks = [_block_from_state(b) for b in state["blocks"]]
        return KroneckerCurvature(names, shapes, blocks)
    raise ValueError(f"unknown curvature kind {kind!r}")


__all__ = [
    "Curvature",
    "DenseCurvature",
    "DiagonalBlock",
    "DiagonalCurvature",
    "KroneckerBlock",
    "KroneckerCurvature",
    "LowRankCurvature",
    "curvature_from_state",
]
