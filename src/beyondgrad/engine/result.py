""":class:`Result`: what :func:`~beyondgrad.compute` and ``Session.compute`` return."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from .stats import Statistics


def is_gradient(quantity: Any) -> bool:
    """Whether ``quantity`` is the plain gradient (it needs the gradient and no vectors)."""
    needs = quantity.needs()
    return needs.gradient and not needs.kinds


class Result:
    """The requested quantities of one batch.

    Args:
        values: ``{quantity: {parameter or module name: value}}`` for every quantity
            requested (read through ``result[Q]``).

    Attributes:
        loss: the scalar loss (detached).
        output: the model output (detached).
        rules: per parameter name, the rule that served it.
        subsampling: the sample indices of per-sample quantities (``None``: all).
        stats: the engine's :class:`~beyondgrad.engine.Statistics` the quantities were
            reduced from (``None`` for results not computed by the engine, e.g. HesScale).

    ``result[Q]`` (a quantity class or instance) is ``{parameter name: tensor}`` (names as in
    ``model.named_parameters()``; layer-level quantities such as KFAC are keyed by module
    name). ``result.grad`` is the gradient (only when ``bg.Grad()`` was requested).
    """

    def __init__(
        self,
        loss: Tensor,
        output: Tensor,
        values: dict[Any, dict[str, Any]],
        rules: dict[str, str],
        subsampling: Tensor | None,
        stats: Statistics | None = None,
    ):
        self.loss = loss
        self.output = output
        self.rules = rules
        self.subsampling = subsampling
        self.stats = stats
        self._values = values

    def _find(self, key: Any) -> Any:
        if not isinstance(key, type):
            if key not in self._values:
                raise KeyError(f"{key!r} was not computed; requested: {list(self._values)}")
            return key
        matches = [q for q in self._values if type(q) is key]
        if not matches:
            raise KeyError(f"{key.__name__} was not computed; requested: {list(self._values)}")
        if len(matches) > 1:
            raise KeyError(f"several {key.__name__} were computed; index with the instance")
        return matches[0]

    def __getitem__(self, key: Any) -> dict[str, Any]:
        return self._values[self._find(key)]

    def __contains__(self, key: object) -> bool:
        try:
            self._find(key)
        except (KeyError, TypeError):
            return False
        return True

    @property
    def grad(self) -> dict[str, Tensor]:
        """The gradient per parameter name (needs ``bg.Grad()``)."""
        for q, value in self._values.items():
            if is_gradient(q):
                return value
        raise AttributeError("the gradient was not computed: pass bg.Grad() to compute()")

    def quantities(self) -> list[Any]:
        """The quantity instances computed, in request order."""
        return list(self._values)

    def __repr__(self) -> str:
        names = ", ".join(repr(q) for q in self._values)
        return f"Result(loss={self.loss.item():.6g}, quantities=[{names}])"
