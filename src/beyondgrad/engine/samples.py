"""Which axis of each recorded layer call holds the samples, decided from how tensors flow.

A layer may be called on a tensor with no sample axis at all: positional embeddings on
``torch.arange(T)`` (nanoGPT) or on ``position_ids`` of shape ``[1, T]`` (Hugging Face), a
relative-attention bias on a ``[T, T]`` bucket matrix (T5), a projection of learned latents
(Perceiver). Its output is broadcast over the samples, so it still has per-sample gradients
(the gradient through that sample's use of the shared output) — but a length test such as
"the leading axis has length N" cannot tell it from a batched call when ``T == N``.

**The probe.** The session records the arguments of the model's (single) call. Before the
statistics are formed, the forward pass is run once more without gradients on a batch of a
different size ``N'`` (the model's tensor arguments whose leading length is ``N`` are indexed
along that axis; RNG state and buffers are restored afterwards, so the probe has no side
effect). For every recorded call, each input and output tensor is compared with its probe
counterpart: the axis whose length went from ``N`` to ``N'`` (all other axes unchanged) is its
sample axis; a tensor whose shape did not change has none (shared). Lengths that merely
coincide with ``N`` stay unchanged in the probe, so a coincidence cannot fool the decision.
Results are cached per model and input signature, so repeated steps probe once; when
``bg.compute`` runs its coupling probe (:mod:`beyondgrad.engine.coupling`), the first of its two
runs is on a batch of another size and fills the cache (:class:`ShapeRecorder`), so no probe
forward of its own is needed.

**Shared outputs.** For an output leaf with no sample axis, the per-sample gradients
``d l_n / d y`` are backpropagated separately: every output-space vector is split into ``N``
copies, each masked to one sample, and the ``K N`` vectors go through one vectorized backward
pass to the shared outputs only. The gradients then carry a leading sample axis
(``[K, N, *y.shape]``) and the layer's input is expanded along a new sample axis, so every rule
(fast, generic, Kronecker) sees an ordinary batched call. This pass costs about ``K N``
vector-backward passes and runs only for models that have such layers; with ``from_backward``
it runs when the ordinary backward starts (a hook on the loss), before the graph is freed.

**Expansion (the cheap exact cut).** Once a model's probe shows shared outputs, a second probe
forward checks whether handing the model those outputs *expanded* along a sample axis (``y`` of
shape ``[1, T, D]`` as ``y.expand(N, T, D)``; ``[T, D]`` as ``y.unsqueeze(0).expand(N, T, D)``)
leaves its output unchanged, as it does wherever the shared output only meets the samples by
broadcasting (``tok_emb + pos_emb``). If so, later forward passes with the same input
signature get the expanded view: the ordinary backward then delivers ``d l_n / d y`` on the
view's sample axis (a view costs no memory; the broadcast op materialized ``[N, T, D]``
anyway), and the masked pass is skipped. A model whose output changes (a random draw on the
shared output, an op that indexes it) keeps the masked pass. Quantities that backpropagate
from inside the network (``Needs.inside``) never get the expansion, so they refuse shared
outputs consistently.

A model not called exactly once inside the capture block (or whose probe records other calls)
keeps the convention: the leading axis of every layer's input holds the samples.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .capture import OWN_HOOKS, Call, Layer, expand_shared, model_state
from .leaves import call_leaves, call_structure, leaves

UNKNOWN = -1
"""Axis marker: the tensor's length changed with the batch size but not as one sample axis
(e.g. samples flattened together with positions)."""

#: vectors per masked backward pass (memory bound of the shared-output pass)
SHARED_CHUNK = 256


@dataclass(frozen=True)
class CallAxes:
    """The sample axis of every tensor leaf of one call (``None``: no sample axis, i.e. shared
    by all samples; :data:`UNKNOWN`: the samples are merged with another axis).

    Attributes:
        inputs: per tensor leaf of ``(args, kwargs)`` (pytree order; non-tensors ``None``).
        outputs: per tensor leaf of the output (pytree order).
    """

    inputs: tuple[int | None, ...]
    outputs: tuple[int | None, ...]

    @property
    def x(self) -> int | None:
        """The sample axis of the first argument."""
        return self.inputs[0] if self.inputs else None

    def shared_output(self, i: int) -> bool:
        """Whether output leaf ``i`` has no sample axis (it gets per-sample gradients from
        the masked pass)."""
        return self.outputs[i] is None


def _shapes(tree: Any) -> list[torch.Size | None]:
    return [t.shape if isinstance(t, Tensor) else None for t in leaves(tree)]


def _call_shapes(args: tuple, kwargs: dict) -> list[torch.Size | None]:
    return [t.shape if isinstance(t, Tensor) else None for t in call_leaves(args, kwargs)]


def _axis(real: torch.Size | None, probe: torch.Size | None, N: int, M: int) -> int | None:
    """The sample axis of a tensor of shape ``real`` (batch ``N``) whose probe shape (batch
    ``M``) is ``probe``."""
    if real is None or probe is None or real == probe:
        return None
    if len(real) != len(probe):
        return UNKNOWN
    changed = [i for i, (a, b) in enumerate(zip(real, probe)) if a != b]
    if len(changed) == 1 and real[changed[0]] == N and probe[changed[0]] == M:
        return changed[0]
    return UNKNOWN


class ModelCall:
    """A forward pre-hook on the model recording the arguments of its calls (grad mode on).

    Args:
        model: the model.
        on_first: called with ``(args, kwargs)`` at the first recorded call, before the
            model's forward runs (the session plans the expansion of shared outputs there).
    """

    def __init__(self, model: nn.Module, on_first: Any = None):
        self.model = model
        self.on_first = on_first
        self.calls: list[tuple[tuple, dict]] = []
        self._handle: Any = None

    def __enter__(self) -> ModelCall:
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if torch.is_grad_enabled():
                self.calls.append((args, kwargs))
                if len(self.calls) == 1 and self.on_first is not None:
                    self.on_first(args, kwargs)

        self._handle = self.model.register_forward_pre_hook(pre, with_kwargs=True)
        OWN_HOOKS.add(self._handle.id)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            OWN_HOOKS.discard(self._handle.id)
            self._handle.remove()
            self._handle = None


@dataclass
class Expansion:
    """Shared layer outputs handed to the model expanded along a sample axis.

    Attributes:
        plan: ``{layer name: {call index: output leaf indices}}``.
        seen: the probe's layer shapes with the expansion applied (see :class:`ShapeRecorder`).
        num_samples: ``N`` of the input signature it was validated for.
    """

    plan: dict[str, dict[int, tuple[int, ...]]]
    seen: dict[str, list[tuple[list, list]]]
    num_samples: int


@dataclass
class Probe:
    """A cached probe of one input signature: the layer shapes on ``size`` samples and, once
    tried, the validated :class:`Expansion` (``None``: the masked pass stays)."""

    seen: dict[str, list[tuple[list, list]]]
    size: int
    expansion: Expansion | None = None
    tried: bool = False


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def signature(args: tuple, kwargs: dict, model: nn.Module) -> tuple:
    """The cache key of a call of ``model``: argument structure, tensor shapes/dtypes/devices,
    the other arguments' reprs and the model's :func:`~beyondgrad.engine.capture.model_state`
    (modules, modes, hooks, parameters)."""
    leaves, structure = call_structure(args, kwargs)
    return (
        structure,
        model_state(model),
        tuple(
            (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, Tensor) else repr(t)
            for t in leaves
        ),
    )


def probe_size(N: int) -> int:
    """The batch size of the probe forward for a batch of ``N`` samples (any other size)."""
    return 2 if N != 2 else 3


def _probe_batch(args: tuple, kwargs: dict, N: int) -> tuple[tuple, dict, int]:
    """The model's arguments on a batch of ``M != N`` samples (the tensors with leading
    length ``N`` indexed along that axis, samples repeated cyclically)."""
    M = probe_size(N)
    index: dict[torch.device, Tensor] = {}

    def take(t: Any) -> Any:
        if not (isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == N):
            return t
        if t.device not in index:
            index[t.device] = torch.arange(M, device=t.device) % N
        return t.detach()[index[t.device]]

    return tree_map(take, args), tree_map(take, kwargs), M


class ShapeRecorder:
    """Forward hooks recording the shapes of every call of the given modules (inputs and
    outputs, pytree order) while entered; ``complete`` once left without an error.

    Args:
        modules: ``(name, module)`` pairs (the session's layers).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]):
        self.modules = list(modules)
        self.seen: dict[str, list[tuple[list, list]]] = {name: [] for name, _ in self.modules}
        self.complete = False
        self._handles: list[Any] = []

    def __enter__(self) -> ShapeRecorder:
        for name, module in self.modules:

            def hook(module: nn.Module, a: tuple, kw: dict, out: Any, name: str = name) -> None:
                self.seen[name].append((_call_shapes(a, kw), _shapes(out)))

            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.complete = exc_type is None


def is_probed(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether the sample axes of ``model(*args, **kwargs)`` are already known (cached)."""
    return signature(args, kwargs, model) in _CACHE.get(model, {})


def remember_probe(
    model: nn.Module, args: tuple, kwargs: dict, shapes: ShapeRecorder, M: int
) -> None:
    """Cache the shapes a forward pass on ``M`` samples recorded (another pass without
    gradients, e.g. the coupling probe of :mod:`beyondgrad.engine.coupling`) as the probe of
    ``model(*args, **kwargs)``, so that :func:`probe_axes` needs no forward pass of its own."""
    if shapes.complete:
        _CACHE.setdefault(model, {})[signature(args, kwargs, model)] = Probe(shapes.seen, M)


def expansion_for(
    model: nn.Module, args: tuple, kwargs: dict, key: tuple | None = None
) -> Expansion | None:
    """The validated :class:`Expansion` of ``model(*args, **kwargs)``, if any (cached);
    ``key``: the call's :func:`signature` when already known."""
    entry = _CACHE.get(model, {}).get(key or signature(args, kwargs, model))
    return entry.expansion if entry is not None else None


class _Expanding:
    """Forward hooks that hand the model the planned shared outputs expanded to ``n``
    samples (registered after the shape hooks, so shapes record the unexpanded output).
    ``perturb``: the sample slot whose copy is changed (the validation's leak test)."""

    def __init__(
        self,
        layers: list[Layer],
        plan: dict[str, dict[int, tuple[int, ...]]],
        n: int,
        perturb: int | None = None,
    ):
        self.modules = [(u.name, u.module) for u in layers if u.name in plan]
        self.plan, self.n, self.perturb = plan, n, perturb
        self._handles: list[Any] = []

    def _view(self, y: Tensor) -> Tensor:
        view = expand_shared(y, self.n)
        if self.perturb is None or not y.is_floating_point():
            return view
        view = view.clone()
        view[self.perturb] = view[self.perturb] * 1.5 + 0.25
        return view

    def __enter__(self) -> _Expanding:
        for name, module in self.modules:
            count = [0]

            def hook(module: nn.Module, a: tuple, out: Any, name: str = name, count=count):
                outs = self.plan[name].get(count[0], ())
                count[0] += 1
                if not outs:
                    return None
                leaves, spec = tree_flatten(out)
                for i in outs:
                    leaves[i] = self._view(leaves[i])
                return tree_unflatten(leaves, spec)

            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _probe_forward(
    model: nn.Module, layers: list[Layer], args_m: tuple, kwargs_m: dict, expand: Any = None
) -> tuple[dict, Any]:
    """The model on the probe batch without side effects (no gradients; RNG state and buffers
    restored; the same seed every time): the layers' shapes and the model output. ``expand``:
    ``(plan, M)`` or ``(plan, M, perturbed slot)`` to run with :class:`_Expanding`."""
    # the probe runs on copies of the buffers (running statistics, caches): the originals are
    # neither updated nor bumped in version (autograd may have saved them)
    owners = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]
    for m, n, b in owners:
        m._buffers[n] = b.detach().clone()
    devices = [t.device for t in tree_flatten((args_m, kwargs_m))[0] if isinstance(t, Tensor)]
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    shapes = ShapeRecorder([(u.name, u.module) for u in layers])
    expanding = _Expanding(layers, *expand) if expand is not None else None
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), shapes:
            torch.manual_seed(0)
            if expanding is None:
                return shapes.seen, model(*args_m, **kwargs_m)
            with expanding:
                return shapes.seen, model(*args_m, **kwargs_m)
    finally:
        for m, n, b in owners:
            m._buffers[n] = b


