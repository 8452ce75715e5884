"""``bg.coverage``: which rule serves each parameter of a model on a given batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .attribution import attribute
from .backprop import GRAD
from .compute import call_model
from .session import capture


@dataclass(frozen=True)
class CoverageRow:
    """One parameter: its name, shape, serving module(s), rule and number of recorded calls."""

    parameter: str
    shape: tuple[int, ...]
    modules: tuple[str, ...]
    rule: str
    calls: int


class Coverage(list):
    """A list of :class:`CoverageRow`; ``str()`` gives a table, :meth:`by_rule` a summary."""

    def by_rule(self) -> dict[str, int]:
        """How many parameters each rule serves.

        Returns:
            ``{rule name: number of parameters}``, in order of first appearance.
        """
        counts: dict[str, int] = {}
        for row in self:
            counts[row.rule] = counts.get(row.rule, 0) + 1
        return counts

    def __str__(self) -> str:
        header = ("parameter", "shape", "module(s)", "rule", "calls")
        lines = [
            (
                r.parameter,
                "x".join(map(str, r.shape)) or "scalar",
                ", ".join(r.modules) or "-",
                r.rule,
                str(r.calls),
            )
            for r in self
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        return "\n".join(out)


def coverage(model: nn.Module, loss_fn: nn.Module, X: Any, y: Tensor) -> Coverage:
    """Run one forward pass of ``loss_fn(model(X), y)`` and report, per trainable parameter,
    the rule that serves it (``linear``, ``embedding``, ``layer_norm``, ``rms_norm``,
    ``group_norm``, ``batch_norm``, ``generic``, or ``unused`` when it does not reach the loss).
    Raises like :func:`compute` for parameters used where no module call explains them."""
    with capture(model, loss_fn, vectors=[GRAD]) as session:
        loss = loss_fn(call_model(model, X), y)
    names = {id(p): n for n, p in model.named_parameters()}
    attribute(loss, session.layers, names)
    rows = []
    for name, param in model.named_parameters():
        serving = [u for u in session.layers if any(q is param for q in u.params.values())]
        if not serving:
            continue
        calls = sum(len(u.calls) for u in serving)
        rules = {u.rule_name for u in serving}
        rule = rules.pop() if len(rules) == 1 else "mixed(" + "+".join(sorted(rules)) + ")"
        rows.append(
            CoverageRow(
                name,
                tuple(param.shape),
                tuple(u.name or "<root>" for u in serving),
                rule if calls else "unused",
                calls,
            )
        )
    return Coverage(rows)
