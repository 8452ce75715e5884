"""``Forms``: the merged forms themselves as a result (deprecated in favour of
``bg.compute(..., vectors=[kind]).stats.forms(kind)``; kept while consumers move)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..engine import GRAD, ReduceContext, VectorKind
from ..forms import Form
from .base import Quantity


@dataclass(frozen=True)
class Forms(Quantity):
    """The merged per-row gradient form of each parameter for the vectors ``kind``."""

    kind: VectorKind = GRAD
    max_vectors: int = 256
    per_sample: ClassVar[bool] = False

    @property
    def vectors(self) -> VectorKind:
        """``kind``."""
        return self.kind

    def reduce(self, form: Form, ctx: ReduceContext, out: Tensor | None = None) -> Form:  # type: ignore[override]
        """The form itself."""
        return form
