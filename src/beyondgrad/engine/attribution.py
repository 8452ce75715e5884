"""Attribution: prove that every use of every parameter happens inside a recorded call of a unit
that serves it, by walking the autograd graph once before the backward pass.

A parameter enters the graph through edges ``node -> AccumulateGrad(parameter)``. The *region* of
a recorded call is the set of graph nodes between its outputs and its inputs. A use is attributed
when its node lies in the region of a call of a unit serving that parameter. A use inside a
generic unit's call, of a parameter of one of its submodules that no call of the submodule
explains (``nn.MultiheadAttention`` uses ``out_proj.weight`` without calling ``out_proj``), moves
the parameter to that generic unit. Any other use (e.g. ``F.linear(h, self.emb.weight)`` outside
the embedding's forward) raises: its contribution would otherwise be silently lost.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from .capture import Call, Layer


def region(call: Call) -> set:
    """The autograd nodes between a call's outputs and its inputs."""
    stop = {get_gradient_edge(t).node for t in call.inputs_requiring_grad()}
    stack = [e.node for e in call.edges if e is not None and e.node not in stop]
    seen = set(stack)
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen and nxt not in stop:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _parameter_uses(
    loss: Tensor, params: set[int], kinds: set[str]
) -> list[tuple[object, nn.Parameter]]:
    """All edges ``(node, parameter)`` from a graph node into a parameter of interest; the
    type names of all nodes are added to ``kinds``."""
    if loss.grad_fn is None:
        return []
    uses = []
    stack, seen = [loss.grad_fn], {loss.grad_fn}
    while stack:
        node = stack.pop()
        kinds.add(type(node).__name__)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None and id(variable) in params:
                uses.append((node, variable))
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return uses


REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"


def node_kinds(loss: Tensor) -> set[str]:
    """The type names of all autograd nodes of ``loss``'s graph."""
    kinds: set[str] = set()
    _parameter_uses(loss, set(), kinds)
    return kinds


def check_no_reentrant_checkpoint(kinds: set[str]) -> None:
    """Raise for ``torch.utils.checkpoint(..., use_reentrant=True)`` in the graph: it runs the
    checkpointed layers without a graph and recomputes them only inside ``.backward()``, so
    their parameters and layer outputs are invisible to ``torch.autograd.grad``."""
    if REENTRANT_CHECKPOINT in kinds:
        raise RuntimeError(
            "the model uses torch.utils.checkpoint(..., use_reentrant=True): the checkpointed "
            "layers are recomputed only inside loss.backward(), invisible to beyondgrad (their "
            "gradients would come back as zeros). Use checkpoint(..., use_reentrant=False), "
            "torch's recommended variant, which beyondgrad supports exactly."
        )


def attribute(loss: Tensor, layers: list[Layer], names: dict[int, str]) -> set[str]:
    """Check (and where needed re-assign, see the module docstring) the layers serving each
    parameter; ``names`` maps ``id(parameter)`` to its public name. Raises ``RuntimeError`` on a
    use that no unit explains. Returns the type names of the graph's nodes."""
    serving: dict[int, list[Layer]] = {}
    for unit in layers:
        for p in unit.params.values():
            serving.setdefault(id(p), []).append(unit)
    kinds: set[str] = set()
    uses = _parameter_uses(loss, set(serving), kinds)
    check_no_reentrant_checkpoint(kinds)
    if not uses:
        return kinds
    regions: dict[int, list[tuple[Layer, set]]] = {}
    for unit in layers:
        for call in unit.calls:
            nodes = region(call)
            for node in nodes:
                regions.setdefault(id(node), []).append((unit, nodes))

    moved = False
    for node, param in uses:
        pid = id(param)
        around = regions.get(id(node), [])
        if any(unit in serving[pid] for unit, _ in around):
            continue
        # a generic unit whose call contains the use and whose subtree owns the parameter
        candidates = [
            (len(nodes), unit)
            for unit, nodes in around
            if unit.rule is None and any(q is param for q in unit.module.parameters())
        ]
        if not candidates:
            owners = ", ".join(repr(u.name) for u in serving[pid])
            raise RuntimeError(
                f"parameter '{names[pid]}' is used outside the forward of the module(s) that "
                f"own it ({owners}), e.g. `F.linear(h, self.embedding.weight)` in a parent's "
                "forward. beyondgrad attributes gradients to module calls only, so this use "
                "would be lost. Fix: call a module instead (for tied weights, "
                "`self.head = nn.Linear(d, V, bias=False); self.head.weight = "
                "self.embedding.weight`), or wrap the functional use in an nn.Module."
            )
        target = min(candidates, key=lambda c: c[0])[1]
        local = next(n for n, q in target.module.named_parameters() if q is param)
        for unit in serving[pid]:
            unit.params = {n: q for n, q in unit.params.items() if q is not param}
        target.params[local] = param  # type: ignore[assignment]
        serving[pid] = [target]
        moved = True

    if moved:  # uses attributed before a move must still be explained by the new owner
        for node, param in uses:
            if not any(unit in serving[id(param)] for unit, _ in regions.get(id(node), [])):
                raise RuntimeError(
                    f"parameter '{names[id(param)]}' is used both inside and outside the "
                    f"generic module '{serving[id(param)][0].name}'; beyondgrad cannot split "
                    "its per-sample gradients between them."
                )
    return kinds