def _run_probe(model: nn.Module, layers: list[Layer], args: tuple, kwargs: dict, N: int):
    """Shapes of every call of every layer on a batch of another size, without side effects.
    Raises ``ValueError`` when no tensor argument has the leading length ``N``: the probe
    would run the same batch, and every layer would look shared across the samples."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
    if not any(t.ndim > 0 and t.shape[0] == N for t in tensors):
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(
            f"the model's output has {N} rows (samples), but none of its tensor arguments "
            f"{shapes} has a leading axis of length {N}: does the model flatten its batch "
            "(e.g. logits.view(-1, V) over [N, T] tokens)? Keep the samples first (for a "
            "sequence loss: logits [N, V, T] with targets [N, T], as nn.CrossEntropyLoss "
            "takes them)"
        )
    args_m, kwargs_m, M = _probe_batch(args, kwargs, N)
    return Probe(_probe_forward(model, layers, args_m, kwargs_m)[0], M)


def _close(u: Any, v: Any) -> bool:
    """Whether two output leaves agree (floating tensors to a few ulps)."""
    if not isinstance(u, Tensor):
        return not isinstance(v, Tensor) and u == v
    if not isinstance(v, Tensor) or u.shape != v.shape or u.dtype != v.dtype:
        return False
    if not (u.is_floating_point() or u.is_complex()):
        return torch.equal(u, v)
    eps = 16 * torch.finfo(u.dtype).eps
    scale = float(u.abs().max().clamp_min(1)) if u.numel() else 1.0
    return torch.allclose(u, v, rtol=eps, atol=eps * scale, equal_nan=True)


def _same_outputs(a: Any, b: Any, M: int, skip: int | None = None) -> bool:
    """Whether two model outputs on ``M`` samples agree leaf by leaf; ``skip``: a sample row
    left out of the comparison of leaves whose leading axis holds the ``M`` samples."""
    la, lb = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(la) != len(lb):
        return False
    for u, v in zip(la, lb):
        if skip is not None and isinstance(u, Tensor) and u.ndim and u.shape[0] == M:
            keep = [i for i in range(M) if i != skip]
            u, v = u[keep], v[keep] if isinstance(v, Tensor) and v.shape == u.shape else v
        if not _close(u, v):
            return False
    return True


def _expansion_plan(layers: list[Layer]) -> dict[str, dict[int, tuple[int, ...]]]:
    """The shared output leaves (probed, requiring grad) of every recorded call."""
    plan: dict[str, dict[int, tuple[int, ...]]] = {}
    for unit in layers:
        for index, call in enumerate(unit.calls):
            if call.axes is None:
                continue
            outs = tuple(
                i
                for i, e in enumerate(call.edges)
                if e is not None and call.axes.shared_output(i) and i not in call.expanded
            )
            if outs:
                plan.setdefault(unit.name, {})[index] = outs
    return plan


def _try_expansion(
    model: nn.Module, layers: list[Layer], probe: tuple[tuple, dict, int], plan: dict
) -> dict | None:
    """The layer shapes of the expanded probe forward when ``plan`` is valid: the expanded
    forward returns the model's output, and changing one sample's copy changes no other
    sample's output (each sample reads its own copy only); ``M + 2`` probe forwards."""
    args_m, kwargs_m, M = probe
    try:
        reference = _probe_forward(model, layers, args_m, kwargs_m)[1]
        seen, expanded = _probe_forward(model, layers, args_m, kwargs_m, (plan, M))
        if not _same_outputs(reference, expanded, M):
            return None
        for slot in range(M):
            changed = _probe_forward(model, layers, args_m, kwargs_m, (plan, M, slot))[1]
            if not _same_outputs(reference, changed, M, skip=slot):
                return None
    except Exception:  # an op that cannot take the expanded view: keep the masked pass
        return None
    return seen


