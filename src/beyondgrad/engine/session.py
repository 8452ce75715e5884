"""``bg.capture``: hooks during an ordinary forward pass, then one backward pass and the
requested quantities, reduced from the engine's :class:`~beyondgrad.engine.stats.Statistics`.

The session knows quantities only through the small plug-in protocol :class:`QuantityLike`
(what each needs, an optional step before the backward pass, a reduction of the statistics);
it imports none of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from ..forms import Form
from ..rules import generic_forms, uses_batch_statistics
from .attribution import attribute, check_no_reentrant_checkpoint, node_kinds
from .backprop import GRAD, Backprop, CallGradients, VectorKind, backprop_vectors, check_finite
from .capture import Call, Layer, Recorder, plan_layers, replaying
from .coupling import (
    BATCH_NORM_NODES,
    COUPLED_MESSAGE,
    coupling_node,
    known_coupling,
    remember_coupling,
    samples_coupled,
)
from .losses import (
    check_loss_fn,
    check_target,
    explain_non_finite_loss,
    is_internal_loss_call,
    loss_vectors,
    reduction_factor,
)
from .memory import check_vector_memory
from .result import Result
from .samples import (
    Expansion,
    ModelCall,
    check_shared_gradients,
    expansion_for,
    probe_axes,
    rule_input,
    shared_edges,
    shared_gradients,
    signature,
)
from .stats import Needs, Statistics


class QuantityLike(Protocol):
    """What the engine asks of a quantity (see :class:`beyondgrad.Quantity`)."""

    per_sample: ClassVar[bool]
    order: ClassVar[int]

    def needs(self) -> Needs: ...

    def prepare(self, graph: Backprop, loss: Tensor, output: Tensor, names: dict) -> Any: ...

    def compute(
        self, stats: Statistics, prepared: Any = None, out: dict | None = None
    ) -> dict[str, Any]: ...

    @property
    def separate_pass(self) -> bool: ...


def check_quantities(quantities: Sequence[Any], vectors: Sequence[VectorKind]) -> list[Any]:
    """Instances only, deduplicated, at least one (or explicit ``vectors``)."""
    out: list[Any] = []
    for q in quantities:
        if isinstance(q, type):
            raise TypeError(f"pass an instance, e.g. bg.{q.__name__}(), not the class")
        if not callable(getattr(q, "needs", None)) or not hasattr(q, "compute"):
            raise TypeError(f"{q!r} is not a beyondgrad quantity")
        if q not in out:
            out.append(q)
    if not out and not vectors:
        raise ValueError("no quantities requested (e.g. bg.BatchGrad(), bg.BatchL2())")
    return out


class SamplesCoupledError(RuntimeError):
    """The model couples its samples (e.g. BatchNorm in training mode): per-sample quantities
    are undefined. The message names the module and the fix."""


def needs_independent_samples(quantities: Sequence[Any], per_sample: bool = False) -> bool:
    """Whether the quantities read per-sample rows (per-sample quantities, and reductions of
    rows such as the GGN diagonal), which are exact only for independent samples. The
    gradient and Kronecker factors (KFAC) are sums over the batch and need no independence."""
    if per_sample or any(q.per_sample for q in quantities):
        return True
    return any(q.needs().reads_rows for q in quantities)


def check_samples_independent(model: nn.Module) -> None:
    """Raise :class:`SamplesCoupledError` for modules that couple the samples."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and uses_batch_statistics(module):
            raise SamplesCoupledError(
                f"module '{name}' ({type(module).__name__}) normalizes with batch statistics "
                "(training mode or track_running_stats=False), which couples the samples: "
                "per-sample quantities are undefined. Call model.eval() first."
            )
        if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            raise SamplesCoupledError(
                f"module '{name}' (Embedding with scale_grad_by_freq=True) scales gradients by "
                "batch-wide counts, which couples the samples: per-sample quantities are "
                "undefined."
            )


def subsample_index(
    subsampling: Sequence[int] | Tensor | None, N: int, device: torch.device
) -> Tensor | None:
    """Validated sample indices (negative ones wrapped), or ``None``."""
    if subsampling is None:
        return None
    _check_integer_indices(subsampling)
    idx = torch.as_tensor(subsampling, dtype=torch.long, device=device).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("subsampling is empty")
    if int(idx.min()) < -N or int(idx.max()) >= N:
        raise IndexError(
            f"subsampling index out of range for a batch of {N} samples: {idx.tolist()}"
        )
    return idx % N


