"""Backprop: output-space vectors to every recorded layer output, in one vectorized pass.

The loss supplies ``K`` vectors per sample (``grad``, ``exact`` or ``mc``; see
:func:`~beyondgrad.engine.losses.loss_vectors`). :class:`Backprop` holds the recorded calls of
one forward pass and backpropagates a block of vectors ``[K, *output.shape]`` from the model
output (or from any gradient edge inside the graph) to every recorded layer output with one
``torch.autograd.grad(..., is_grads_batched=True)``, giving each call its output gradients
``[K, N, ...]``; the layer rules turn those into per-parameter forms. Through graphs whose nodes
vmap batches slowly (convolutions, batch/group norm) the vectors go one plain pass each, every
pass's gradients copied into one ``[K, ...]`` buffer per target and checked to be finite while
they are in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..forms import Form, merge_forms
from .attribution import region
from .capture import Call, Layer

VectorKind = tuple[str, int]
"""Which output-space vectors: ``("grad", 1)`` (the loss gradient), ``("exact", 0)`` (columns
of the loss-Hessian square root) or ``("mc", M)`` (M sampled gradients per sample)."""

GRAD: VectorKind = ("grad", 1)

# autograd nodes whose vmap batching rules (torch 2.13, CPU) make one vectorized backward pass
# over K vectors slower than K plain passes: measured 1.3-3.5x for convolutions (also their
# double backward), batch and group norm, and 1.5-2x for a whole cnn with zero padding and max
# pooling; folding the K vectors into the batch axis of one convolution call is no faster than
# K calls there either (the FLOPs are the same and the K-times larger operands leave the cache)
UNBATCHED_NODES = frozenset(
    {
        "ConvolutionBackward0",
        "ConvolutionBackwardBackward0",
        "NativeBatchNormBackward0",
        "NativeGroupNormBackward0",
    }
)


def per_vector_faster(node_kinds: set[str]) -> bool:
    """Whether ``K`` vectors go faster through a graph with these autograd node type names as
    ``K`` plain backward passes than as one vectorized (``is_grads_batched``) pass."""
    return bool(node_kinds & UNBATCHED_NODES)


CallGradients = dict[int, list[Tensor | None]]
"""Per recorded call (by ``id``), the gradients ``[K, *output.shape]`` of each of its outputs."""

FormsOfCall = Callable[[Layer, Call, list[Tensor | None]], dict[str, Form]]


def backprop_vectors(
    output: Any,
    targets: list[Any],
    vectors: Tensor,
    node_kinds: set[str],
    retain: bool = False,
    where: list[str] | None = None,
) -> tuple[Tensor | None, ...]:
    """Gradients ``[K, *target.shape]`` of ``<vectors[k], output>`` w.r.t. every target.

    Args:
        output: a tensor or gradient edge to start from.
        targets: gradient edges (or tensors) to differentiate w.r.t.
        vectors: ``[K, *output.shape]``.
        node_kinds: autograd node type names of the graph (selects per-vector passes where
            vmap has no batching rule).
        retain: keep the graph.
        where: names of the targets: if given, the gradients are checked to be finite
            (:func:`check_finite`; per pass while its gradients are in cache where the
            vectors go one pass each).

    Returns:
        One tensor ``[K, *target.shape]`` per target (``None`` where it is not reached).

    Raises:
        FloatingPointError: ``where`` given and a gradient has a non-finite entry.
    """
    if not targets:
        return ()
    K = vectors.shape[0]
    if K > 1 and not per_vector_faster(node_kinds):
        grads = torch.autograd.grad(
            [output],
            targets,
            grad_outputs=[vectors],
            is_grads_batched=True,
            allow_unused=True,
            retain_graph=retain,
        )
        if where is not None:
            check_finite(grads, where)
        return grads
    sums: list[Tensor] | None = None if where is None else []
    grads = _per_vector(output, targets, vectors, retain, sums)
    if where is not None and sums and not bool(torch.stack(sums).isfinite().all()):
        check_finite(grads, where)  # inspect element-wise (a sum can overflow)
    return grads


def _per_vector(
    output: Any,
    targets: list[Any],
    vectors: Tensor,
    retain: bool,
    sums: list[Tensor] | None = None,
) -> tuple[Tensor | None, ...]:
    """``K`` plain backward passes, each pass's gradients copied at once into one
    ``[K, *target.shape]`` buffer per target and released: the copy reads data the pass just
    wrote and the next pass reuses its memory (keeping ``K`` results and stacking them
    afterwards holds twice the memory: measured 393 -> 264 MiB above a forward+backward for the
    exact diagonal GGN of the cnn). With ``sums``, the sum of each pass's gradients is
    appended (for a finiteness check that does not read the buffers again)."""
    K = vectors.shape[0]
    buffers: list[Tensor | None] = []
    for k, v in enumerate(vectors):
        grads = torch.autograd.grad(
            [output], targets, grad_outputs=[v], retain_graph=retain or k < K - 1, allow_unused=True
        )
        present = [g for g in grads if g is not None]
        if sums is not None and present:
            sums.append(torch.stack([g.sum() for g in present]))
        if K == 1:  # one pass: its contiguous gradients as they are, no copy
            return tuple(None if g is None else g.contiguous().unsqueeze(0) for g in grads)
        if k == 0:
            # PyTorch's allocator on purpose: freed within the call (see result_pool's docstring)
            buffers = [None if g is None else g.new_empty(K, *g.shape) for g in grads]
        for buffer, g in zip(buffers, grads):
            if buffer is not None and g is not None:
                buffer[k].copy_(g)
        del grads, present
    return tuple(buffers)


def check_finite(
    grads: Sequence[Tensor | None],
    where: list[str],
    message: str = "non-finite gradient backpropagated to '{}'",
) -> None:
    """Raise ``FloatingPointError`` (``message`` formatted with the name) for the first tensor
    with a non-finite entry. One reduction per tensor (a sum is non-finite if any entry is);
    only on failure is each tensor inspected element-wise (a sum can overflow)."""
    present = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not present or bool(torch.stack([g.sum() for _, g in present]).isfinite().all()):
        return
    for i, g in present:
        if not bool(torch.isfinite(g).all()):
            raise FloatingPointError(message.format(where[i]))


class Backprop:
    """The recorded layer calls of one forward pass as backpropagation targets.

    Args:
        calls: ``(unit, call)`` pairs whose outputs receive gradients.
        node_kinds: autograd node type names of the graph.
        num_samples: ``N``.
        forms_of_call: the rule step, ``(unit, call, [K, ...] gradients) -> {local name: Form}``.
    """

    def __init__(
        self,
        calls: list[tuple[Layer, Call]],
        node_kinds: set[str],
        num_samples: int,
        forms_of_call: FormsOfCall,
    ):
        self.calls, self.node_kinds, self.num_samples = calls, node_kinds, num_samples
        self.forms_of_call = forms_of_call
        self.edges = [(u, c, i) for u, c in calls for i, e in enumerate(c.edges) if e is not None]
        self.targets = [c.edges[i] for _, c, i in self.edges]
        self.where = [u.name for u, _, _ in self.edges]

    def gradients(
        self, start: Any, vectors: Tensor, retain: bool = False
    ) -> tuple[Tensor | None, ...]:
        """``[K, *output.shape]`` gradients of ``vectors`` from ``start`` at every recorded
        layer output (flat, in :attr:`edges` order), checked to be finite."""
        return backprop_vectors(start, self.targets, vectors, self.node_kinds, retain, self.where)

    def per_call(self, grads: Sequence[Tensor | None]) -> CallGradients:
        """Group flat edge gradients by call, each viewed as ``[K, *output shape]``."""
        out: CallGradients = {id(c): [None] * len(c.outputs) for _, c in self.calls}
        for (_, c, i), g in zip(self.edges, grads):
            if g is not None:
                shape = c.edge_shapes[i]
                out[id(c)][i] = g.reshape(g.shape[0], *shape) if shape is not None else g
        return out

    def forms(self, per_call: CallGradients) -> dict[int, list[Form]]:
        """Per parameter (by ``id``), the forms of every call that reached it."""
        forms: dict[int, list[Form]] = {}
        for unit, call in self.calls:
            gs = per_call.get(id(call))
            if gs is None or all(g is None for g in gs):
                continue
            for local, form in self.forms_of_call(unit, call, gs).items():
                forms.setdefault(id(unit.params[local]), []).append(form)
        return forms

    def locate(self, node: Any) -> str:
        """Where an autograd node of the graph lies, for error messages: the innermost
        recorded call whose region contains it."""
        if not hasattr(self, "_regions"):
            self._regions = [(u.name, region(c)) for u, c in self.calls]
        inside = [(len(r), name) for name, r in self._regions if node in r]
        if inside:
            return f"module '{min(inside)[1]}'"
        return "the model (outside any layer with parameters)"

    def merged_forms(self, start: Any, vectors: Tensor) -> dict[int, Form]:
        """Backpropagate ``vectors`` from ``start`` (graph kept) and merge each parameter's
        forms: ``{id(parameter): Form}``."""
        per_call = self.per_call(self.gradients(start, vectors, retain=True))
        return {pid: merge_forms(f) for pid, f in self.forms(per_call).items()}
