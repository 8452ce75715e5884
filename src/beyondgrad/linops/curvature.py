"""Curvature matrices of a loss over a whole data set, as linear operators.

``Op(model, loss_fn, data, params=None, num_data=None)``: ``data`` is any iterable of
``(X, y)`` batches (a ``DataLoader``, a list; ``X`` a tensor, tuple or dict as in
:func:`beyondgrad.compute`). The operator is the curvature of the data-set loss
``L = R_D * sum_n l_n`` with ``R_D = 1/num_data`` for ``reduction="mean"`` (1 for ``"sum"``),
i.e. a batch of ``N_b`` samples enters with weight ``N_b / num_data`` (mean) or 1 (sum); uneven
last batches are handled, ``num_data`` defaults to the number of samples seen in a first pass.
(For a mean over tokens or class weights, the batch weight assumes equal normalizers per
sample.) ``batch_size_fn(X)`` gives a batch's number of samples when its first tensor leaf
does not lead with the sample axis. Products act on flat vectors over the chosen parameters
(``params``: names, default all trainable ones, in ``model.named_parameters()`` order), or on
per-parameter tensors (a list, tuple or dict, see :meth:`CurvatureOperator.__matmul__`), and
take a block of ``k`` vectors in one pass over the data.

* :class:`Hessian` -- Hessian-vector products by reverse-over-reverse AD (double backward; the
  forward-over-reverse ``jvp(jacrev)`` route gives wrong products for ``nn.LayerNorm`` weights
  in current PyTorch).
* :class:`GGN` -- ``J^T H_f J`` products (exact), by a double-vjp Jacobian product, the loss
  Hessian, and a vjp.
* :class:`EmpiricalFisher` -- ``R_D sum_n grad l_n grad l_n^T`` from per-sample gradients.
* :class:`Fisher` -- the Monte-Carlo Fisher from ``mc_samples`` sampled labels per sample
  (one fixed sample: per-batch seeds; needs a fixed data order).

Under ``torch.distributed`` (``process_group``, see :mod:`beyondgrad.distributed`) each rank
passes its shard of the data; products, diagonals and traces are summed over the ranks with
``num_data`` the total over all shards, so every rank holds the operator of the whole data set.
* :class:`Diagonal` -- a diagonal from the engine (``DiagGGN``, ``DiagHessian``, ...).

Products with a block ``M`` ``[P, k]`` return a column-major ``[P, k]`` result. Iterative
algorithms run inside :meth:`CurvatureOperator.repeated_products`, which keeps each batch's
vector-independent state (graphs, forms) between products. ``diagonal()`` and ``trace()`` are
exact (one pass, from the engine) for all four operators where the engine covers the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten

from .. import result_pool
from ..distributed import group as dist_group
from ..distributed.fsdp import refuse_sharded
from . import _engine, layout
from .base import LinearOperator
from .data import DataSet, require_reiterable
from .structures import Diagonal  # noqa: F401 (its former home)


def _check_eval_mode(model: nn.Module) -> None:
    """Batch statistics and dropout make the curvature depend on how the data is batched and
    on random draws: refuse unless the caller opts in."""
    for name, m in model.named_modules():
        batch_stats = isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or m.running_mean is None
        )
        dropout = isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        if batch_stats or dropout:
            raise RuntimeError(
                f"module '{name}' ({type(m).__name__}) behaves differently per batch in "
                "training mode, so the data-set curvature is ill-defined. Call model.eval(), or "
                "pass allow_train_mode=True to use the batch-wise behaviour as is."
            )


def _fingerprint(data: Iterable[tuple[Any, Tensor]]) -> list[float]:
    """A cheap signature of the data order (sum of the first target entries per batch)."""
    return [float(y.reshape(-1)[: min(8, y.numel())].double().sum()) for _, y in data]


def _check_finite(op: Any, out: Tensor, what: str) -> None:
    """Raise (as :func:`beyondgrad.compute` does) instead of returning non-finite values. One
    reduction (a sum is non-finite if any entry is; no mask of ``out``'s size), element-wise
    only when the sum is not finite (it can overflow)."""
    if bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all()):
        return
    raise FloatingPointError(
        f"{type(op).__name__}: non-finite {what} (inf/nan in the data, the model's outputs "
        "or the vectors); nothing is returned"
    )


def _check_all_finite(op: Any, tensors: Sequence[Tensor], what: str) -> None:
    """:func:`_check_finite` for several tensors: one sum per tensor and one host read for all
    (a read per tensor cost ~5% of the mlp's Hessian @ v; ``torch._foreach_norm`` in place of
    the sums, 2-3x the sums' time: 5 of the mlp's 55 ms Hessian @ V with 16 columns)."""
    if not tensors:
        return
    alike = len({(t.dtype, t.device) for t in tensors}) == 1
    if alike and bool(torch.isfinite(torch.stack([t.sum() for t in tensors]).sum())):
        return
    for t in tensors:  # the sums can overflow where every entry is finite
        _check_finite(op, t, what)


def _owned(blocks: Sequence[Tensor]) -> list[Tensor]:
    """``blocks`` where each may be updated in place (dense, and no other block shares its
    memory), else copies: an expanded gradient (e.g. of a sum) shares one element among many
    entries, and autograd hands the same tensor to both inputs of an addition (``W = base +
    delta``: one product for ``base`` and ``delta``)."""
    out, seen = [], set()
    for b in blocks:
        ptr = b.untyped_storage().data_ptr()
        out.append(b if b.is_contiguous() and ptr not in seen else b.clone())
        seen.add(ptr)
    return out


class _KeptBatchState:
    """Per-batch state kept between products inside :meth:`repeated_products` (shared by the
    curvature operators and :class:`Jacobian`). Needs ``model``, ``cache_batches``,
    ``_cache``/``_uncacheable`` (see :meth:`_init_kept_state`) and ``_prepare``."""

    model: nn.Module
    cache_batches: int | None
    _cache: dict[int, tuple[Any, Tensor, tuple[Any, ...], Any]] | None
    _uncacheable: set[int]

    def _init_kept_state(self, cache_batches: int | None) -> None:
        if cache_batches is not None and cache_batches < 0:
            raise ValueError(f"cache_batches must be >= 0 or None, got {cache_batches}")
        self.cache_batches = cache_batches
        self._cache = None
        self._uncacheable = set()

    def _prepare(self, position: int, X: Any, y: Tensor) -> Any:
        raise NotImplementedError

    @contextmanager
    def repeated_products(self) -> Iterator[Any]:
        """Within this context, the per-batch state that does not depend on the vectors (the
        Hessian's gradient graph, the GGN's forward and Jacobian graphs, the engine's
        per-sample forms for the Fisher types) is kept for the first ``cache_batches``
        batches, so that a further product on them skips the forward pass (and, for the
        Fisher types, all of autograd). Iterative algorithms (``bg.linalg.eigsh``, ``trace``,
        ``solve``, ...) enter it themselves. Batches are recognized by position and identity:
        a loader that yields new tensors each pass gets no reuse (after the first miss its
        positions are no longer kept). A change of the model's parameters or buffers (in
        place or by ``p.data = ...``), of its train/eval mode or of a kept batch's tensors
        meanwhile raises. The memory is released when the context exits."""
        outer = self._cache is not None
        if not outer:
            self._cache, self._uncacheable = {}, set()
        try:
            yield self
        finally:
            if not outer:
                self._cache = None

    def _signature(self, X: Any, y: Tensor) -> tuple[Any, ...]:
        """What the kept state depends on besides the batch's identity: the storage and
        version counters of every parameter and (eval-mode) buffer of the model (in-place
        updates bump the versions, ``p.data = ...`` changes the storage), the batch tensors'
        versions (a prefetcher rewriting one buffer) and the train/eval mode."""
        buffers = [  # a module in training mode updates its buffers in every forward
            b for m in self.model.modules() if not m.training for b in m.buffers(recurse=False)
        ]
        tensors = [*self.model.parameters(), *buffers]
        batch = [t for t in tree_flatten((X, y))[0] if isinstance(t, Tensor)]
        return (
            tuple((t.data_ptr(), t._version) for t in tensors),
            tuple(t._version for t in batch),
            tuple(m.training for m in self.model.modules()),
        )

    def _kept(self, position: int) -> bool:
        """Whether the state of the batch at ``position`` is kept for further products."""
        return not (
            self._cache is None
            or (self.cache_batches is not None and position >= self.cache_batches)
            or position in self._uncacheable
        )

    def _state(self, position: int, X: Any, y: Tensor) -> Any:
        cache = self._cache
        if cache is None or not self._kept(position):
            return self._prepare(position, X, y)
        hit = cache.get(position)
        if hit is not None:
            if hit[0] is not X or hit[1] is not y:
                # a loader yielding new tensors every pass: keeping its state buys nothing
                del cache[position]
                self._uncacheable.add(position)
                return self._prepare(position, X, y)
            if hit[2] != self._signature(X, y):
                raise RuntimeError(
                    f"{type(self).__name__}: the model (parameters, buffers, train/eval mode) "
                    "or the batch changed while per-batch state was kept for repeated "
                    "products; build the operator anew (or leave the repeated_products() "
                    "context first)"
                )
            return hit[3]
        state = self._prepare(position, X, y)
        cache[position] = (X, y, self._signature(X, y), state)
        return state


class CurvatureOperator(_KeptBatchState, LinearOperator):
    """Base of the data-set curvature operators (see the module docstring).

    Args:
        model: the model (in eval mode unless ``allow_train_mode``).
        loss_fn: a supported loss module; its reduction sets the batch weights.
        data: a re-iterable collection of ``(X, y)`` batches (a list, a ``DataLoader``),
            read once per product.
        params: the trainable parameter names the operator acts on (default: all, in
            ``model.named_parameters()`` order); ``P`` is their total size.
        num_data: the data-set size in ``R_D = 1/num_data`` (default: counted in a first
            pass).
        progressbar: show a ``tqdm`` bar for each pass over the data.
        allow_train_mode: accept modules in training mode (batch statistics, dropout),
            which make the curvature depend on the batching and random draws.
        batch_size_fn: ``X -> N_b`` where the first tensor leaf of ``X`` does not lead with
            the sample axis.
        cache_batches: how many leading batches keep their state inside
            :meth:`repeated_products` (``None``: all).
        process_group: ``None`` (default: the default group when ``torch.distributed`` is
            initialized with several ranks), a ``ProcessGroup``, or ``"local"``. With a
            group, ``data`` is this rank's shard and products, :meth:`diagonal` and
            :meth:`trace` are summed over the ranks: every rank gets the operator of the whole
            data set (the vectors must be equal on every rank; checked per product).

    Raises:
        KeyError: unknown or frozen parameter names.
        ValueError: no parameter selected.
        RuntimeError: a module behaves differently per batch in training mode (dropout,
            batch norm) and ``allow_train_mode`` is false.
    """

    symmetric = True

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[tuple[Any, Tensor]],
        params: Sequence[str] | None = None,
        num_data: int | None = None,
        progressbar: bool = False,
        allow_train_mode: bool = False,
        batch_size_fn: Callable[[Any], int] | None = None,
        cache_batches: int | None = 1,
        process_group: Any = None,
    ):
        _engine.check_loss_fn(loss_fn)
        self._init_kept_state(cache_batches)
        if not allow_train_mode:
            _check_eval_mode(model)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if params is None:
            params = list(named)
        missing = [n for n in params if n not in named]
        if missing:
            raise KeyError(f"unknown or frozen parameters: {missing}")
        if not params:
            raise ValueError("no parameters selected")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.names = list(params)
        self.params = [named[n] for n in self.names]
        refuse_sharded(self.params, type(self).__name__)  # FSDP2 models: a clear error
        self.sizes = [p.numel() for p in self.params]
        self.progressbar = progressbar
        self.data_set = DataSet(
            data, loss_fn, num_data, batch_size_fn, who=type(self).__name__,
            process_group=process_group,
        )  # fmt: skip
        self.group = self.data_set.group
        shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in zip(self.names, self.params)]
        what = (type(self).__name__, shapes, loss_fn.reduction)
        dist_group.check_same(what, "the operator's parameters", self.group)
        self.batch_size_fn = self.data_set.batch_size_fn
        self.num_data = self.data_set.total()
        first = self.params[0]
        super().__init__((sum(self.sizes),) * 2, first.dtype, first.device)  # type: ignore[arg-type]

    # -- helpers -------------------------------------------------------------------------------
    def _batches(self) -> Iterable[tuple[Any, Tensor, int]]:
        """``(X, y, N_b)`` per batch of one pass (with a progress bar if asked)."""
        if self.progressbar:
            from tqdm.auto import tqdm  # an optional dependency

            return tqdm(self.data_set.batches(), desc=type(self).__name__, leave=False)
        return self.data_set.batches()

    def split(self, M: Tensor) -> list[Tensor]:
        """``[P, k]`` -> per parameter ``[k, *shape]`` (strided views of ``M``)."""
        blocks = torch.split(M, self.sizes, 0)
        return [b.T.reshape(M.shape[1], *p.shape) for b, p in zip(blocks, self.params)]

    def split_contiguous(self, M: Tensor) -> list[Tensor]:
        """Per parameter contiguous blocks of a block of vectors.

        Args:
            M: ``[P, k]``, any strides (a row-major block is transposed in cache-sized
                blocks, :func:`~beyondgrad.linops.base.columns_first`; a column-major one is
                not copied).

        Returns:
            One contiguous ``[k, *shape]`` tensor per parameter.
        """
        return layout.split_block(M, [p.shape for p in self.params])

    def _accumulate(self, out: Tensor | None, blocks: Sequence[Tensor], weight: float) -> Tensor:
        """``out += weight * blocks`` (per parameter ``[k, *shape]``), parameter by parameter,
        into ``out`` ``[P, k]`` (allocated on the first batch). ``out`` is column-major (the
        transpose of a contiguous ``[k, P]``): every parameter's block is then a contiguous
        copy, where a row-major ``[P, k]`` would cost a transposing pass over all entries."""
        k = blocks[0].shape[0]
        first = out is None
        if out is None:
            out = result_pool.empty((k, self.shape[0]), blocks[0]).T
        start = 0
        for b, size in zip(blocks, self.sizes):
            target, src = out[start : start + size].T, b.reshape(k, size)
            start += size
            if first and weight != 1.0:
                torch.mul(src, weight, out=target)  # one pass, where copy + scale take two
            elif first:
                target.copy_(src)
            else:
                target.add_(src, alpha=weight)
        return out

    def _weighted_batch_results(self, V: list[Tensor]) -> Iterator[tuple[list[Tensor], float]]:
        """Each batch's products with ``V`` (per parameter ``[k, *shape]``) and its weight."""
        for position, (X, y, N) in enumerate(self._batches()):
            yield self._batch_result(position, X, y, V), self.data_set.weight(N)

    def _matmat(self, M: Tensor) -> Tensor:
        dist_group.check_same_tensor(M, "the vectors of a product", self.group)
        # contiguous per-parameter blocks: one copy here is cheaper than the strided reads
        # of every batch's vmapped products (free for a single vector)
        out = None
        for blocks, weight in self._weighted_batch_results(self.split_contiguous(M)):
            out = self._accumulate(out, blocks, weight)
        out = self._reduced(out, (M.shape[1], self.shape[0]), True)
        _check_finite(self, out, "product")
        return out

    def __matmul__(self, other: Any) -> Any:
        """``A @ v`` / ``A @ V`` on flat vectors (:class:`LinearOperator`), or on vectors in the
        parameters' layout: a list or tuple (in ``names`` order) or a dict keyed by the
        parameter names, each entry ``[*shape]`` (one vector) or ``[k, *shape]`` (a block of
        ``k``, leading like ``vmap``'s and ``is_grads_batched``'s); the result comes in the same
        form. The parameter layout saves the flat layout's two copies of the block (into the
        per-parameter blocks every pass works on, and back into ``[P, k]``): on the benchmarks'
        mlp (535,818 parameters, 16 columns) about 11 ms of a 45 ms ``GGN @ V``.

        Raises:
            KeyError: a dict whose keys are not the operator's parameter names.
            TypeError: an entry that is not a tensor.
            ValueError: a wrong number of tensors, or a tensor of the wrong shape or device.
        """
        if layout.is_parameter_layout(other):
            return self._parameter_product(other)
        return super().__matmul__(other)

    def _parameter_product(self, other: layout.ParameterVectors) -> Any:
        shapes = [p.shape for p in self.params]
        V, single = layout.parameter_block(other, self.names, shapes, self.dtype, self.device)
        if self.group is not None:
            flat = torch.cat([v.reshape(-1) for v in V])
            dist_group.check_same_tensor(flat, "the vectors of a product", self.group)
        out: list[Tensor] | None = None
        for blocks, weight in self._weighted_batch_results(V):
            if out is None:  # a batch's products are fresh tensors: the sum may own them
                out = _owned(blocks)
                if weight != 1.0:
                    out = [t.mul_(weight) for t in out]
            else:
                out = [t.add_(b, alpha=weight) for t, b in zip(out, blocks)]
        if out is None:
            if self.group is None:
                raise ValueError("the data set is empty")
            out = [torch.zeros_like(v) for v in V]
        if self.group is not None:  # one all-reduce for all parameters
            flat = dist_group.all_reduce_sum_(torch.cat([t.reshape(-1) for t in out]), self.group)
            out = [f.view_as(t) for f, t in zip(torch.split(flat, [t.numel() for t in out]), out)]
        _check_all_finite(self, out, "product")
        return layout.in_layout_of(other, self.names, out, single)

    def _reduced(self, out: Tensor | None, shape: tuple[int, ...], transpose: bool) -> Tensor:
        """This rank's sum over its batches, summed over the ranks (zeros for an empty shard;
        without a group an empty data set raises)."""
        if out is None:
            if self.group is None:
                raise ValueError("the data set is empty")
            out = torch.zeros(shape, dtype=self.dtype, device=self.device)
            out = out.T if transpose else out
        return dist_group.all_reduce_sum_(out, self.group)

    def _prepare(self, position: int, X: Any, y: Tensor) -> Any:
        """The vector-independent state of one batch (graphs, forms)."""
        raise NotImplementedError

    def _batch_products(self, state: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        """One batch's products with the vectors ``V`` (per parameter ``[k, *shape]``),
        without the batch weight."""
        raise NotImplementedError

    def _batch_result(self, position: int, X: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        """:meth:`_batch_products` on the batch's (kept or new) state."""
        return self._batch_products(self._state(position, X, y), y, V)

    # -- exact diagonal and trace ----------------------------------------------------------------
    def diagonal(self) -> Tensor:
        """The exact diagonal ``[P]`` in one pass over the data (from the engine)."""
        out: Tensor | None = None
        for position, (X, y, N) in enumerate(self._batches()):
            d = torch.cat([t.reshape(-1) for t in self._batch_diagonal(position, X, y)])
            part = self.data_set.weight(N) * d
            out = part if out is None else out + part
        out = self._reduced(out, (self.shape[0],), False)
        _check_finite(self, out, "diagonal")
        return out

    def trace(self) -> Tensor:
        """The exact trace (sum of :meth:`diagonal`)."""
        return self.diagonal().sum()

    def _batch_diagonal(self, position: int, X: Any, y: Tensor) -> list[Tensor]:
        raise NotImplementedError(
            f"{type(self).__name__} has no exact diagonal; estimate it with "
            "bg.linalg.diagonal(A, ...) or its trace with bg.linalg.trace(A, ...)"
        )

    def _engine_diagonal(self, X: Any, y: Tensor, quantity: Any) -> list[Tensor]:
        reason = _engine.samples_coupled(self.model)
        if reason is not None:  # the engine's diagonals treat the samples as independent
            raise RuntimeError(
                f"{type(self).__name__}.diagonal(): the exact diagonal is not available when "
                f"the samples are coupled ({reason}); estimate it with "
                "bg.linalg.diagonal(A, num_matvecs, method='xdiag'), or call model.eval()"
            )
        values = _engine.batch_diagonal(self.model, self.loss_fn, X, y, quantity)
        return [values[n] for n in self.names]

    def _loss(self, X: Any, y: Tensor) -> tuple[Tensor, Tensor]:
        # fused attention kernels lack double backward: products of second derivatives run
        # the attention through PyTorch's composite (math) implementation
        with sdpa_kernel([SDPBackend.MATH]):
            out = _engine.call_model(self.model, X)
        _engine.check_target(self.loss_fn, out, y)
        return self._finite(self.loss_fn(out, y)), out

    def _finite(self, loss: Tensor) -> Tensor:
        """``loss``, after checking that it is finite (raises otherwise)."""
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"{type(self).__name__}: the loss of a batch is not finite ({loss.item()})"
            )
        return loss


def _batched_grad(
    outputs: Any,
    inputs: Any,
    vectors: Any,
    per_vector: bool = False,
    keep_graph: bool = True,
    **kwargs: Any,
) -> tuple[Tensor, ...]:
    """``autograd.grad`` with a leading batch axis on the cotangents, as one vectorized pass,
    or as one plain pass per vector where that is faster (``per_vector``: graphs with
    convolutions, see :func:`~beyondgrad.linops._engine.per_vector_graph`) or where an
    operation has no vmap batching rule. ``keep_graph=False``: the graph serves no further
    pass, so a single column's pass frees its saved tensors as it goes (double backward on the
    cnn: 95 -> 90 ms, a plain double backward's time)."""
    kwargs = {**kwargs, "retain_graph": True}  # a failed batched attempt must not free it
    first = vectors[0] if isinstance(vectors, (list, tuple)) else vectors
    if first.shape[0] == 1:  # one column: a plain backward pass is cheaper than vmap's
        single = [v[0] for v in vectors] if isinstance(vectors, (list, tuple)) else vectors[0]
        kwargs["retain_graph"] = keep_graph
        grads = torch.autograd.grad(outputs, inputs, single, **kwargs)
        return tuple(None if g is None else g.unsqueeze(0) for g in grads)
    if not per_vector:
        try:
            return torch.autograd.grad(outputs, inputs, vectors, is_grads_batched=True, **kwargs)
        except RuntimeError:
            pass
    parts = [
        torch.autograd.grad(
            outputs,
            inputs,
            [v[i] for v in vectors] if isinstance(vectors, (list, tuple)) else vectors[i],
            **kwargs,
        )
        for i in range(first.shape[0])
    ]
    return tuple(None if p[0] is None else torch.stack(p) for p in zip(*parts))


MEASURED_COLUMNS = 4
"""Products with at least this many columns through a graph without a known slow vmap rule
measure whether one vectorized pass or one pass per column is faster (:class:`PassTimer`)."""
MEASURED_PRODUCTS = 3
"""How many such products an operator times (whole products, alternating: vectorized, per
column, vectorized; the faster of each way counts) before it keeps the faster way."""


def _timed_per_column(call: Callable[[], Any], k: int, device: torch.device) -> tuple[Any, float]:
    """``call()`` and its wall time per column (of ``k``), the device synchronized around it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = call()
    sync()
    return out, (time.perf_counter() - start) / k


class RouteTimer:
    """Chooses, per operator, between two routes to the same product: its first ``calls``
    calls (default 2 :data:`MEASURED_PRODUCTS`) alternate between them, first route first,
    timed (the device synchronized around each) per column; then the route with the lower best
    time is kept. A route that fails (``refuse``) is not tried again.

    Attributes:
        second: the choice (True: the second route), None while measuring.
    """

    def __init__(self, calls: int = 2 * MEASURED_PRODUCTS) -> None:
        self.second: bool | None = None
        self.calls = calls
        self._best = {False: math.inf, True: math.inf}
        self._calls = 0

    def run(
        self,
        first: Callable[[], Any],
        second: Callable[[], Any],
        device: torch.device,
        k: int = 1,
    ) -> Any:
        """The product (of ``k`` columns) by the chosen route, or by the next one to time."""
        if self.second is not None:
            return second() if self.second else first()
        way = self._calls % 2 == 1
        out, per_column = _timed_per_column(second if way else first, k, device)
        self._best[way] = min(self._best[way], per_column)
        self._calls += 1
        if self._calls == self.calls:
            self.second = self._best[True] < self._best[False]
        return out

    def refuse(self, second: bool) -> None:
        """Never take the given route again (it raised)."""
        self.second = not second


class PassTimer:
    """Chooses, per operator, between one vectorized backward over ``k`` columns and ``k``
    plain ones: its first :data:`MEASURED_PRODUCTS` products with at least
    :data:`MEASURED_COLUMNS` columns alternate between the two ways, timed (the device
    synchronized around each); then the way with the lower best time per column is kept (a
    whole product each, since a pass's fixed cost is spread over its columns; the best of each
    way, since the first vectorized call also pays its set-up). Both ways give the same columns
    up to rounding. Why measure: vmap's double-backward rules copy operands, which costs more
    than it saves on compute-bound models (CPU, Hessian @ V with 16 columns: the benchmarks'
    char-level transformer 1570 ms vectorized vs 1190 per column, an MLP on [1024, 128] rows
    331 vs 187 ms) and less on dispatch-bound ones (the benchmarks' small MLP: vectorized 1.1x
    faster). Graphs with convolutions or batch/group norm always go per column
    (``per_vector``).

    Attributes:
        per_column: the choice, None while measuring.
    """

    def __init__(self) -> None:
        self._timer = RouteTimer(calls=MEASURED_PRODUCTS)  # first vectorized, then per column

    @property
    def per_column(self) -> bool | None:
        """The choice (True: one pass per column), None while measuring."""
        return self._timer.second

    @per_column.setter
    def per_column(self, value: bool | None) -> None:
        self._timer.second = value

    def grad(
        self, outputs: Any, inputs: Any, vectors: list[Tensor], per_vector: bool, **kwargs: Any
    ) -> tuple[Tensor | None, ...]:
        """:func:`_batched_grad` (``per_vector``: a graph with a known slow vmap rule)."""
        k = vectors[0].shape[0]
        if per_vector or self.per_column is not None or k < MEASURED_COLUMNS:
            per_column = per_vector or bool(self.per_column)
            return _batched_grad(outputs, inputs, vectors, per_column, **kwargs)
        return self._timer.run(
            lambda: _batched_grad(outputs, inputs, vectors, False, **kwargs),
            lambda: _batched_grad(outputs, inputs, vectors, True, **kwargs),
            vectors[0].device,
            k,
        )


JV_CHUNKS: tuple[int | None, ...] = (None, 8, 4, 2)
"""The columns per forward-mode pass that :class:`ChunkTimer` tries (``None``: all)."""


class ChunkTimer:
    """Chooses, per operator, how many columns one forward-mode pass of ``J V`` carries: its
    first products with at least :data:`MEASURED_COLUMNS` columns try each of
    :data:`JV_CHUNKS` (those below the column count) in turn, timed (the device synchronized
    around each), the first one again at the end (its first call pays vmap's set-up); then the
    size with the lowest time per column is kept. Why measure: the tangents of all columns
    are held at once, so on models with large activations the element-wise work of a wide pass
    runs from memory instead of cache (CPU, 16 columns: the benchmarks' transformer 333 ms in
    one pass vs 262 ms in passes of 8, the cnn 758 vs 450 ms in passes of 2), while a small
    model is dispatch-bound and fastest in one pass (the mlp 17 vs 20 ms in passes of 8).
    Every size gives the same columns up to rounding.

    Attributes:
        chunk: the choice (``None``: all columns in one pass); meaningful once ``chosen``.
        chosen: whether the measurements are done.
    """

    def __init__(self, candidates: Sequence[int | None] = JV_CHUNKS) -> None:
        self.candidates = tuple(candidates)
        self.chunk: int | None = None
        self.chosen = False
        self._best: dict[int | None, float] = {}
        self._queue: list[int | None] | None = None

    def run(self, columns: Callable[[int | None], Tensor], k: int, device: torch.device) -> Tensor:
        """``columns(chunk)`` (``[k, ...]``) at the chosen size, or at the next one to time."""
        if self.chosen or k < MEASURED_COLUMNS:
            fits = self.chunk is not None and self.chunk < k
            return columns(self.chunk if self.chosen and fits else None)
        if self._queue is None:
            sizes = [c for c in self.candidates if c is None or c < k]
            self._queue = [*sizes, sizes[0]] if len(sizes) > 1 else sizes
        size = self._queue.pop(0)
        out, per_column = _timed_per_column(lambda: columns(size), k, device)
        self._best[size] = min(self._best.get(size, math.inf), per_column)
        if not self._queue:
            self.chunk, self.chosen = min(self._best, key=self._best.__getitem__), True
        return out


def _needs_second_derivative(err: RuntimeError) -> bool:
    """Whether autograd failed for lack of a double derivative (``hardsigmoid_backward``,
    ``once_differentiable`` functions, ...)."""
    text = str(err)
    return ("derivative for" in text and "not implemented" in text) or "twice" in text


def _forward_jv(
    model: nn.Module,
    names: list[str],
    params: list[Tensor],
    X: Any,
    V: list[Tensor],
    chunk: int | None = None,
) -> Tensor:
    """``J V`` ``[k, *out.shape]`` by forward-mode AD: forward passes carrying ``chunk``
    tangents each (``jvp`` vmapped over the columns; ``None``: all ``k`` in one pass; one
    ``jvp`` per column where vmap fails)."""

    def f(*values: Tensor) -> Tensor:
        return _engine.call_model_with(model, dict(zip(names, values)), X)

    primals = tuple(p.detach() for p in params)
    k = V[0].shape[0]
    with sdpa_kernel([SDPBackend.MATH]):
        if k > 1:
            try:
                jvp = torch.func.vmap(lambda *t: torch.func.jvp(f, primals, t)[1], chunk_size=chunk)
                return jvp(*V)
            except RuntimeError:
                pass
        columns = [torch.func.jvp(f, primals, tuple(v[i] for v in V))[1] for i in range(k)]
    return torch.stack(columns)


def _dual_forward(
    model: nn.Module, names: list[str], params: list[Tensor], X: Any, V: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """The model's output ``f`` with its reverse-mode graph to ``params`` and ``J v``
    (detached, ``f``'s shape), from one forward pass on dual parameters (``V``: one vector,
    per parameter ``[1, *shape]``): forward-mode AD on the parameters themselves, so the
    primal pass records the graph a backward needs. The tangent's own operations are recorded
    too (the parameters require gradients): until it is detached they hold their saved
    tensors, so the peak memory is higher than a plain forward's (measured in two runs: GGN @ v
    on the transformer 2.5-2.9x a forward+backward's peak, 1.5x by two passes; on the cnn
    1.1-1.6x against 1.9x, the second pass's own operands gone)."""
    with torch.enable_grad(), fwAD.dual_level(), sdpa_kernel([SDPBackend.MATH]):
        duals = {n: fwAD.make_dual(p, v[0]) for n, p, v in zip(names, params, V)}
        out = _engine.call_model_with(model, duals, X)
        if not isinstance(out, Tensor):
            raise RuntimeError("the model's output is not a tensor")
        primal, tangent = fwAD.unpack_dual(out)
    if tangent is None or not primal.requires_grad:
        raise RuntimeError("the model's output does not depend on the parameters")
    return primal, tangent.detach()


def _updates_buffers(model: nn.Module) -> bool:
    """Whether a forward pass changes the model's state: a module in training mode with
    buffers (batch norm's running statistics)."""
    return any(m.training and any(True for _ in m.buffers(False)) for m in model.modules())


def _replayable(model: nn.Module, kinds: set[str]) -> bool:
    """Whether a second forward pass (forward-mode AD) reproduces the recorded one: no random
    draws in the graph and no module in training mode that updates buffers (batch norm)."""
    return not _engine.random_graph(kinds) and not _updates_buffers(model)


class _JacobianProducts:
    """``J V`` by forward-mode AD (one forward pass with ``k`` tangents), or by differentiating
    the vjp ``u -> J^T u`` w.r.t. ``u`` (reverse over reverse). Measured on the benchmark
    problems (CPU, one thread, ratio to a forward+backward), forward mode is faster for a
    single product (GGN @ v: mlp 3.3 -> 2.4) and for blocks (GGN @ V, 16 columns: mlp 42 ->
    17, transformer 35 -> 30, cnn 28 -> 24). On a batch whose state is kept (inside
    :meth:`repeated_products`) the reverse route differentiates the kept vjp graph and runs
    no forward pass at all (single vectors: mlp 2.0 vs 2.5 by forward mode), so it is used
    there. Forward mode runs the model a second time, so it is used only where that pass
    reproduces the recorded one (:func:`_replayable`); either route falls back to the other
    where PyTorch lacks a derivative (a forward-mode formula, a double derivative)."""

    model: nn.Module
    names: list[str]
    params: list[Tensor]
    _cache: Any
    _forward_mode: bool = False  # forced: a layer lacks the double derivative
    _reverse_mode: bool = False  # forced: an operation lacks a forward-mode derivative

    def _graph_state(self, out: Any, X: Any, kept: bool) -> dict[str, Any]:
        """The vector-independent state of ``J V`` for one batch with outputs ``out``;
        ``kept``: the state serves further products (:meth:`repeated_products`)."""
        kinds = _engine.graph_kinds(out)
        return {
            "out": out,
            "X": X,
            "per_vector": _engine.per_vector_graph(kinds),
            "forward": not kept and _replayable(self.model, kinds),
        }

    def _jv(self, state: dict[str, Any], V: list[Tensor]) -> Tensor:
        forward = state["forward"] and not self._reverse_mode
        if self._forward_mode or forward:
            try:
                return self._forward_columns(state, V)
            except (RuntimeError, NotImplementedError):
                if self._forward_mode:
                    raise
                self._reverse_mode = True
        return self._reverse_jv(state, V)

    def _reverse_jv(self, state: dict[str, Any], V: list[Tensor]) -> Tensor:
        with torch.enable_grad():
            if "jt_u" not in state:  # the vjp graph u -> J^T u, built once per batch
                out = state["out"]
                state["u"] = u = torch.zeros_like(out, requires_grad=True)
                state["jt_u"] = torch.autograd.grad(
                    out, self.params, u, create_graph=True, allow_unused=True
                )
            pairs = [(j, v) for j, v in zip(state["jt_u"], V) if j is not None]
            if not pairs:
                return state["out"].new_zeros(V[0].shape[0], *state["out"].shape)
            try:
                return _batched_grad(
                    [j for j, _ in pairs], [state["u"]], [v for _, v in pairs], state["per_vector"]
                )[0]
            except RuntimeError as err:
                if not _needs_second_derivative(err):
                    raise
                self._forward_mode = True
        return self._forward_columns(state, V)

    def _forward_columns(self, state: dict[str, Any], V: list[Tensor]) -> Tensor:
        """``J V`` by forward mode, in passes of the measured number of columns."""
        timer = self.__dict__.setdefault("_jv_chunks", ChunkTimer())
        return timer.run(
            lambda chunk: _forward_jv(self.model, self.names, self.params, state["X"], V, chunk),
            V[0].shape[0],
            V[0].device,
        )


class Hessian(CurvatureOperator):
    """The Hessian of the data-set loss (reverse-over-reverse products).

    Each product runs a forward pass and a backward pass with ``create_graph`` per batch, then
    the backward of the gradient graph. Inside :meth:`repeated_products` (entered by the
    ``bg.linalg`` algorithms) the gradient graph is kept, so a further product costs only the
    last backward. ``reuse_graph=True`` keeps every batch's graph for the operator's lifetime
    (holding that memory until the operator is dropped); parameters changed in place raise.
    :meth:`diagonal` / :meth:`trace` are exact from the engine's ``DiagHessian`` where its
    rules cover the model (element-wise nonlinearities; it raises on e.g. LayerNorm)."""

    def __init__(self, *args: Any, reuse_graph: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reuse_graph = reuse_graph
        self._passes = PassTimer()  # the double backward: vectorized or per column, measured
        self._route = RouteTimer()  # one vector: reverse over reverse, or forward over reverse
        if reuse_graph:
            self.cache_batches = None
            self._cache = {}

    def _prepare(
        self, position: int, X: Any, y: Tensor
    ) -> tuple[tuple[Tensor | None, ...], Tensor]:
        """The gradients with their graph, and the loss (whose graph's node kinds decide how
        a block of vectors is backpropagated; read only for blocks)."""
        with torch.enable_grad():
            loss, _ = self._loss(X, y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return grads, loss

    def _batch_result(self, position: int, X: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        """The products on the batch's state; a state that is not kept frees its graph
        during a single column's pass. One vector on a batch whose state is not kept goes
        the measured faster way (:class:`RouteTimer`): a forward pass, backward and double
        backward, or forward over reverse (:meth:`_dual_products`: the gradient of a forward
        pass on dual parameters carries ``H v`` as its tangent). Measured on the benchmark
        problems (CPU, 2 threads, same process): cnn 88.5 -> 83.3 ms by forward over reverse,
        while the mlp (5.2 vs 8.1 ms) and the transformer (66 vs 86 ms) keep double backward."""
        single = V[0].shape[0] == 1 and not self._kept(position) and self._route.second is not False
        if not single or _updates_buffers(self.model):  # a failed dual pass would move them
            return self._reverse_products(position, X, y, V)
        return self._route.run(
            lambda: self._reverse_products(position, X, y, V),
            lambda: self._dual_or_reverse(position, X, y, V),
            self.device,
        )

    def _reverse_products(self, position: int, X: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        state = self._state(position, X, y)
        return self._batch_products(state, y, V, keep_graph=self._kept(position))

    def _dual_or_reverse(self, position: int, X: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        """:meth:`_dual_products`, or where PyTorch lacks a forward-mode derivative of some
        backward formula, the reverse route (then for good)."""
        try:
            return self._dual_products(X, y, V)
        except (RuntimeError, NotImplementedError) as err:
            if "out of memory" in str(err):
                raise
            self._route.refuse(second=True)
            return self._reverse_products(position, X, y, V)

    def _dual_products(self, X: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        """``H v`` (one vector, per parameter ``[1, *shape]``) by forward over reverse."""
        with torch.enable_grad(), fwAD.dual_level(), sdpa_kernel([SDPBackend.MATH]):
            duals = {n: fwAD.make_dual(p, v[0]) for n, p, v in zip(self.names, self.params, V)}
            out = _engine.call_model_with(self.model, duals, X)
            _engine.check_target(self.loss_fn, out, y)
            loss = self._finite(self.loss_fn(out, y))
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            tangents = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
        return [torch.zeros_like(v) if t is None else t.detach()[None] for t, v in zip(tangents, V)]

    def _batch_products(
        self,
        state: tuple[tuple[Tensor | None, ...], Tensor],
        y: Tensor,
        V: list[Tensor],
        keep_graph: bool = True,
    ) -> list[Tensor]:
        grads, loss = state
        used = [(g, v) for g, v in zip(grads, V) if g is not None]
        if not used:
            return [torch.zeros_like(v) for v in V]
        # one column is one plain pass whatever the graph (a walk over it costs ~2% of the
        # mlp's Hessian @ v)
        per_vector = V[0].shape[0] > 1 and _engine.per_vector_graph(_engine.graph_kinds(loss))
        try:
            with torch.enable_grad():
                hv = self._passes.grad(
                    [g for g, _ in used],
                    self.params,
                    [v for _, v in used],
                    per_vector,
                    allow_unused=True,
                    keep_graph=keep_graph,
                )
        except RuntimeError as err:
            if not _needs_second_derivative(err):
                raise
            raise RuntimeError(
                "Hessian products need second derivatives of every layer, and PyTorch has "
                f"none for an operation of this model ({err}). The GGN needs first "
                "derivatives only: use bg.linops.GGN"
            ) from err
        return [h if h is not None else torch.zeros_like(v) for h, v in zip(hv, V)]

    def _batch_diagonal(self, position: int, X: Any, y: Tensor) -> list[Tensor]:
        try:
            return self._engine_diagonal(X, y, _engine.DiagHessian())
        except RuntimeError as err:
            if "out of memory" in str(err):
                raise
            raise RuntimeError(
                "Hessian.diagonal(): the engine's exact DiagHessian does not cover this model. "
                "Estimate the diagonal with bg.linalg.diagonal(H, num_matvecs, method='xdiag') "
                "or the trace with bg.linalg.trace(H, num_matvecs, method='xtrace'). The "
                f"engine's reason: {str(err).strip()}"
            ) from err


class GGN(_JacobianProducts, CurvatureOperator):
    """The generalized Gauss-Newton ``sum_n J_n^T (d2 l / df2) J_n`` of the data-set loss.

    Products: ``J V`` by differentiating the vjp ``u -> J^T u`` w.r.t. ``u``, the loss Hessian
    by double backward on the outputs, then one vjp. Inside :meth:`repeated_products` the
    forward and vjp graphs are kept. :meth:`diagonal` / :meth:`trace` are exact from the
    engine's ``DiagGGN`` (it refuses outputs with more than ``max_vectors`` entries per sample;
    estimate with ``bg.linalg`` there). One vector on a batch whose state is not kept runs the
    model once (:meth:`_batch_result`). Products need first derivatives of the model only:
    where a layer's backward has no derivative (``nn.Hardsigmoid``), ``J V`` switches to
    forward-mode AD."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._passes = PassTimer()  # the J^T backward: vectorized or per column, measured

    def _prepare(self, position: int, X: Any, y: Tensor) -> dict[str, Any]:
        with torch.enable_grad():
            _, out = self._loss(X, y)
            o = out.detach().requires_grad_(True)
            (g_o,) = torch.autograd.grad(self.loss_fn(o, y), o, create_graph=True)
        return {**self._graph_state(out, X, self._kept(position)), "o": o, "g_o": g_o}

    def _batch_result(self, position: int, X: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        """One vector on a batch whose state is not kept: one forward pass carrying the
        tangent (:func:`_dual_forward`), then the loss Hessian and one backward pass, where
        the two-pass route would run the model twice (a forward for the graph, a second one
        for ``J v``). Measured on the benchmark problems (CPU, 2 threads, ratio to a
        forward+backward): cnn 2.8 -> 1.8, transformer 2.5 -> 2.4, mlp 3.2 -> 2.5."""
        single = V[0].shape[0] == 1 and not self._kept(position) and not self._reverse_mode
        if not single or _updates_buffers(self.model):  # a failed dual pass would move them
            return super()._batch_result(position, X, y, V)
        try:
            out, jv = _dual_forward(self.model, self.names, self.params, X, V)
        except (RuntimeError, NotImplementedError) as err:  # no forward-mode rule somewhere
            if "out of memory" in str(err):
                raise
            self._reverse_mode = True
            return super()._batch_result(position, X, y, V)
        _engine.check_target(self.loss_fn, out, y)
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            loss = self._finite(self.loss_fn(o, y))
            (g_o,) = torch.autograd.grad(loss, o, create_graph=True)
            (hjv,) = torch.autograd.grad(g_o, o, jv)
            res = torch.autograd.grad(out, self.params, hjv, allow_unused=True)
        return [r[None] if r is not None else torch.zeros_like(v) for r, v in zip(res, V)]

    def _batch_products(self, state: Any, y: Tensor, V: list[Tensor]) -> list[Tensor]:
        jv = self._jv(state, V)
        with torch.enable_grad():
            # loss Hessian (reduction included) times J V, by double backward on the output
            (hjv,) = _batched_grad([state["g_o"]], [state["o"]], [jv])
            res = self._passes.grad(
                [state["out"]], self.params, [hjv], state["per_vector"], allow_unused=True
            )
        return [r if r is not None else torch.zeros_like(v) for r, v in zip(res, V)]

    def _batch_diagonal(self, position: int, X: Any, y: Tensor) -> list[Tensor]:
        return self._engine_diagonal(X, y, _engine.DiagGGN())


class _RowsOperator(CurvatureOperator):
    """``scale * sum_r g_r g_r^T`` for the engine's per-row gradients ``g_r`` (per-sample
    gradients or GGN-factor rows), applied without forming them: the rows' inner products
    with the vectors (``Form.project``), then their combination (``Form.combine``). The forms
    (layer inputs and output gradients) are the per-batch state kept inside
    :meth:`repeated_products`: a further product then runs no autograd at all. The diagonal
    is exact (the forms' sums of squared rows)."""

    def _batch_products(
        self, state: tuple[dict[str, Any], float], y: Tensor, V: list[Tensor]
    ) -> list[Tensor]:
        forms, scale = state
        coeff = sum(forms[n].project(v) for n, v in zip(self.names, V))  # [rows, k]
        return [forms[n].combine(coeff) * scale for n in self.names]

    def _batch_diagonal(self, position: int, X: Any, y: Tensor) -> list[Tensor]:
        forms, scale = self._state(position, X, y)
        return [forms[n].sum_grad_squared() * scale for n in self.names]


class EmpiricalFisher(_RowsOperator):
    """``R_D sum_n grad l_n grad l_n^T`` (the KFAC tutorial's empirical Fisher), from the
    engine's per-sample gradients (any model)."""

    def _prepare(self, position: int, X: Any, y: Tensor) -> tuple[dict[str, Any], float]:
        return _engine.batch_forms(self.model, self.loss_fn, X, y, "empirical")


class Fisher(_RowsOperator):
    """The Monte-Carlo Fisher with ``mc_samples`` labels per sample, from the engine's GGN-factor
    rows. One seed is drawn from ``generator`` (default: the global generator) when the
    operator is built; batch ``b``'s labels come from a generator seeded with ``seed + b``, so
    every product (and :meth:`diagonal`) sees the same matrix. That needs the data in a fixed
    order: a shuffled loader raises. Under a process group of ``W`` ranks, rank 0's seed is
    broadcast and batch ``b`` of rank ``r`` draws from ``seed + b W + r`` (the same matrix on
    every rank; equal to one process over the whole data in distribution, not draw by
    draw)."""

    def __init__(
        self,
        *args: Any,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.mc_samples = mc_samples
        device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        self.seed = dist_group.broadcast_seed(seed, self.group)
        self.order = _fingerprint(self.data)

    def _check_order(self) -> None:
        if _fingerprint(self.data) != self.order:
            raise RuntimeError(
                "Fisher (MC) needs the data in a fixed order: the batches changed between "
                "passes (a shuffled loader?). Use a fixed-order loader."
            )

    def _batches(self) -> Iterable[tuple[Any, Tensor, int]]:
        """The batches, after checking that their order is the one the seeds were fixed for
        (every product and :meth:`diagonal` pass through here)."""
        self._check_order()
        return super()._batches()

    def _prepare(self, position: int, X: Any, y: Tensor) -> tuple[dict[str, Any], float]:
        # one stream per (rank, batch position): seed + position for one process
        world, rank = dist_group.world_size(self.group), dist_group.rank(self.group)
        generator = torch.Generator(device=self.device).manual_seed(
            self.seed + position * world + rank
        )
        return _engine.batch_forms(self.model, self.loss_fn, X, y, "mc", self.mc_samples, generator)


Builder = Callable[..., LinearOperator]


class Jacobian(_JacobianProducts, _KeptBatchState, LinearOperator):
    """The Jacobian of the model outputs over the data set w.r.t. the parameters,
    ``[sum_b numel(f(X_b)), P]`` (outputs flattened batch by batch, in data order; ``.T`` is
    its transpose). The data must be iterated in a fixed order (not a shuffled loader): the
    first pass records the output sizes, and every product checks them. Inside
    :meth:`repeated_products` each of the first ``cache_batches`` batches keeps its forward
    graph (and, once ``J @ V`` was asked, the vjp graph it differentiates).

    Args:
        model: the model.
        data: a re-iterable collection of ``(X, y)`` batches in a fixed order.
        params: the trainable parameter names (default: all, in
            ``model.named_parameters()`` order).
        cache_batches: how many leading batches keep their graphs inside
            :meth:`repeated_products` (``None``: all).
    """

    symmetric = False

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[tuple[Any, Tensor]],
        params: Sequence[str] | None = None,
        cache_batches: int | None = 1,
    ):
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.names = list(params) if params is not None else list(named)
        missing = [n for n in self.names if n not in named]
        if missing:
            raise KeyError(f"unknown or frozen parameters: {missing}")
        if not self.names:
            raise ValueError("no parameters selected")
        require_reiterable(data, "Jacobian")
        self._init_kept_state(cache_batches)
        self.model, self.data = model, data
        self.params = [named[n] for n in self.names]
        refuse_sharded(self.params, type(self).__name__)  # FSDP2 models: a clear error
        self.sizes = [p.numel() for p in self.params]
        with torch.no_grad():
            self.out_sizes = [_engine.call_model(model, X).numel() for X, _ in data]
        first = self.params[0]
        super().__init__((sum(self.out_sizes), sum(self.sizes)), first.dtype, first.device)

    def _prepare(self, position: int, X: Any, y: Tensor) -> dict[str, Any]:
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            out = _engine.call_model(self.model, X)
        if out.numel() != self.out_sizes[position]:
            raise RuntimeError("the data changed between passes (shuffled loader?)")
        return self._graph_state(out, X, self._kept(position))

    def _states(self) -> Iterable[dict[str, Any]]:
        count = 0
        for position, (X, y) in enumerate(self.data):
            if position >= len(self.out_sizes):
                raise RuntimeError("the data changed between passes (more batches than before)")
            count += 1
            yield self._state(position, X, y)
        if count != len(self.out_sizes):
            raise RuntimeError("the data changed between passes (shuffled loader?)")

    def _matmat(self, M: Tensor) -> Tensor:
        k = M.shape[1]
        V = layout.split_block(M, [p.shape for p in self.params])
        rows = []
        for state in self._states():
            out = state["out"]
            if out.grad_fn is None:  # no selected parameter reaches the outputs
                rows.append(M.new_zeros(out.numel(), k))
                continue
            jv = self._jv(state, V)
            rows.append(jv.reshape(k, -1).T)
        out = torch.cat(rows, 0)
        _check_finite(self, out, "product")
        return out

    def _rmatmat(self, M: Tensor) -> Tensor:
        k = M.shape[1]
        out_total = M.new_zeros(self.shape[1], k)
        start = 0
        for state in self._states():
            out = state["out"]
            size = out.numel()
            U = M[start : start + size].T.reshape(k, *out.shape)
            start += size
            with torch.enable_grad():
                grads = _batched_grad(
                    [out], self.params, [U], state["per_vector"], allow_unused=True
                )
            offset = 0
            for g, n in zip(grads, self.sizes):
                if g is not None:
                    out_total[offset : offset + n] += g.reshape(k, n).T
                offset += n
        _check_finite(self, out_total, "product")
        return out_total
