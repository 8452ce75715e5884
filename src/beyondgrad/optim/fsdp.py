"""FSDP2 (``fully_shard``): a step of the optimizers on DTensor parameters.

For the step, every ``DTensor`` parameter is replaced (in the model, the param groups and the
optimizer's maps) by a plain full parameter holding the gathered values and the gathered
gradient (FSDP already averaged it over the ranks); the ordinary step then runs identically
on every rank (preconditioning needs whole gradients: Kronecker factors couple all rows of a
weight). Afterwards each rank writes its shard back into the ``DTensor`` and keeps its
per-parameter state (momenta, grafting and AdamW moments) as ``DTensor`` shards, so the
per-element state is sharded at rest; the preconditioners (factors, eigenpairs) are
replicated, and ``ownership="owner"`` splits their refreshes over the ranks. Each step
all-gathers every sharded parameter, its gradient and its per-element state once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from ..distributed import fsdp


@contextmanager
def full_parameters(opt: Any) -> Iterator[bool]:
    """Plain full parameters in place of ``opt``'s DTensor parameters for one step.

    Args:
        opt: a :class:`~beyondgrad.optim.base.CurvatureOptimizer`.

    Yields:
        Whether any parameter was sharded (then gradients are not all-reduced again).
    """
    sharded = [p for g in opt.param_groups for p in g["params"] if fsdp.is_sharded(p)]
    if not sharded:
        yield False
        return
    full = {p: _gathered(p) for p in sharded}
    by_id = {id(p): f for p, f in full.items()}
    restore = _swap_modules(opt.model, by_id)
    for group in opt.param_groups:
        group["params"] = [by_id.get(id(p), p) for p in group["params"]]
    for p, f in full.items():
        opt.names[id(f)] = opt.names[id(p)]
        opt._group_index[id(f)] = opt._group_index[id(p)]
        if p in opt.state:
            opt.state[f] = {k: _full_state(v, p) for k, v in opt.state.pop(p).items()}
    try:
        yield True
    finally:
        restore()
        back = {id(f): p for p, f in full.items()}
        for group in opt.param_groups:
            group["params"] = [back.get(id(q), q) for q in group["params"]]
        for p, f in full.items():
            del opt.names[id(f)], opt._group_index[id(f)]
            p.to_local().copy_(fsdp.local_shard(f.detach(), p))
            if f in opt.state:
                opt.state[p] = {k: _sharded_state(v, p) for k, v in opt.state.pop(f).items()}


def _gathered(p: Tensor) -> nn.Parameter:
    f = nn.Parameter(fsdp.full_tensor(p.detach()), requires_grad=p.requires_grad)
    if p.grad is not None:
        f.grad = fsdp.full_tensor(p.grad)
    return f


def _full_state(value: Any, p: Tensor) -> Any:
    """A state entry for the step: sharded ones gathered (loaded plain ones kept)."""
    return fsdp.full_tensor(value) if fsdp.is_sharded(value) else value


def _sharded_state(value: Any, p: Tensor) -> Any:
    """A state entry at rest: per-element tensors (the parameter's shape) sharded like it."""
    per_element = isinstance(value, Tensor) and value.ndim and value.shape == p.shape
    if per_element and not fsdp.is_sharded(value):
        return fsdp.shard_like(value, p)
    return value


def _swap_modules(model: nn.Module, by_id: dict[int, nn.Parameter]) -> Any:
    """Register the full parameters in the modules; returns the function undoing it."""
    swapped = []
    for module in model.modules():
        for name, q in list(module._parameters.items()):
            if q is not None and id(q) in by_id:
                module._parameters[name] = by_id[id(q)]
                swapped.append((module, name, q))

    def restore() -> None:
        for module, name, q in swapped:
            module._parameters[name] = q

    return restore


__all__ = ["full_parameters"]