def _check_integer_indices(subsampling: Sequence[int] | Tensor) -> None:
    """Refuse non-integer indices (``torch.as_tensor(..., dtype=long)`` would truncate floats
    and turn a boolean mask into indices 0 and 1)."""
    if isinstance(subsampling, Tensor):
        if (
            subsampling.is_floating_point()
            or subsampling.is_complex()
            or (subsampling.dtype == torch.bool)
        ):
            raise TypeError(
                f"subsampling must hold integer sample indices, got a {subsampling.dtype} "
                "tensor (for a boolean mask use mask.nonzero().flatten())"
            )
        return
    for i in subsampling:
        if isinstance(i, bool) or not hasattr(i, "__index__"):
            raise TypeError(f"subsampling must hold integer sample indices, got {i!r}")


class Plan:
    """The union of the quantities' needs (and extra ``vectors``): which vector kinds to
    backpropagate, whether the autograd gradient is wanted, which layers need gradients."""

    def __init__(self, quantities: list[Any], vectors: Sequence[VectorKind], max_vectors: int):
        needs: list[Needs] = [q.needs() for q in quantities]
        extra = Needs(kinds=tuple(vectors), max_vectors=max_vectors) if vectors else None
        if extra is not None:
            needs.append(extra)
        self.kinds: list[VectorKind] = list(dict.fromkeys(k for n in needs for k in n.kinds))
        self.gradient = any(n.gradient for n in needs)
        self.second_order = any(k[0] != "grad" for k in self.kinds)
        if (self.second_order or not self.kinds) and self.gradient and GRAD not in self.kinds:
            self.kinds.insert(0, GRAD)
        self.only_gradient = self.kinds == [GRAD] and all(
            not n.kinds for n in needs
        )  # the autograd gradient alone: no layer-output gradients
        self.kronecker_only = bool(needs) and all(n.kronecker_only for n in needs)
        self.inside = any(n.inside for n in needs)
        limits = [n.max_vectors for n in needs if ("exact", 0) in n.kinds and n.max_vectors]
        self.max_vectors = min(limits) if limits else max_vectors