def _validated_expansion(
    model: nn.Module, layers: list[Layer], args: tuple, kwargs: dict, N: int, paused: Any
) -> Expansion | None:
    """An :class:`Expansion` of the probed calls' shared outputs: each layer's tried on its
    own, the valid ones together (once per input signature)."""
    plan = _expansion_plan(layers)
    if not plan:
        return None
    probe = _probe_batch(args, kwargs, N)
    with paused(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what a rejected expansion makes the model say
        if len(plan) > 1:
            plan = {k: v for k, v in plan.items() if _try_expansion(model, layers, probe, {k: v})}
        seen = _try_expansion(model, layers, probe, plan) if plan else None
    return Expansion(plan, seen, N) if seen is not None else None


def _guarded_probe(
    model: nn.Module, layers: list[Layer], args: tuple, kwargs: dict, N: int, paused: Any
) -> Probe | None:
    """:func:`_run_probe`, or ``None`` with a warning when the model cannot run on the probe
    batch (e.g. an argument whose leading length equals ``N`` by coincidence)."""
    try:
        with paused():
            return _run_probe(model, layers, args, kwargs, N)
    except Exception as err:  # any failure of user code: fall back, say so
        warnings.warn(
            f"beyondgrad could not probe which axis holds the samples ({type(err).__name__}: "
            f"{err}); the leading axis of every layer input is taken as the sample axis",
            RuntimeWarning,
            stacklevel=4,
        )
        return None


def probe_axes(
    model: nn.Module,
    layers: list[Layer],
    recorded: ModelCall,
    N: int,
    paused: Any,
    expansion: Expansion | None = None,
    try_expansion: bool = False,
    key: tuple | None = None,
) -> bool:
    """Set ``call.axes`` (:class:`CallAxes`) on every recorded call of ``layers``.

    Args:
        model: the model.
        layers: the session's layers with their recorded calls.
        recorded: the model's recorded calls (exactly one is needed).
        N: the number of samples (leading length of the model output).
        paused: a context manager that stops the session's own recording.
        expansion: the :class:`Expansion` applied in the recorded forward (its probe shapes
            are compared).
        try_expansion: validate an :class:`Expansion` for later passes when none was tried
            for this input signature.
        key: the recorded call's :func:`signature` when already known.

    Returns:
        ``False`` when the axes cannot be probed (the model was not called exactly once inside
        the block, or the probe's calls do not match the recorded ones); the calls then keep
        ``axes = None`` and the leading-axis convention applies.
    """
    if len(recorded.calls) != 1 or not any(u.calls for u in layers):
        return False
    args, kwargs = recorded.calls[0]
    key = key or signature(args, kwargs, model)
    cache = _CACHE.setdefault(model, {})
    if key not in cache:
        cache[key] = _guarded_probe(model, layers, args, kwargs, N, paused)
    entry: Probe | None = cache[key]
    if entry is None:
        return False
    seen = expansion.seen if expansion is not None else entry.seen
    if not _set_axes(layers, seen, N, entry.size):
        return False
    if try_expansion and not entry.tried:
        entry.tried = True
        entry.expansion = _validated_expansion(model, layers, args, kwargs, N, paused)
    return True


def _set_axes(layers: list[Layer], seen: dict, N: int, M: int) -> bool:
    """Set ``call.axes`` from the probe's shapes; ``False`` when the calls do not match."""
    if any(len(seen.get(u.name, ())) != len(u.calls) for u in layers):
        return False
    for unit in layers:
        for call, (ins, outs) in zip(unit.calls, seen[unit.name]):
            real_in, real_out = (
                _call_shapes(call.args, call.kwargs),
                [o.shape if isinstance(o, Tensor) else None for o in call.outputs],
            )
            if len(real_in) != len(ins) or len(real_out) != len(outs):
                return False
            call.axes = CallAxes(
                tuple(_axis(r, p, N, M) for r, p in zip(real_in, ins)),
                tuple(_axis(r, p, N, M) for r, p in zip(real_out, outs)),
            )
    return True


def shared_edges(calls: Sequence[tuple[Layer, Call]]) -> list[tuple[Call, int]]:
    """The ``(call, output index)`` of every output leaf with a gradient edge and no sample
    axis."""
    return [
        (call, i)
        for _, call in calls
        if call.axes is not None
        for i, edge in enumerate(call.edges)
        if edge is not None and call.axes.shared_output(i) and i not in call.expanded
    ]


def per_sample_vectors(vectors: Tensor) -> Tensor:
    """``[K, N, ...]`` vectors split into ``[K N, N, ...]``: copy ``(k, n)`` keeps sample
    ``n`` of vector ``k`` and zeros elsewhere."""
    K, N = vectors.shape[:2]
    eye = torch.eye(N, dtype=vectors.dtype, device=vectors.device)
    mask = eye.reshape(1, N, N, *([1] * (vectors.ndim - 2)))
    return (vectors.unsqueeze(1) * mask).reshape(K * N, *vectors.shape[1:])


def shared_gradients(
    output: Tensor,
    vectors: Tensor,
    shared: list[tuple[Call, int]],
    node_kinds: set[str],
    backprop: Any,
) -> dict[tuple[int, int], Tensor]:
    """Per-sample gradients ``[K, N, *y.shape]`` of every shared output leaf ``y``.

    Args:
        output: the model output ``[N, ...]`` (graph alive).
        vectors: the output-space vectors ``[K, N, ...]`` of one kind.
        shared: :func:`shared_edges`.
        node_kinds: the graph's node type names.
        backprop: :func:`~beyondgrad.engine.backprop.backprop_vectors`.

    Returns:
        ``{(id(call), output index): gradients}``; the graph is kept.
    """
    K, N = vectors.shape[:2]
    targets = [call.edges[i] for call, i in shared]
    parts: list[tuple[Tensor | None, ...]] = []
    split = per_sample_vectors(vectors)
    for start in range(0, K * N, SHARED_CHUNK):
        parts.append(
            backprop(output, targets, split[start : start + SHARED_CHUNK], node_kinds, True)
        )
    out: dict[tuple[int, int], Tensor] = {}
    for j, (call, i) in enumerate(shared):
        pieces = [p[j] for p in parts]
        if any(p is None for p in pieces):
            continue
        g = torch.cat(pieces, 0)  # type: ignore[arg-type]
        shape = call.edge_shapes[i] or call.outputs[i].shape
        out[(id(call), i)] = g.reshape(K, N, *shape)
    return out


def check_shared_gradients(name: str, call: Call, grads: list[Tensor | None]) -> None:
    """Raise ``NotImplementedError`` when a shared output's gradients do not carry the
    per-sample axis (``[K, N, *shape]``), i.e. they were backpropagated from a point other than
    the model output (the residual passes of ``DiagHessian``), where no per-sample split
    exists."""
    if call.axes is None:
        return
    for i, g in enumerate(grads):
        out = call.outputs[i]
        if g is None or not call.axes.shared_output(i) or not isinstance(out, Tensor):
            continue
        if g.ndim != out.ndim + 2:
            raise NotImplementedError(
                f"module '{name}' is called without a sample axis (its output is shared by "
                "all samples); this quantity backpropagates from inside the network, where "
                "its per-sample gradients cannot be separated. Supported for it: first-order "
                "quantities, the GGN family and KFAC."
            )


def rule_input(call: Call, N: int) -> Tensor:
    """The first argument as a fast rule reads it, sample axis first: expanded along a new
    leading axis of length ``N`` when the call has no sample axis. Raises ``RuntimeError``
    when the samples are not on the leading axis."""
    x = call.x.detach()
    axes = call.axes
    if axes is None:  # not probed: the leading-axis convention
        ok = x.ndim > 0 and x.shape[0] == N
        return x if ok else _not_first(call, x, N)
    if axes.outputs and axes.outputs[0] is None and axes.x is None:
        return x.unsqueeze(0).expand(N, *x.shape)
    if axes.x == 0 and (not axes.outputs or axes.outputs[0] == 0):
        return x
    return _not_first(call, x, N)


def _not_first(call: Call, x: Tensor, N: int) -> Tensor:
    out = call.outputs[0]
    raise RuntimeError(
        f"expected the sample axis (length {N}) first, got input {tuple(x.shape)} and output "
        f"{tuple(out.shape) if isinstance(out, Tensor) else '?'}. beyondgrad's fast rules read "
        "the samples on the leading axis of a layer's input (or no sample axis at all), and "
        "the loss's input must keep that axis first: a language model whose logits "
        "[N, T, V] are flattened to [N*T, V] before the loss should hand nn.CrossEntropyLoss "
        "logits.transpose(1, 2) ([N, V, T]) and targets [N, T] instead."
    )
