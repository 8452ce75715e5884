"""Capture: which module serves each parameter (layers), and forward hooks recording every call.

A *unit* is a module that owns trainable parameters, with the rule that serves them. Each call of
a unit's module during the forward pass is recorded as a :class:`Call`: its arguments and a
gradient edge of each output. Gradient edges (``torch.autograd.graph.get_gradient_edge``) stay
valid when the output is later modified in place (``nn.ReLU(inplace=True)``), so no output is
copied. A layer called several times (tied weights, loops) yields several calls; all count.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..rules import Rule, find_rule
from ..rules.attention import in_projection_unit
from .leaves import call_leaves


@dataclass
class Call:
    """One recorded call of a unit's module.

    ``outputs``: the tensor leaves of the returned value (pytree order); ``edges[i]`` the
    gradient edge to differentiate for ``outputs[i]`` (``None`` if it does not require grad);
    ``edge_shapes[i]`` the shape to view that gradient as (the edge may belong to the base of a
    view output).
    """

    args: tuple
    kwargs: dict
    output: Any
    outputs: list[Any]
    edges: list[GradientEdge | None]
    edge_shapes: list[torch.Size | None]
    input_versions: list[tuple[Tensor, int]]
    problem: str | None = None  # why the recorded call cannot be used exactly (raised lazily)
    axes: Any = None  # engine.samples.CallAxes once probed (None: leading-axis convention)
    # output leaves handed to the model expanded along a sample axis (engine.samples): their
    # edges belong to the expanded view, their gradients are viewed as ``[N, *output.shape]``
    expanded: set[int] = field(default_factory=set)

    @property
    def x(self) -> Tensor:
        return self.args[0]

    def inputs_requiring_grad(self) -> list[Tensor]:
        found = call_leaves(self.args, self.kwargs)
        return [t for t in found if isinstance(t, Tensor) and t.requires_grad]


@dataclass
class Layer:
    """A module that owns trainable parameters, the rule serving them (``None``: the generic
    rule), its parameters ``{name relative to the module: parameter}`` and its recorded calls."""

    name: str
    module: nn.Module
    rule: Rule | None  # None: the generic rule
    params: dict[str, nn.Parameter]
    calls: list[Call] = field(default_factory=list)

    @property
    def rule_name(self) -> str:
        return self.rule.name if self.rule is not None else "generic"


def expand_shared(y: Tensor, n: int) -> Tensor:
    """A layer output shared by all samples as a view with a leading sample axis of length
    ``n``: ``[1, ...]`` expanded in place of its unit axis, any other shape along a new one.
    The gradient of the view, ``[n, *view.shape[1:]]``, reads as ``[n, *y.shape]``."""
    if y.ndim > 0 and y.shape[0] == 1:
        return y.expand(n, *y.shape[1:])
    return y.unsqueeze(0).expand(n, *y.shape)


def check_not_meta(model: nn.Module) -> None:
    """Raise for a model whose parameters live on the meta device (shapes without data)."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "the model has parameters on the meta device (no data); materialize it first, "
            "e.g. model.to_empty(device=...) and initialize or load its weights"
        )


def plan_layers(model: nn.Module) -> list[Layer]:
    """One unit per module that owns trainable parameters directly (one walk over the
    modules: their own parameters as ``named_parameters(recurse=False)`` lists them)."""
    owners: list[tuple[str, nn.Module, dict[str, nn.Parameter]]] = []
    meta = False
    for name, module in model.named_modules():
        own: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for local, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            meta = meta or p.is_meta
            if p.requires_grad:
                own[local] = p  # type: ignore[assignment]
        if own:
            owners.append((name, module, own))
    if meta:
        check_not_meta(model)
    layers = []
    for name, module, own in owners:
        # nn.MultiheadAttention: served through its in-projection (rules.attention)
        unit_module, params = in_projection_unit(module, own)
        rule = _rule_of(module, own) if unit_module is module else find_rule(unit_module)
        layers.append(Layer(name, unit_module, rule, params))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
    return layers


