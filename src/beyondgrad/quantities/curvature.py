"""Diagonals of the GGN family: exact (type-2 Fisher = GGN) or Monte-Carlo Fisher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..engine import ReduceContext, VectorKind
from ..forms import Form
from .base import Quantity


@dataclass(frozen=True)
class Curvature(Quantity):
    """Base of the GGN-family quantities. ``mc_samples=None``: exact, the type-2 Fisher (the
    GGN), backpropagating one loss-Hessian square-root column per model output per sample;
    ``mc_samples=M``: the Monte-Carlo Fisher from M sampled labels per sample (seeded by the
    ``generator`` passed to ``compute``; quantities with the same M share their draws).
    ``max_vectors``: exact quantities refuse (with a clear error suggesting MC) when a sample
    has more outputs than this, e.g. a vocabulary times a sequence length. Monte-Carlo ones
    hold every sampled vector at every layer output at once (memory grows with
    ``mc_samples``): the engine refuses with ``MemoryError`` when that would exceed the memory
    available; average several computations with fewer samples instead."""

    mc_samples: int | None = None
    max_vectors: int = 256

    def __post_init__(self) -> None:
        if self.mc_samples is not None and (
            not isinstance(self.mc_samples, int) or self.mc_samples < 1
        ):
            raise ValueError(f"mc_samples must be None or a positive int, got {self.mc_samples!r}")

    @property
    def vectors(self) -> VectorKind:
        """``("exact", 0)`` or ``("mc", mc_samples)``."""
        return ("exact", 0) if self.mc_samples is None else ("mc", self.mc_samples)


@dataclass(frozen=True)
class DiagGGN(Curvature):
    """Diagonal of the GGN (exact, ``mc_samples=None``) or of the MC Fisher, parameter-shaped:
    ``sum_{n,k} g_{k,n}^2`` for the backpropagated vectors ``k`` (reduction included).

    Args:
        mc_samples: ``None`` for the exact GGN, else the number ``M`` of sampled labels per
            sample (MC Fisher).
        max_vectors: exact mode refuses samples with more model outputs than this.
    """

    per_sample: ClassVar[bool] = False

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """Sum of squared rows over the backpropagated vectors and samples.

        Args:
            form: the parameter's form (whole batch).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            Parameter-shaped diagonal ``sum_{n,k} g_{k,n}^2``.
        """
        return form.sum_grad_squared()


@dataclass(frozen=True)
class BatchDiagGGN(Curvature):
    """Per-sample GGN (or MC Fisher) diagonals, ``[N, *shape]``; they sum to :class:`DiagGGN`.

    Args:
        mc_samples: ``None`` for the exact GGN, else the number ``M`` of sampled labels per
            sample (MC Fisher).
        max_vectors: exact mode refuses samples with more model outputs than this.
    """

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Tensor:
        """Per sample, the sum of its squared rows.

        Args:
            form: the parameter's form (restricted to the subsample).
            ctx: batch size and loss reduction (unused).
            out: ignored; a new tensor is returned.

        Returns:
            ``[N, *shape]``; summed over ``N`` it is :class:`DiagGGN`.
        """
        return form.batch_sum_grad_squared()
