"""Per-sample gradient *forms*: how a parameter's per-sample gradients are represented.

A rule turns what the engine captured for a layer (its inputs ``x`` and the backpropagated output
gradients ``g``) into one form per parameter. A form knows how to reduce itself to every
quantity, choosing the cheapest contraction for its shapes; most never build the tensor of
per-sample gradients unless it is asked for.

**Rows.** The engine backpropagates ``K`` output-space vectors per sample (``K = 1`` for the
loss gradient; ``C`` loss-Hessian columns for exact curvature; ``M`` Monte-Carlo draws). A form
holds the ``K * N`` per-(vector, sample) gradients ``g_{k,n}``, ordered vector-major: row
``k * N + n``. For ``K = 1`` the rows are the per-sample gradients. The layer input is shared by
the ``K`` vectors of a sample and is never repeated.

Forms:

* :class:`OuterForm` -- ``g_{k,n} = sum_s G[k n, s]^T A[n, s]`` (``nn.Linear``, unfolded
  convolutions); ``s`` runs over the *shared axis* (sequence or spatial positions, calls).
* :class:`ScatterForm` -- ``g_{k,n} = sum_s onehot(I[n, s]) G[k n, s]^T`` (``nn.Embedding``).
* :class:`SampleForm` -- the rows themselves, ``[K N, *shape]`` (biases, normalization layers,
  the generic rule).
* :class:`SumForm`, :class:`ConcatForm`, :class:`PermutedForm` -- compositions (tied weights,
  grouped convolutions, transposed-convolution weights).

Conventions: the rows sum (over ``n``) to the gradient of the loss as ``loss_fn`` defines it when
``K = 1``; with loss-Hessian vectors, ``sum_{k,n} g_{k,n} g_{k,n}^T`` is the GGN.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

# Chunking bound for temporaries of per-row gradients that are reduced right away: number of
# elements per chunk.
CHUNK_ELEMENTS = 1 << 24


def row_index(index: Tensor, vectors: int, num_samples: int) -> Tensor:
    """Rows ``k * N + index[j]`` for every vector ``k`` (vector-major)."""
    if vectors == 1:
        return index
    offsets = torch.arange(vectors, device=index.device).unsqueeze(1) * num_samples
    return (offsets + index.unsqueeze(0)).reshape(-1)


class Form(ABC):
    """Per-row gradients of one parameter of shape ``shape``: ``vectors`` (K) vectors for each
    of ``num_samples`` (N) samples.

    The public reductions are memoized per form, so several quantities requested together
    share work; once the rows are materialized, the other reductions read them instead of
    recomputing. Subclasses implement the ``_``-prefixed methods.
    """

    shape: torch.Size
    num_samples: int
    vectors: int

    @property
    def rows(self) -> int:
        return self.vectors * self.num_samples

    @abstractmethod
    def select(self, index: Tensor) -> Form:
        """The form restricted to the samples ``index`` (1-d long tensor), all vectors kept."""

    def dots_with_sum(self) -> Tensor:
        """``<g_r, sum_q g_q>`` per row, ``[rows]`` (the cockpit's gradient tests)."""
        return self._memo("dots_with_sum", lambda: self.project(self.grad()[None])[:, 0])

    def worth_materializing(self, budget: int) -> bool:
        """Whether several reductions of this form (norms, dots, projections, entries) are
        cheaper from the materialized rows than each from the factors, with the rows taking at
        most ``budget`` elements. Default: no (forms without a cheaper closed form materialize
        on demand anyway)."""
        return False

    def entries(self, rows: Tensor, flat: Tensor) -> Tensor:
        """Single entries of the rows: ``g_{rows[e]}[flat[e]]`` (flattened index into
        ``shape``), ``[E]``. Default: materialize the distinct rows asked for."""
        if self.materialized:
            return self.batch_grad().reshape(self.rows, -1)[rows, flat]
        distinct, where = torch.unique(rows, return_inverse=True)
        sample = distinct % self.num_samples
        picked = (
            self.select(sample).batch_grad() if self.vectors == 1 else self.batch_grad()[distinct]
        )
        return picked.reshape(picked.shape[0], -1)[where, flat]

    def _memo(self, key: str, fn: Callable[[], Tensor]) -> Tensor:
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = fn()
        return cache[key]

    def provide(self, key: str, value: Tensor) -> None:
        """Provide a reduction computed elsewhere (e.g. the gradient from autograd)."""
        self.__dict__.setdefault("_cache", {})[key] = value

    @property
    def low_precision(self) -> bool:
        """Whether the form holds float16/bfloat16 tensors (whose squares and sums of squares
        overflow or lose precision: such reductions run on :meth:`float32`)."""
        return any(t.dtype in LOW_PRECISION for t in _tensors(self))

    def float32(self) -> Form:
        """A copy of the form with its floating tensors in float32 (memoized)."""
        twin = self.__dict__.get("_float32")
        if twin is None:
            twin = self.__dict__["_float32"] = _converted(self)
        return twin

    @property
    def materialized(self) -> bool:
        return "batch_grad" in self.__dict__.get("_cache", {})

    def batch_grad(self, out: Tensor | None = None) -> Tensor:
        """The rows, ``[K N, *shape]``; written into ``out`` if given (memory reuse across
        calls: a fresh allocation of this size costs more than computing it)."""
        if out is None:
            return self._memo("batch_grad", self._batch_grad)
        if out.shape != (self.rows, *self.shape):
            raise ValueError(
                f"out has shape {tuple(out.shape)}, expected {(self.rows, *self.shape)}"
            )
        self.provide("batch_grad", self._batch_grad(out))
        return out

    def grad(self) -> Tensor:
        """Sum of the rows, ``shape``."""
        if self.materialized:
            return self._memo("grad", lambda: self.batch_grad().sum(0))
        return self._memo("grad", self._grad)

    def batch_l2(self) -> Tensor:
        """Squared Euclidean norms of the rows, ``[K N]`` (float32 or wider: half-precision
        forms accumulate in float32)."""
        if self.low_precision:
            return self._memo("batch_l2", lambda: self.float32().batch_l2())
        if self.materialized:
            return self._memo("batch_l2", lambda: Form._batch_l2(self))
        return self._memo("batch_l2", self._batch_l2)

    def batch_dot(self) -> Tensor:
        """Inner products of the rows, ``[K N, K N]`` (for ``K > 1``: the Gram matrix of the
        GGN factor, whose nonzero eigenvalues are the GGN's); float32 for half precision."""
        if self.low_precision:
            return self._memo("batch_dot", lambda: self.float32().batch_dot())
        if self.materialized:
            return self._memo("batch_dot", lambda: Form._batch_dot(self))
        return self._memo("batch_dot", self._batch_dot)

    def sum_grad_squared(self) -> Tensor:
        """Sum over rows of their element-wise squares, ``shape`` (for loss-Hessian vectors:
        the GGN diagonal); float32 for half precision."""
        if self.low_precision:
            return self._memo("sgs", lambda: self.float32().sum_grad_squared())
        if self.materialized:
            return self._memo("sgs", lambda: Form._sum_grad_squared(self))
        return self._memo("sgs", self._sum_grad_squared)

    def batch_sum_grad_squared(self) -> Tensor:
        """Per sample, the sum over its ``K`` rows of their element-wise squares,
        ``[N, *shape]`` (per-sample GGN diagonals); float32 for half precision."""
        if self.low_precision:
            return self._memo("bsgs", lambda: self.float32().batch_sum_grad_squared())
        if self.materialized:
            return self._memo("bsgs", lambda: Form._batch_sum_grad_squared(self))
        return self._memo("bsgs", self._batch_sum_grad_squared)

    def cross_dot(self, other: Form) -> Tensor:
        """Inner products of this form's rows with ``other``'s rows (same parameter, same
        layer inputs, other backpropagated vectors), ``[rows, other.rows]``."""
        return self._cross_dot(other)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Linear combinations of the rows, ``sum_r coefficients[r, j] g_r``: ``[c, *shape]``
        for ``coefficients`` ``[rows, c]`` (e.g. GGN eigenvectors ``V u``)."""
        if self.materialized:
            return Form._combine(self, coefficients)
        return self._combine(coefficients)

    def project(self, vectors: Tensor) -> Tensor:
        """Inner products of the rows with ``vectors`` ``[c, *shape]``: ``[rows, c]`` (with
        :meth:`combine`, products with ``sum_r g_r g_r^T`` without forming the rows)."""
        if self.materialized:
            return Form._project(self, vectors)
        return self._project(vectors)

    # -- defaults from materialized rows -------------------------------------------------------
    def _cross_dot(self, other: Form) -> Tensor:
        return self.batch_grad().flatten(1) @ other.batch_grad().flatten(1).T

    def _combine(self, coefficients: Tensor) -> Tensor:
        flat = self.batch_grad().flatten(1)
        return (coefficients.T @ flat).reshape(-1, *self.shape)

    def _project(self, vectors: Tensor) -> Tensor:
        return self.batch_grad().flatten(1) @ vectors.reshape(vectors.shape[0], -1).T

    @abstractmethod
    def _batch_grad(self, out: Tensor | None = None) -> Tensor: ...

    def _grad(self) -> Tensor:
        return self.batch_grad().sum(0)

    def _batch_l2(self) -> Tensor:
        return torch.linalg.vector_norm(self.batch_grad().flatten(1), dim=1).square()

    def _batch_dot(self) -> Tensor:
        flat = self.batch_grad().flatten(1)
        return flat @ flat.T

    def _sum_grad_squared(self) -> Tensor:
        return sum_of_squares(self.batch_grad())

    def _batch_sum_grad_squared(self) -> Tensor:
        squares = self.batch_grad().pow(2)
        return squares.reshape(self.vectors, self.num_samples, *self.shape).sum(0)


LOW_PRECISION = (torch.float16, torch.bfloat16)
#: rows at least this long are squared and summed row by row on the CPU (shorter ones cost
#: more in per-row dispatch than their temporary)
ROW_BY_ROW_MIN = 1 << 14


def sum_of_squares(rows: Tensor) -> Tensor:
    """``rows.pow(2).sum(0)``; on the CPU for long rows one fused ``addcmul_`` per row into
    the result instead of a temporary the size of ``rows`` (whose fresh pages cost more than
    the arithmetic: 0.7 vs 2.3 ms for ``[64, 55296]`` float32 rows)."""
    if rows.device.type != "cpu" or rows.shape[0] < 2 or rows[0].numel() < ROW_BY_ROW_MIN:
        return rows.pow(2).sum(0)
    if torch.is_grad_enabled() and rows.requires_grad:
        return rows.pow(2).sum(0)
    total = torch.zeros(rows.shape[1:], dtype=rows.dtype, device=rows.device)
    for row in rows:
        total.addcmul_(row, row)
    return total


def _tensors(form: Form) -> list[Tensor]:
    """The floating tensors a form holds (its parts' too), not its memoized reductions."""
    found: list[Tensor] = []
    for key, value in vars(form).items():
        if key in ("_cache", "_float32"):
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, Tensor) and item.is_floating_point():
                found.append(item)
            elif isinstance(item, Form):
                found.extend(_tensors(item))
    return found


def _converted(form: Form) -> Form:
    twin = copy.copy(form)
    state: dict = {}
    for key, value in vars(form).items():
        if key == "_float32":
            continue
        if key == "_cache":  # keep materialized rows only, in float32
            rows = value.get("batch_grad")
            state[key] = {} if rows is None else {"batch_grad": rows.float()}
        elif isinstance(value, Tensor) and value.dtype in LOW_PRECISION:
            state[key] = value.float()
        elif isinstance(value, Form):
            state[key] = value.float32()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Form) for v in value):
            state[key] = type(value)(v.float32() for v in value)
        else:
            state[key] = value
    twin.__dict__.clear()
    twin.__dict__.update(state)
    return twin