#: module class -> {(its forward, trainable own parameter names): fast rule or None}
_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rule_of(module: nn.Module, own: dict[str, nn.Parameter]) -> Rule | None:
    """``find_rule(module)``, remembered per class: a rule serves a module by its class, the
    class's ``forward`` and the names of its trainable own parameters (``own``), which form
    the key, so a changed ``forward`` or ``requires_grad`` looks the rule up again."""
    cls = type(module)
    key = (cls.forward, frozenset(own))
    known = _RULES.get(cls)
    if known is None:
        known = _RULES[cls] = {}
    if key not in known:
        known[key] = find_rule(module)
    return known[key]


def _edge_of(out: Tensor) -> tuple[Tensor | None, torch.Size | None]:
    """The tensor whose gradient edge stands for ``out`` (``out`` itself, or its base when
    ``out`` is a view of all of it; in-place ops on a view re-route the view's own history).
    ``None`` when ``out`` must be replaced by a copy (a partial view)."""
    base = out._base
    if base is None:
        return out, None
    if base.numel() == out.numel() and base.is_contiguous() and out.is_contiguous():
        return base, out.shape
    return None, None


_REPLAYING = [0]


@contextmanager
def replaying() -> Iterator[None]:
    """Module calls made by beyondgrad itself (the generic rule's per-sample recomputation, a
    verification): no recorder records them, also not those of other live sessions."""
    _REPLAYING[0] += 1
    try:
        yield
    finally:
        _REPLAYING[0] -= 1


