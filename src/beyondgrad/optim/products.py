"""The per-step preconditioning product of a Kronecker-factored preconditioner, prepared once
per refresh (KFAC, SINGD, SIRFShampoo).

A layer's gradient ``M`` (``[G, r, c]``: ``G`` groups, rows on the output side) is
preconditioned from both sides. Each side is a :data:`Side` ``(matrix, scale, factored)``:

- explicit (``factored=False``): ``P M`` (left) or ``M P`` (right), one product per step;
- factored (``factored=True``): ``F diag(s) F^T`` applied as two products,
  ``F (s * (F^T M))`` (left) or ``((M F) * s) F^T`` (right); ``s=None`` means ``F F^T``
  (SINGD's and SIRFShampoo's factors), an eigenbasis ``Q`` with ``s = 1 / l`` is an inverse.

Forming the explicit ``P = F diag(s) F^T`` of a ``d x d`` side costs ``d^3`` once per refresh
and saves ``d^2 o`` per step (``o``: the other side's size, times ``G``): it is done when
:func:`explicit_is_cheaper`, i.e. ``d < refresh_every * o``. For KFAC's exact eigenvalue
damping (``values = 1 / (l_L l_R^T + damping)``, not a product of two sides) both sides stay
eigenbases and :func:`kronecker_solve` rotates, scales and rotates back (four products).

A side may also be **block-diagonal** (KFAC's ``max_block``): its matrix is ``[..., n, b, b]``,
one more axis than the gradient ``M``, the ``n`` diagonal blocks of a ``d x d`` side with
``d <= n b`` (:func:`diagonal_blocks`: the last block padded with identity rows and columns);
its scale, if any, ``[..., n, b]``. :func:`kronecker_solve` pads ``M`` with zeros to ``n b``,
applies each block to its rows (or columns) in one batched product and drops the padding: the
padded coordinates are decoupled from the others, so the result is that of the block-diagonal
``d x d`` matrix, at ``d b`` instead of ``d^2`` per column.

The result equals the factored products up to round-off (the same matrices, associated
differently). :class:`ProductCache` keeps what a refresh prepared until the tensors it was
built from are replaced or written in place (their version counters), so the work is done once
per refresh whoever writes the factors (a refresh, ``load_state_dict``, an owner broadcast).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

Side = tuple[Tensor, Tensor | None, bool]
"""``(matrix, scale, factored)``; see the module docstring."""


def explicit_is_cheaper(dim: int, other: int, every: int) -> bool:
    """Whether an explicit ``dim x dim`` side (``dim^3`` per refresh) costs less than the two
    factored products (``dim^2 other`` more per step) over ``every`` steps.

    Args:
        dim: the side's size.
        other: the number of columns it multiplies (the other side's size times groups).
        every: steps per refresh.
    """
    return dim < every * other


def make_side(matrix: Tensor, scale: Tensor | None, explicit: bool, dtype: torch.dtype) -> Side:
    """A side ``F diag(s) F^T`` (``[..., d, d]``, ``s`` ``[..., d]`` or None), explicit or
    factored, in ``dtype`` (the explicit product is formed in the matrix's dtype first)."""
    if explicit:
        scaled = matrix if scale is None else matrix * scale.unsqueeze(-2)
        return (scaled @ matrix.mT).to(dtype), None, False
    return matrix.to(dtype), None if scale is None else scale.to(dtype), True


def block_shape(dim: int, max_block: int) -> tuple[int, int]:
    """``(n, b)``: the number and the size of the diagonal blocks of a ``dim``-wide side with
    blocks of at most ``max_block`` (``n = ceil(dim / max_block)`` blocks of equal size
    ``b = ceil(dim / n)``; ``n b - dim < n`` padded coordinates)."""
    n = -(-dim // max_block)
    return n, -(-dim // n)


def diagonal_blocks(matrix: Tensor, max_block: int) -> Tensor:
    """The diagonal blocks of ``matrix`` ``[..., d, d]`` as ``[..., n, b, b]``
    (:func:`block_shape`); the padding of the last block is the identity (a positive
    definite ``matrix`` gives positive definite blocks).

    Args:
        matrix: square matrices, batched over the leading axes.
        max_block: the largest block size.
    """
    d = matrix.shape[-1]
    n, b = block_shape(d, max_block)
    pad = n * b - d
    if pad:
        matrix = torch.nn.functional.pad(matrix, (0, pad, 0, pad))
        matrix.diagonal(dim1=-2, dim2=-1)[..., d:] = 1.0
    blocks = [matrix[..., i * b : (i + 1) * b, i * b : (i + 1) * b] for i in range(n)]
    return torch.stack(blocks, -3)


def side_size(matrix: Tensor, ndim: int) -> int:
    """The (padded) size of a side's matrix that multiplies an ``ndim``-dimensional gradient:
    ``d`` of ``[..., d, d]``, ``n b`` of a block-diagonal ``[..., n, b, b]``."""
    if matrix.ndim == ndim + 1:
        return matrix.shape[-3] * matrix.shape[-1]
    return matrix.shape[-1]


def _mm_left(P: Tensor, X: Tensor, transpose: bool = False) -> Tensor:
    """``P X`` (``P^T X``), ``P`` dense ``[..., d, d]`` or block-diagonal ``[..., n, b, b]``."""
    P = P.mT if transpose else P
    if P.ndim == X.ndim:
        return P @ X
    n, b = P.shape[-3], P.shape[-1]
    return (P @ X.unflatten(-2, (n, b))).flatten(-3, -2)


def _mm_right(X: Tensor, P: Tensor, transpose: bool = False) -> Tensor:
    """``X P`` (``X P^T``), ``P`` dense or block-diagonal (see :func:`_mm_left`)."""
    P = P.mT if transpose else P
    if P.ndim == X.ndim:
        return X @ P
    n, b = P.shape[-3], P.shape[-1]
    return (X.unflatten(-1, (n, b)).transpose(-3, -2) @ P).transpose(-3, -2).flatten(-2)


def _flat_scale(scale: Tensor, matrix: Tensor, ndim: int) -> Tensor:
    """A side's scale over the (padded) coordinates, ``[..., d]`` (blocks flattened)."""
    return scale.flatten(-2) if matrix.ndim == ndim + 1 else scale


def _left(M: Tensor, side: Side) -> Tensor:
    matrix, scale, factored = side
    if not factored:
        return _mm_left(matrix, M)
    inner = _mm_left(matrix, M, transpose=True)
    if scale is not None:
        inner = inner * _flat_scale(scale, matrix, M.ndim).unsqueeze(-1)
    return _mm_left(matrix, inner)


def _right(M: Tensor, side: Side) -> Tensor:
    matrix, scale, factored = side
    if not factored:
        return _mm_right(M, matrix)
    inner = _mm_right(M, matrix)
    if scale is not None:
        inner = inner * _flat_scale(scale, matrix, M.ndim).unsqueeze(-2)
    return _mm_right(inner, matrix, transpose=True)


def kronecker_solve(M: Tensor, left: Side, right: Side, values: Tensor | None = None) -> Tensor:
    """``left M right`` (each side explicit or factored), or with joint ``values``:
    ``Q_L [(Q_L^T M Q_R) * values] Q_R^T`` (both sides must then be factored eigenbases).

    Args:
        M: ``[..., r, c]``.
        left: a :data:`Side` of size ``r`` (block-diagonal: ``n b >= r``).
        right: a :data:`Side` of size ``c``.
        values: ``[..., r, c]`` scales in the joint eigenbasis (padded sizes where a side
            is block-diagonal), or None.

    Returns:
        ``[..., r, c]`` in ``M``'s dtype (computed in the left side's dtype).
    """
    work = left[0].dtype
    r, c = M.shape[-2:]
    rows, cols = side_size(left[0], M.ndim), side_size(right[0], M.ndim)
    X = M.to(work)
    if rows > r or cols > c:
        X = torch.nn.functional.pad(X, (0, cols - c, 0, rows - r))
    if values is not None:
        q_left, q_right = left[0], right[0]
        X = _mm_right(_mm_left(q_left, X, transpose=True), q_right) * values
        X = _mm_right(_mm_left(q_left, X), q_right, transpose=True)
    else:
        X = _right(_left(X, left), right)
    if rows > r or cols > c:
        X = X[..., :r, :c]
    return X.to(M.dtype)


def _stamp(t: Tensor) -> tuple[Tensor, int]:
    try:
        return t, t._version
    except RuntimeError:  # an inference tensor has no version counter: never reused
        return t, -1


class ProductCache:
    """What a refresh prepared for the per-step product, per key, valid while its source
    tensors are the same objects, unmodified (version counters), and its settings equal.

    Entries not used during a step are dropped at :meth:`end_step` (no stale memory).
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple[Any, ...], Hashable, Any]] = {}
        self._used: set[Hashable] = set()

    def get(
        self,
        key: Hashable,
        sources: Sequence[Tensor],
        settings: Hashable,
        build: Callable[[], Any],
    ) -> Any:
        """The cached value of ``key``, rebuilt with ``build()`` when a source tensor was
        replaced or modified in place or ``settings`` changed.

        Args:
            key: e.g. the layer's name.
            sources: the tensors the value is derived from (held until the entry is dropped).
            settings: everything else it depends on (damping, dtype, refresh period).
            build: computes the value.
        """
        self._used.add(key)
        stamps = tuple(_stamp(t) for t in sources)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == settings and _same(hit[0], stamps):
            return hit[2]
        value = build()
        self._entries[key] = (stamps, settings, value)
        return value

    def end_step(self) -> None:
        """Drop the entries not used since the last call."""
        self._entries = {k: v for k, v in self._entries.items() if k in self._used}
        self._used = set()

    def clear(self) -> None:
        """Drop every entry (e.g. after ``load_state_dict``)."""
        self._entries, self._used = {}, set()

    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(_nbytes(v[2]) for v in self._entries.values())


def _same(a: tuple[tuple[Tensor, int], ...], b: tuple[tuple[Tensor, int], ...]) -> bool:
    return len(a) == len(b) and all(
        x is y and vx == vy and vx >= 0 for (x, vx), (y, vy) in zip(a, b)
    )


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


__all__ = [
    "ProductCache",
    "Side",
    "block_shape",
    "diagonal_blocks",
    "explicit_is_cheaper",
    "kronecker_solve",
    "make_side",
    "side_size",
]