class Session:
    """Returned by :func:`capture`; see there. Records the forward pass while the block is
    open; :meth:`compute` (or :meth:`statistics`) then backpropagates once.

    Args:
        model: any ``nn.Module``.
        loss_fn: a supported loss module (see ``bg.SUPPORTED_LOSSES``).
        quantities: the quantity instances to compute (checked by :func:`capture`).
        subsampling: sample indices for per-sample quantities (``None``: all samples).
        generator: the random generator of Monte-Carlo vectors (``None``: torch's global one).
        vectors: extra vector kinds to backpropagate for :meth:`statistics` (e.g.
            ``[("mc", 1)]``) when no quantity asks for them.
        max_vectors: the limit on exact vectors per sample for ``vectors``.
        per_sample: the statistics will be read per sample (subsampling applies, and models
            that couple their samples raise :class:`SamplesCoupledError`); set anyway when a
            quantity is per-sample.
        check_samples: probe the recorded forward for samples coupled by any op when
            per-sample rows are read (see :func:`capture`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        quantities: list[Any],
        subsampling: Sequence[int] | Tensor | None,
        generator: torch.Generator | None,
        vectors: Sequence[VectorKind] = (),
        max_vectors: int = 256,
        per_sample: bool = False,
        check_samples: bool = True,
    ):
        self.model, self.loss_fn, self.quantities = model, loss_fn, quantities
        self.check_samples = check_samples
        self.subsampling, self.generator = subsampling, generator
        self.plan = Plan(quantities, vectors, max_vectors)
        self.per_sample = per_sample or any(q.per_sample for q in quantities)
        self.independent = needs_independent_samples(quantities, self.per_sample)
        if self.independent:
            check_samples_independent(model)
        self.layers = plan_layers(model)
        self.recorder = Recorder(self.layers)
        self.loss_calls: list[tuple[Tensor, Tensor, Tensor]] = []
        self._loss_handle: Any = None
        self.watch_backward = False
        # keep the watch on the graph after the block exits, until the statistics are read
        # (optimizers: the ordinary backward runs after their capture block)
        self.watch_outlives_block = False
        # called once the watched backward has finished (queued on the autograd engine)
        self.on_backward_end: Any = None
        self._seen: dict[tuple[int, int], Tensor] = {}
        self.loss_scale: Tensor | None = None  # d(backpropagated)/d(loss), watched backward
        self._node_kinds: set[str] | None = None
        self._node_handles: list[Any] = []
        # the model's arguments, for the sample-axis probe (and the expansion of shared outputs)
        # weakly: a bound method here would close a reference cycle (session -> model_calls
        # -> session) that keeps every recorded call's tensors alive until a gc collection
        self.model_calls = ModelCall(model, on_first=_weak_call(self._plan_expansion))
        self._expansion: Expansion | None = None
        self._vector_cache: dict[VectorKind, Tensor] = {}
        self._watched_shared: dict[VectorKind, dict[tuple[int, int], Tensor]] = {}
        self._names: dict[int, str] | None = None
        self._key: tuple | None = None  # (args, kwargs, signature) of the recorded call

    # -- forward ------------------------------------------------------------------------------
    @property
    def _expands(self) -> bool:
        """Whether shared layer outputs may be handed to the model expanded (see
        :mod:`beyondgrad.engine.samples`): layer-output gradients are read, and no quantity
        backpropagates from inside the network."""
        return not self.plan.only_gradient and not self.plan.inside

    def _plan_expansion(self, args: tuple, kwargs: dict) -> None:
        """At the model's first call: expand its shared outputs when a probe validated it."""
        self._expansion = (
            expansion_for(self.model, args, kwargs, self._call_key(args, kwargs))
            if self._expands
            else None
        )
        if self._expansion is not None:
            self.recorder.expand = self._expansion.plan
            self.recorder.expand_samples = self._expansion.num_samples

    def _loss_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled() and self.recorder.enabled and not is_internal_loss_call():
            self.loss_calls.append((args[0], args[1], output))
            if self.watch_backward and output.requires_grad:
                self._watch(output)

    def _watch(self, loss: Tensor) -> None:
        """Record every layer-output gradient of the next ordinary ``loss.backward()`` (node
        pre-hooks at the recorded gradient edges), so that first-order quantities need no
        backward pass of their own. Attribution runs when that backward starts."""
        nodes: dict[int, tuple[Any, set[int]]] = {}
        for unit in self.layers:
            for call in unit.calls:
                for edge in call.edges:
                    if edge is not None:
                        nodes.setdefault(id(edge.node), (edge.node, set()))[1].add(edge.output_nr)
        for key, (node, nrs) in nodes.items():

            def pre(grad_outputs: tuple, key: int = key, nrs: set[int] = nrs) -> None:
                for nr in nrs:
                    if grad_outputs[nr] is not None:
                        self._seen[(key, nr)] = grad_outputs[nr]

            self._node_handles.append(node.register_prehook(pre))
        names = self._parameter_names()

        # weak references: the hook stays on the loss tensor, and a closure over the session
        # and the loss itself would keep both (and every recorded call) alive for good
        session, loss_ref = weakref.ref(self), weakref.ref(loss)

        def on_loss(grad: Tensor) -> None:
            me, watched = session(), loss_ref()
            if me is not None and watched is not None:
                me._on_loss(watched, grad, names)

        loss.register_hook(on_loss)

    def _on_loss(self, loss: Tensor, grad: Tensor, names: dict[int, str]) -> None:
        """The watched backward reached the loss: attribute the graph and run the shared
        outputs' per-sample pass while the graph is still whole."""
        self.loss_scale = grad.detach()
        self._node_kinds = attribute(loss, self.layers, names)
        self._check_graph(loss, self._node_kinds)
        self._watched_shared = self._early_shared(loss)
        if self.on_backward_end is not None:  # once, after this backward pass
            callback, self.on_backward_end = self.on_backward_end, None
            torch.autograd.Variable._execution_engine.queue_callback(callback)

    def __enter__(self) -> Session:
        self.recorder.__enter__()
        self.model_calls.__enter__()
        self._loss_handle = self.loss_fn.register_forward_hook(self._loss_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.remove()
        self.model_calls.__exit__()
        if not self.watch_outlives_block:
            self.release_watch()
        if self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None

    def close(self) -> None:
        """Remove every hook: the recording's and the watched backward's (idempotent)."""
        self.watch_outlives_block = False
        self.__exit__()

    def release_watch(self) -> None:
        """Remove the watched backward's hooks from the graph (idempotent)."""
        for handle in self._node_handles:
            handle.remove()
        self._node_handles.clear()

    def _call_key(self, args: tuple, kwargs: dict) -> tuple:
        """The :func:`signature` of the model's recorded call ``(args, kwargs)``, formed once
        per pass (the expansion, the coupling and the sample-axis probes read it)."""
        if self._key is None or self._key[0] is not args or self._key[1] is not kwargs:
            self._key = (args, kwargs, signature(args, kwargs, self.model))
        return self._key[2]

    def _parameter_names(self) -> dict[int, str]:
        """``{id(parameter): name}`` as ``model.named_parameters()`` names them, walked once
        per pass (the watched backward and the reduction read the same map)."""
        if self._names is None:
            self._names = {id(p): n for n, p in self.model.named_parameters()}
        return self._names

    # -- backward and reduction ---------------------------------------------------------------
    def _loss_record(self, loss: Tensor) -> tuple[Tensor, Tensor]:
        matches = [(f, y) for f, y, out in self.loss_calls if out is loss]
        if not matches:
            raise RuntimeError(
                "the loss passed to compute() was not produced directly by loss_fn inside the "
                "capture block (was it scaled, summed or modified afterwards?). Quantities "
                "refer to the loss exactly as loss_fn defines it; change loss_fn instead."
            )
        if len(self.loss_calls) > 1:
            raise RuntimeError("loss_fn was called more than once inside the capture block")
        return matches[0]

    def statistics(self, loss: Tensor, retain_graph: bool = False) -> Statistics:
        """Backpropagate once and return the engine's :class:`Statistics` (no quantity is
        reduced; :meth:`compute` does both).

        Args:
            loss: the tensor ``loss_fn`` returned inside the capture block.
            retain_graph: keep the forward graph so that ``loss.backward()`` can still run.

        Returns:
            The :class:`Statistics` of the batch (forms and Kronecker sums built lazily).
        """
        return self._run(loss, retain_graph)[0]

    def compute(
        self, loss: Tensor, out: Result | None = None, retain_graph: bool = False
    ) -> Result:
        """Backpropagate once and reduce every requested quantity.

        Args:
            loss: the tensor ``loss_fn`` returned inside the capture block.
            out: a previous result whose per-sample tensors (``BatchGrad``) may be
                overwritten to save allocation.
            retain_graph: keep the forward graph so that ``loss.backward()`` can still run
                (optimizers collect statistics this way before the ordinary backward pass).

        Returns:
            A :class:`Result`; ``result.stats`` holds the :class:`Statistics`.
        """
        stats, prepared = self._run(loss, retain_graph)
        order = sorted(self.quantities, key=lambda q: q.order)
        values: dict[Any, dict[str, Any]] = {}
        for q in order:
            previous = out._values.get(q) if out is not None and q in out._values else None
            values[q] = q.compute(stats, prepared.get(q), previous)
        values = {q: values[q] for q in self.quantities}
        _check_results_finite(values, stats.rules)
        return Result(stats.loss, stats.output, values, stats.rules, stats.subsampling, stats)

    def _run(self, loss: Tensor, retain_graph: bool) -> tuple[Statistics, dict[Any, Any]]:
        self.close()
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss does not require grad (computed under torch.no_grad() or "
                "torch.inference_mode(), or no parameter requires grad)"
            )
        output, target = self._loss_record(loss)
        check_target(self.loss_fn, output, target)
        if not bool(torch.isfinite(loss)):
            explain_non_finite_loss(self.loss_fn, output, target)
            raise FloatingPointError(f"the loss is not finite ({loss.item()})")
        N = output.shape[0]
        self._probe_coupling(N)
        names = self._parameter_names()
        plan, watched = self.plan, self.loss_scale is not None
        node_kinds: set[str] = set()
        if watched:
            node_kinds = self._node_kinds or set()
        elif not plan.only_gradient:  # a plain gradient needs no attribution to layer calls
            node_kinds = attribute(loss, self.layers, names)
            self._check_graph(loss, node_kinds)
        calls = [] if plan.only_gradient and not watched else self._calls()
        _check_inputs_finite(calls)
        graph = Backprop(calls, node_kinds, N, self._forms_of_call(N))
        if watched:  # probed and computed when the ordinary backward started
            shared = self._watched_shared
        else:
            self._vector_cache = {}
            if calls:  # which axis of each call holds the samples (see engine.samples)
                self._probe_axes(N)
            shared = self._shared_pass(calls, node_kinds, output, target)
        prepared = {}
        if plan.second_order and not watched:  # before the main pass frees the graph
            for q in self.quantities:
                if q.separate_pass:
                    raise NotImplementedError(f"{q!r} needs bg.compute")
                prepared[q] = q.prepare(graph, loss, output, names)
        grads, param_grads = self._backward(graph, loss, output, target, retain_graph, watched)
        for kind, per_edge in shared.items():  # per-sample gradients of shared outputs
            for (call_id, i), g in per_edge.items():
                grads[kind][call_id][i] = g
        stats = Statistics(
            loss=loss.detach(),
            output=output.detach(),
            num_samples=N,
            reduction=self.loss_fn.reduction,  # type: ignore[arg-type]
            reduction_factor=reduction_factor(self.loss_fn, output, target),
            subsampling=subsample_index(self.subsampling, N, loss.device)
            if self.per_sample
            else None,
            kinds=tuple(grads),
            rules=_rules_by_name(self.layers, names),
            model=self.model,
            layers=self.layers,
            backprop=graph,
            call_gradients=grads,
            parameter_gradients=param_grads,
        )
        return stats, prepared

    def _early_shared(self, loss: Tensor) -> dict[VectorKind, dict[tuple[int, int], Tensor]]:
        """For ``from_backward``: probe the sample axes and run the shared outputs' per-sample
        pass while the ordinary backward has not yet freed the graph."""
        output, target = self._loss_record(loss)
        calls = self._calls()
        self._vector_cache = {}
        if not calls:
            return {}
        self._probe_axes(output.shape[0])
        return self._shared_pass(calls, self._node_kinds or set(), output, target)

    def _probe_axes(self, N: int) -> None:
        """Which axis of each recorded call holds the samples (see :func:`probe_axes`)."""
        probe_axes(
            self.model,
            self.layers,
            self.model_calls,
            N,
            self.recorder.paused,
            expansion=self._expansion,
            try_expansion=self._expands,
            key=self._call_key(*self.model_calls.calls[0])
            if len(self.model_calls.calls) == 1
            else None,
        )

    def _shared_pass(
        self, calls: list, node_kinds: set[str], output: Tensor, target: Tensor
    ) -> dict[VectorKind, dict[tuple[int, int], Tensor]]:
        """Per-sample gradients of the outputs of layer calls without a sample axis (see
        :mod:`beyondgrad.engine.samples`), for every vector kind; before the main pass."""
        shared = shared_edges(calls)
        if not shared:
            return {}
        kinds = self.plan.kinds or [GRAD]
        return {
            kind: shared_gradients(
                output, self._vectors(kind, output, target), shared, node_kinds, backprop_vectors
            )
            for kind in kinds
        }

    def _check_graph(self, loss: Tensor, node_kinds: set[str]) -> None:
        """Raise :class:`SamplesCoupledError` when the graph couples samples (a batch norm
        with batch statistics outside BatchNorm modules) and the quantities need them
        independent."""
        if not self.independent or not node_kinds & BATCH_NORM_NODES:
            return
        node = coupling_node(loss)
        if node is not None:
            where = Backprop(self._calls(), set(), 0, self._forms_of_call(0)).locate(node)
            raise SamplesCoupledError(
                f"{where} normalizes with batch statistics ({type(node).__name__}, e.g. "
                "F.batch_norm(..., training=True)), which couples the samples: per-sample "
                "quantities (and reductions of per-sample rows, e.g. DiagGGN) are undefined. "
                "Use running statistics (training=False) or model.eval()."
            )

    def _probe_coupling(self, N: int) -> None:
        """The forward probe of :mod:`~beyondgrad.engine.coupling` on the model's recorded
        arguments, when the statistics will be read per sample: coupling by any op (e.g.
        ``h - h.mean(0)``) raises :class:`SamplesCoupledError` here too, not only in
        :func:`~beyondgrad.compute` (which probes before it opens its session)."""
        if not (self.check_samples and self.independent and self.model_calls.calls):
            return
        args, kwargs = self.model_calls.calls[-1]
        key = self._call_key(args, kwargs)
        coupled = known_coupling(self.model, key)
        if coupled is None:
            with self.recorder.paused():
                coupled = samples_coupled(self.model, (args, kwargs), N, _call_with_arguments)
            remember_coupling(self.model, key, coupled)
        if coupled:
            raise SamplesCoupledError(COUPLED_MESSAGE)

    def _calls(self) -> list[tuple[Layer, Call]]:
        calls = [(u, c) for u in self.layers for c in u.calls]
        if self.plan.kronecker_only:  # Kronecker blocks only: other layers need no backward
            calls = [(u, c) for u, c in calls if _has_kronecker(u)]
        for _, call in calls:
            if call.problem is not None:
                raise RuntimeError(call.problem)
        return calls

    def _backward(
        self,
        graph: Backprop,
        loss: Tensor,
        output: Tensor,
        target: Tensor,
        retain_graph: bool,
        watched: bool,
    ) -> tuple[dict[VectorKind, CallGradients], dict[int, Tensor]]:
        """The layer-output gradients per vector kind, and the parameter gradients where
        autograd formed them."""
        plan = self.plan
        if watched:
            if plan.second_order:
                raise RuntimeError(
                    "second-order quantities need their own backward pass: compute them before "
                    "loss.backward()"
                )
            return {plan.kinds[0]: graph.per_call(self._watched_gradients(graph))}, {}
        if not plan.second_order:
            return self._first_order_backward(graph, loss, retain_graph)
        blocks = [self._vectors(kind, output, target) for kind in plan.kinds]
        grads, param_grads = self._batched_backward(graph, output, blocks, retain_graph)
        per_kind, start = {}, 0
        for kind, block in zip(plan.kinds, blocks):
            K = block.shape[0]
            part = [None if g is None else g[start : start + K] for g in grads]
            per_kind[kind] = graph.per_call(part)
            start += K
        return per_kind, param_grads

    def _batched_backward(
        self, graph: Backprop, output: Tensor, blocks: list[Tensor], retain_graph: bool
    ) -> tuple[tuple[Tensor | None, ...], dict[int, Tensor]]:
        """All vector blocks in one pass to the recorded layer outputs. With the gradient
        requested, also to the parameters of generic layers: their per-sample rows are
        recomputed sample by sample, which differs from the batch when the module couples
        its samples, so their gradient comes from autograd (fast rules sum exact rows)."""
        vectors = torch.cat(blocks, 0)
        params = _served_parameters([u for u in self.layers if u.rule is None])
        if not (self.plan.gradient and params):
            return graph.gradients(output, vectors, retain_graph), {}
        start = sum(b.shape[0] for b in blocks[: self.plan.kinds.index(GRAD)])
        n = len(graph.targets)
        grads = backprop_vectors(
            output, graph.targets + params, vectors, graph.node_kinds, retain_graph
        )
        check_finite(grads[:n], graph.where)
        param_grads = {id(p): g[start] for p, g in zip(params, grads[n:]) if g is not None}
        return grads[:n], param_grads

    def _watched_gradients(self, graph: Backprop) -> list[Tensor | None]:
        seed = self.loss_scale
        unit = bool((seed == 1).all())  # once, not per layer output
        grads = [
            None
            if (g := self._seen.get((id(e.node), e.output_nr))) is None
            else (g if unit else g / seed)
            for e in graph.targets
        ]
        check_finite(grads, graph.where)
        return [None if g is None else g.unsqueeze(0) for g in grads]

    def _first_order_backward(
        self, graph: Backprop, loss: Tensor, retain_graph: bool
    ) -> tuple[dict[VectorKind, CallGradients], dict[int, Tensor]]:
        """One backward pass of the loss: to every recorded layer output, and to the
        parameters only when the gradient itself is requested (autograd forms it at the
        cost of a plain backward)."""
        params = _served_parameters(self.layers) if self.plan.gradient else []
        n = len(graph.targets)
        grads = torch.autograd.grad(
            loss, graph.targets + params, allow_unused=True, retain_graph=retain_graph
        )
        # layer-output gradients suffice (parameter gradients are products of them with
        # finite inputs); without layer outputs, the parameter gradients are checked
        if n:
            check_finite(grads[:n], graph.where)
        else:
            names = self._parameter_names()
            check_finite(grads, [names[id(p)] for p in params])
        param_grads = {id(p): g for p, g in zip(params, grads[n:]) if g is not None}
        if len(param_grads) < len(params):  # unreached parameters: hidden by a checkpoint?
            check_no_reentrant_checkpoint(node_kinds(loss))
        if not self.plan.kinds:
            return {}, param_grads
        layer = [None if g is None else g.unsqueeze(0) for g in grads[:n]]
        return {self.plan.kinds[0]: graph.per_call(layer)}, param_grads

    def _vectors(self, kind: VectorKind, output: Tensor, target: Tensor) -> Tensor:
        """The output-space vectors of ``kind``, after checking that exact ones stay
        affordable."""
        if kind in self._vector_cache:  # drawn once per pass (MC vectors stay consistent)
            return self._vector_cache[kind]
        name, M = kind
        if name == "mc":  # every sampled vector is held at every layer output at once
            check_vector_memory(M, self._calls(), output, f"mc_samples={M}")
        if name == "exact":
            per_sample = output[0].numel()
            limit = self.plan.max_vectors
            if per_sample > limit:
                raise RuntimeError(
                    f"exact (type-2) curvature backpropagates one vector per model output per "
                    f"sample: {per_sample} here (e.g. classes x positions), i.e. about "
                    f"{per_sample} backward passes. Use the Monte-Carlo variant "
                    f"(e.g. mc_samples=1) or raise max_vectors (now {limit}) explicitly."
                )
        vectors = loss_vectors(self.loss_fn, output, target, name, max(M, 1), self.generator)
        self._vector_cache[kind] = vectors
        return vectors

    def _forms_of_call(self, N: int):
        def forms_of_call(unit: Layer, call: Call, gs: list[Tensor | None]) -> dict[str, Form]:
            """Forms of one call; ``gs[i]``: ``[K, *outputs[i].shape]`` gradients."""
            _check_versions(unit, call)
            check_shared_gradients(unit.name, call, gs)
            K = next(g.shape[0] for g in gs if g is not None)
            if unit.rule is not None:
                g = gs[0]
                if g is None or not unit.params:
                    return {}
                try:
                    x = rule_input(call, N)
                except RuntimeError as err:
                    raise RuntimeError(f"module '{unit.name}': {err}") from None
                g = g.reshape(K * N, *g.shape[2:])
                local = unit.rule.forms(unit.module, x, g, K)
                return {k: v for k, v in local.items() if k in unit.params}
            with self.recorder.paused(), replaying(), torch.enable_grad():
                return generic_forms(
                    unit.module,
                    unit.params,
                    call.args,
                    call.kwargs,
                    call.output,
                    gs,
                    N,
                    K,
                    call.axes,
                )

        return forms_of_call


def _weak_call(method: Any) -> Any:
    """``method`` (a bound method) called through a weak reference to its object: the
    callback does not keep the object alive (nothing happens once it is gone)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kwargs: Any) -> None:
        bound = ref()
        if bound is not None:
            bound(*args, **kwargs)

    return call


def _check_inputs_finite(calls: list[tuple[Layer, Call]]) -> None:
    """Fast-rule layers multiply their input with the output gradient: an infinite input
    gives NaN rows even where the gradient is zero (as autograd's gradient would)."""
    inputs = [
        (u.name, c.x.detach())
        for u, c in calls
        if u.rule is not None and isinstance(c.x, Tensor) and c.x.is_floating_point()
    ]
    check_finite(
        [x for _, x in inputs],
        [name for name, _ in inputs],
        "non-finite input to module '{}' (inf or nan): its gradients are not finite",
    )


def _check_results_finite(values: dict[Any, dict[str, Any]], rules: dict[str, str]) -> None:
    """``FloatingPointError`` naming a non-finite result where the checks of layer inputs and
    output gradients do not suffice: parameters served by the generic rule (its per-sample
    recomputation) and half-precision results (overflow)."""
    tensors, where = [], []
    owners = _rules_by_owner(rules)
    for q, per_name in values.items():
        for name, value in per_name.items():
            generic = _served_generically(name, rules, owners)
            for t in _result_tensors(value):
                if generic or t.dtype in (torch.float16, torch.bfloat16):
                    tensors.append(t)
                    where.append(f"{q!r} of '{name}'")
    check_finite(tensors, where, "non-finite values in {} (overflow, or inf/nan in the data)")


def _rules_by_owner(rules: dict[str, str]) -> dict[str, set[str]]:
    """The rules of each module's own parameters, by the module's name (``"a.b"`` for
    ``"a.b.weight"``)."""
    owners: dict[str, set[str]] = {}
    for name, rule in rules.items():
        owners.setdefault(name.rpartition(".")[0], set()).add(rule)
    return owners


def _served_generically(name: str, rules: dict[str, str], owners: dict[str, set[str]]) -> bool:
    """Whether the result under ``name`` (a parameter's, or a module's such as a Kronecker
    block, keyed by the module name) comes, in whole or in part, from the generic rule or
    from several rules; a name that matches no parameter counts as generic. ``owners``:
    :func:`_rules_by_owner` of ``rules``."""
    found = {rules[name]} if name in rules else owners.get(name)
    if found is None:  # a module without parameters of its own: those of its submodules
        prefix = f"{name}." if name else ""
        found = {r for n, r in rules.items() if n.startswith(prefix)}
    return not found or bool(found & {"generic", "mixed"})


def _result_tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value.detach()] if value.is_floating_point() else []
    fields = getattr(value, "__dict__", None)
    if isinstance(value, (list, tuple)):
        fields = dict(enumerate(value))
    if not fields:
        return []
    return [v.detach() for v in fields.values() if isinstance(v, Tensor) and v.is_floating_point()]


def _call_with_arguments(model: nn.Module, arguments: tuple[tuple, dict]) -> Any:
    return model(*arguments[0], **arguments[1])


def _rules_by_name(layers: list[Layer], names: dict[int, str]) -> dict[str, str]:
    rules: dict[str, str] = {}
    for unit in layers:
        for p in unit.params.values():
            name = names[id(p)]
            rules[name] = (
                unit.rule_name if name not in rules or rules[name] == unit.rule_name else "mixed"
            )
    return rules


def _has_kronecker(unit: Layer) -> bool:
    return unit.rule is not None and unit.rule.kronecker is not None and "weight" in unit.params


def _served_parameters(layers: list[Layer]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for unit in layers:
        for p in unit.params.values():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _check_versions(unit: Layer, call: Call) -> None:
    for t, version in call.input_versions:
        if t._version != version:
            raise RuntimeError(
                f"an input of module '{unit.name}' was modified in place after the module "
                "used it; its recorded value is no longer valid. Avoid the in-place operation "
                "(e.g. use nn.ReLU(inplace=False) on that tensor)."
            )


@contextmanager
def capture(
    model: nn.Module,
    loss_fn: nn.Module,
    *quantities: Any,
    subsampling: Sequence[int] | Tensor | None = None,
    generator: torch.Generator | None = None,
    from_backward: bool = False,
    vectors: Sequence[VectorKind] = (),
    max_vectors: int = 256,
    per_sample: bool = False,
    check_samples: bool = True,
) -> Iterator[Session]:
    """Record an ordinary forward pass, then compute quantities from its loss::

        with bg.capture(model, loss_fn, bg.BatchL2()) as session:
            loss = loss_fn(model(X), y)
        res = session.compute(loss)

    Args:
        model: any ``nn.Module``.
        loss_fn: a supported loss module (see ``bg.SUPPORTED_LOSSES``).
        *quantities: quantity instances (``bg.BatchGrad()``, ...).
        subsampling: sample indices for per-sample quantities.
        generator: for Monte-Carlo vectors.
        from_backward: the block also runs the ordinary ``loss.backward()`` (or
            ``(c * loss).backward()`` for a constant ``c``, e.g. a gradient scaler's scale),
            and first-order quantities are computed from the layer-output gradients of that
            backward pass, with no backward pass of their own.
        vectors: extra vector kinds to backpropagate for :meth:`Session.statistics` (e.g.
            ``[("mc", 1)]``) when no quantity asks for them.
        max_vectors: the limit on exact vectors per sample for ``vectors``.
        per_sample: the statistics will be read per sample (subsampling applies, and
            models that couple their samples raise :class:`SamplesCoupledError`).
        check_samples: when per-sample rows are read, probe the recorded forward for samples
            coupled by any op (two extra forward passes on two samples without gradients,
            buffers and random state restored); ``False`` keeps only the module and graph
            checks.

    The loss must be the tensor ``loss_fn`` returned (not scaled or modified afterwards). Hooks
    are removed when the block exits, also on errors.
    """
    check_loss_fn(loss_fn)
    session = Session(
        model,
        loss_fn,
        check_quantities(quantities, vectors),
        subsampling,
        generator,
        vectors,
        max_vectors,
        per_sample,
        check_samples,
    )
    session.watch_backward = from_backward
    with session:
        yield session