class Recorder:
    """Forward hooks on every unit's module; use as a context manager. Records nothing while
    ``paused()`` or when grad mode is off.

    User hooks on a unit's module stay exact:

    * fast-rule layer: our forward hook runs first (``prepend=True``), so it records the output
      of ``forward`` itself, before any user forward hook changes it, and the input that
      ``forward`` received (after the forward pre-hooks).
    * generic layer: the generic rule replays the whole module call (pre-hooks, ``forward``,
      forward hooks), so a first pre-hook records the arguments before any user pre-hook and a
      last forward hook records the final output.

    When a hook runs outside that order (a global module hook, or a hook registered later with
    ``prepend=True``), the call is replayed once without gradients and compared; a mismatch is
    raised when the call is used (:attr:`Call.problem`). The fast-rule hook of another live
    recorder (nested sessions, e.g. the Cockpit's curvature and first-order sessions) does not
    count: it only records, and hands the model the same values (a clone where the output has
    no gradient edge of its own), unless it expands that layer's outputs.
    """

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.enabled = True
        self._handles: list[Any] = []
        # shared outputs to hand to the model expanded (engine.samples.Expansion): layer name
        # -> call index -> output leaves, and the number of samples
        self.expand: dict[str, dict[int, tuple[int, ...]]] = {}
        self.expand_samples = 0

    def __enter__(self) -> Recorder:
        try:
            for unit in self.layers:
                self._install(unit)
        except BaseException:
            self.remove()
            raise
        return self

    def _install(self, unit: Layer) -> None:
        ids: dict[str, int] = {}
        if unit.rule is not None:
            fwd = unit.module.register_forward_hook(
                self._hook(unit, ids, []), with_kwargs=True, prepend=True
            )
            self._handles.append(fwd)
            ids["forward"] = fwd.id
            _RECORDING_HOOKS[fwd.id] = (self, unit.name)
            OWN_HOOKS.add(fwd.id)
            return
        pending: list[tuple[tuple, dict]] = []

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.append((args, dict(kwargs)))

        pre_handle = unit.module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
        self._handles.append(pre_handle)
        fwd = unit.module.register_forward_hook(self._hook(unit, ids, pending), with_kwargs=True)
        self._handles.append(fwd)
        ids.update(pre=pre_handle.id, forward=fwd.id)
        OWN_HOOKS.update((pre_handle.id, fwd.id))

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            _RECORDING_HOOKS.pop(h.id, None)
            OWN_HOOKS.discard(h.id)
            h.remove()
        self._handles.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def _hook(self, unit: Layer, ids: dict[str, int], pending: list[tuple[tuple, dict]]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            call_args, call_kwargs = pending.pop() if pending else (args, kwargs)
            if not self.enabled or _REPLAYING[0] or not torch.is_grad_enabled():
                return None
            if unit.rule is not None and isinstance(output, Tensor) and args:
                result = self._record_simple(unit, args, kwargs, output)
            else:
                result = self._record(unit, call_args, call_kwargs, output)
            if not _hooks_in_order(module, ids, unit.rule is None):
                self._verify(unit, unit.calls[-1], args, kwargs)
            if unit.name in self.expand:
                return self._expand(unit, output if result is None else result)
            return result

        return hook

    def _expand(self, unit: Layer, output: Any) -> Any:
        """Hand the model the planned shared outputs of the latest call as expanded views
        (:func:`expand_shared`); their gradient edges replace the recorded ones."""
        call = unit.calls[-1]
        outs = self.expand[unit.name].get(len(unit.calls) - 1, ())
        leaves, spec = tree_flatten(output)
        for i in outs:
            y = leaves[i]
            if not isinstance(y, Tensor) or call.edges[i] is None or i >= len(call.outputs):
                continue
            leaves[i] = view = expand_shared(y, self.expand_samples)
            call.edges[i] = get_gradient_edge(view)
            call.edge_shapes[i] = torch.Size((self.expand_samples, *y.shape))
            call.expanded.add(i)
        return tree_unflatten(leaves, spec)

    def _verify(self, unit: Layer, call: Call, args: tuple, kwargs: dict) -> None:
        """Replay a call whose hooks ran out of our order; note a mismatch in the call."""
        with self.paused(), replaying(), torch.no_grad():
            if unit.rule is not None:
                again = unit.module.forward(*args, **kwargs)
            else:
                again = unit.module(*call.args, **call.kwargs)
        expected = [t for t in tree_flatten(again)[0] if isinstance(t, Tensor)]
        recorded = [t for t in call.outputs if isinstance(t, Tensor)]
        same = len(expected) == len(recorded) and all(
            a.shape == b.shape and torch.allclose(a, b.detach(), equal_nan=True)
            for a, b in zip(expected, recorded)
        )
        if not same:
            call.problem = (
                f"the output of module '{unit.name}' differs from what its forward computes: "
                "a forward hook that runs before beyondgrad's (a global module hook, or one "
                "registered with prepend=True inside the capture block) changes it, or the "
                "module draws random numbers. Register such hooks before the capture block, "
                "without prepend, or make them return None."
            )

    def _record(self, unit: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        leaves, spec = tree_flatten(output)
        edges: list[GradientEdge | None] = []
        shapes: list[torch.Size | None] = []
        replaced = False
        for i, leaf in enumerate(leaves):
            if not (isinstance(leaf, Tensor) and leaf.requires_grad):
                edges.append(None)
                shapes.append(None)
                continue
            target, shape = _edge_of(leaf)
            if target is None:  # partial view: hand the model a copy we can track
                leaf = leaves[i] = leaf.clone()
                target, replaced = leaf, True
            edges.append(get_gradient_edge(target))
            shapes.append(shape)
        versions = [(t, t._version) for t in call_leaves(args, kwargs) if isinstance(t, Tensor)]
        new_output = tree_unflatten(leaves, spec) if replaced else output
        unit.calls.append(Call(args, kwargs, new_output, leaves, edges, shapes, versions))
        return new_output if replaced else None

    @staticmethod
    def _record_simple(unit: Layer, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        """Fast path for a fast-rule layer: one tensor in (``args[0]``), one tensor out."""
        x = args[0]
        versions = [(x, x._version)] if isinstance(x, Tensor) else []
        if not output.requires_grad:
            unit.calls.append(Call(args, kwargs, output, [output], [None], [None], versions))
            return None
        target, shape = _edge_of(output)
        replaced = target is None
        if replaced:
            output = target = output.clone()
        edge = get_gradient_edge(target)
        unit.calls.append(Call(args, kwargs, output, [output], [edge], [shape], versions))
        return output if replaced else None


def _hooks_in_order(module: nn.Module, ids: dict[str, int], generic: bool) -> bool:
    """Whether our hooks ran where exactness needs them (see :class:`Recorder`): for a fast
    rule our forward hook first of all forward hooks; for the generic rule our pre-hook first
    of all pre-hooks and our forward hook last."""
    forward_hooks = list(getattr(module, "_forward_hooks", {}))
    if not generic:
        ours = ids.get("forward")
        first = next((h for h in forward_hooks if h == ours or not _only_records(h)), None)
        return not _GLOBAL_FORWARD_HOOKS and first == ours
    pre_hooks = list(getattr(module, "_forward_pre_hooks", {}))
    return (
        not _GLOBAL_FORWARD_PRE_HOOKS
        and pre_hooks[:1] == [ids.get("pre")]
        and forward_hooks[-1:] == [ids.get("forward")]
    )


def _only_records(hook_id: int) -> bool:
    """Whether a forward hook is another live recorder's fast-rule hook that leaves the
    output's values and shape alone (it does not expand that layer's outputs)."""
    entry = _RECORDING_HOOKS.get(hook_id)
    return entry is not None and entry[1] not in entry[0].expand


#: forward hook id -> (its recorder, the layer name), for the fast-rule hooks of live recorders
_RECORDING_HOOKS: dict[int, tuple[Recorder, str]] = {}
#: ids of the module hooks live sessions installed (recorders, model-call hooks): not the
#: user's, so they are left out of :func:`model_state`
OWN_HOOKS: set[int] = set()


def model_state(model: nn.Module) -> tuple:
    """What the engine's per-model caches (the sample-axis probe, the coupling probe) are
    valid for besides the input signature: per module its identity, training flag, the
    user's forward hooks and pre-hooks (by function) and its parameters (identity and
    ``requires_grad``), and the global module hooks. A module replaced, a parameter added,
    removed or frozen, a mode toggled or a hook added or removed gives another state, so the
    probes run again. (A plain attribute read by ``forward`` is not part of it.)"""
    parts: list[Any] = [
        _hook_functions(_GLOBAL_FORWARD_HOOKS),
        _hook_functions(_GLOBAL_FORWARD_PRE_HOOKS),
    ]
    for module in model.modules():
        parts.append(id(module))
        parts.append(module.training)
        if module._forward_hooks or module._forward_pre_hooks:
            hooks = (
                _hook_functions(module._forward_hooks),
                _hook_functions(module._forward_pre_hooks),
            )
            if hooks != ((), ()):  # the engine's own hooks alone leave the state as it is
                parts.append(hooks)
        for p in module._parameters.values():
            if p is not None:
                parts.append(id(p))
                parts.append(p.requires_grad)
        parts.append(None)  # end of the module's entries
    return tuple(parts)


def _hook_functions(hooks: dict) -> tuple:
    """The ids of the functions behind ``hooks`` (a bound method by its function and object),
    without the engine's own hooks."""
    if not hooks:
        return ()
    return tuple(
        (id(getattr(fn, "__func__", fn)), id(getattr(fn, "__self__", None)))
        for key, fn in hooks.items()
        if key not in OWN_HOOKS
    )


# torch's registries of global module hooks (``register_module_forward_hook``), read only
_GLOBAL_FORWARD_HOOKS: dict = getattr(torch.nn.modules.module, "_global_forward_hooks", {})
_GLOBAL_FORWARD_PRE_HOOKS: dict = getattr(torch.nn.modules.module, "_global_forward_pre_hooks", {})
