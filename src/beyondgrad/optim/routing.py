"""Routing: which update each optimized parameter gets, and why.

Every parameter goes either to the optimizer's method (``"kfac"``, ``"singd"``,
``"sirfshampoo"``) or to the AdamW fallback (``"adamw"``), never untrained. ``routes`` maps the
parameter name to ``(target, reason)``; :func:`routing_table` prints it.

A ``state_dict`` stores, per optimized parameter in param-group order, its name, shape and
target (:func:`parameter_signature`); ``load_state_dict`` refuses a state whose shapes or
targets differ from the optimizer it is loaded into (:func:`check_signature`), before anything
is changed, instead of failing at the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ._engine import layer_units

NO_STATISTICS = "no Kronecker statistics in the first step"
"""The reason of a layer moved to the fallback after the first captured forward pass."""


def routing_table(routes: dict[str, tuple[str, str]]) -> str:
    """A table: every optimized parameter, where it goes, why."""
    width = max((len(n) for n in routes), default=4)
    lines = [f"{'parameter':<{width}}  {'update':<12}  reason"]
    for name, (target, reason) in routes.items():
        lines.append(f"{name:<{width}}  {target:<12}  {reason}")
    return "\n".join(lines)


def kronecker_layers(
    model: nn.Module, rules: tuple[str, ...], accept: Callable[[nn.Module], str | None]
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """Layers a Kronecker method can precondition.

    Args:
        model: the network.
        rules: the engine rule names the method accepts.
        accept: ``accept(module)`` returns a reason to refuse the module, or None.

    Returns:
        ``(module name -> its parameter names (weight, then bias), parameter name -> why it
        cannot be preconditioned)``. Parameters shared by several modules (tied weights) and
        modules with parameters besides weight and bias are refused.
    """
    units = layer_units(model)
    counts: dict[int, int] = {}
    for u in units:
        for p in u.params.values():
            counts[id(p)] = counts.get(id(p), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    rule_of = {u.name: u.rule for u in units}
    inside_attention = {  # out_proj applied functionally: attention not re-expressed (rules)
        id(m.out_proj)
        for n, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and rule_of.get(n) != "linear"
    }
    layers, refused = {}, {}
    for u in units:
        kind = type(u.module).__name__
        if id(u.module) in inside_attention:
            reason = "MultiheadAttention.out_proj is applied functionally (no layer call)"
        elif u.rule not in rules or "weight" not in u.params:
            reason = f"no Kronecker rule for {kind}"
        elif set(u.params) - {"weight", "bias"}:
            reason = f"{kind} has parameters besides weight and bias"
        elif any(counts[id(p)] > 1 for p in u.params.values()):
            reason = "shared by several modules (tied weights)"
        else:
            reason = accept(u.module)
        if reason is None:
            layers[u.name] = tuple(
                names[id(u.params[k])] for k in ("weight", "bias") if k in u.params
            )
        else:
            for p in u.params.values():
                refused.setdefault(names[id(p)], reason)
    return layers, refused


def factor_width_refusal(module: nn.Module, limit: int | None) -> str | None:
    """A reason to refuse ``module`` when a side of its Kronecker factors (the larger of
    ``weight.shape[0]`` and the rest of the weight's size plus one for a bias: exact for
    ``[out, in, ...]`` weights, within one for a transposed ``[in, out]`` one) is wider than
    ``limit`` (None: no limit), else None. A ``[d, d]`` factor costs ``4 d^2`` bytes in
    float32 and an ``O(d^3)`` decomposition per refresh: a 50,000-token vocabulary's would be
    10 GB."""
    weight = getattr(module, "weight", None)
    if limit is None or not isinstance(weight, Tensor) or weight.ndim < 2:
        return None
    bias = getattr(module, "bias", None) is not None
    width = max(weight.shape[0], weight[0].numel() + bias)
    if width <= limit:
        return None
    return (
        f"a Kronecker factor up to {width} x {width} (> max_factor_dim={limit}: "
        f"{4 * width**2 / 2**30:.1f} GiB in float32, an O(d^3) decomposition per refresh)"
    )


MAX_FACTOR_DIM = 8192
"""KFAC's default ``max_factor_dim``: layers with a wider factor side go to the fallback."""


def transposed_layers(model: nn.Module) -> set[str]:
    """Names of the modules served by the engine's transposed-Linear rule (Hugging Face
    ``Conv1D``: weight ``[in, out]``), whose gradient the Kronecker methods transpose."""
    return {u.name for u in layer_units(model) if u.rule == "transposed_linear"}


Signature = list[tuple[str, tuple[int, ...], str, str]]


def parameter_signature(
    names: list[str], shapes: list[tuple[int, ...]], routes: dict[str, tuple[str, str]]
) -> Signature:
    """``(name, shape, target, reason)`` per optimized parameter, in param-group order."""
    return [(n, tuple(s), *routes[n]) for n, s in zip(names, shapes)]


def check_signature(saved: list[Any], current: Signature, owner: str) -> list[str]:
    """Compare a saved signature with the optimizer's own.

    Args:
        saved: the signature in the ``state_dict``.
        current: the optimizer's.
        owner: the class name, for the messages.

    Returns:
        The parameter names the saved state moved to the fallback after its first step
        (:data:`NO_STATISTICS`) and this optimizer still routes to its method.

    Raises:
        ValueError: other parameter counts, shapes or targets (all differences listed).
    """
    if len(saved) != len(current):
        raise ValueError(
            f"{owner}.load_state_dict: the state_dict has {len(saved)} optimized parameters, "
            f"this optimizer {len(current)}"
        )
    problems, dropped = [], []
    for (s_name, s_shape, s_target, s_reason), (name, shape, target, _) in zip(saved, current):
        if tuple(s_shape) != tuple(shape):
            problems.append(
                f"'{name}' has shape {list(shape)}, the state_dict's '{s_name}' {list(s_shape)}"
            )
        elif s_target == "adamw" and target != "adamw" and s_reason == NO_STATISTICS:
            dropped.append(name)
        elif s_target != target:
            problems.append(f"'{name}' goes to {target}, in the state_dict to {s_target}")
    if problems:
        raise ValueError(
            f"{owner}.load_state_dict: the state_dict was saved for another model or "
            "configuration (nothing was loaded): " + "; ".join(problems)
        )
    return dropped


__all__ = [
    "NO_STATISTICS",
    "Signature",
    "check_signature",
    "kronecker_layers",
    "parameter_signature",
    "routing_table",
    "transposed_layers",
]
