"""The table of rules: which function turns a layer's captured ``(x, g)`` into per-sample
gradient forms.

A *fast rule* serves a module whose type is in :data:`FAST_RULES` (by class, or by class path
for classes of optional packages such as Hugging Face's ``Conv1D``, never imported here), whose
``forward`` is the stock one (a subclass that overrides ``forward`` is not trusted) and whose
trainable parameters are the ones the rule knows. Every other module that owns trainable
parameters is served by the generic rule (:func:`~beyondgrad.rules.generic.generic_forms`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ..forms import (
    ConcatForm,
    Form,
    OuterForm,
    PermutedForm,
    SampleForm,
    ScatterForm,
    SumForm,
    merge_forms,
)
from .conv import conv_forms, conv_transpose_forms
from .embedding import embedding_forms
from .generic import generic_forms
from .kronecker import KronStats, conv_kron, conv_transpose_kron, embedding_kron, linear_kron
from .linear import linear_forms
from .norm import (
    batch_norm_forms,
    group_norm_forms,
    layer_norm_forms,
    rms_norm_forms,
    uses_batch_statistics,
)
from .transposed_linear import HF_CONV1D, transposed_linear_forms, transposed_linear_kron

__all__ = [
    "FAST_RULES",
    "GENERIC",
    "ConcatForm",
    "Form",
    "OuterForm",
    "PermutedForm",
    "Rule",
    "SampleForm",
    "ScatterForm",
    "SumForm",
    "find_rule",
    "generic_forms",
    "merge_forms",
    "uses_batch_statistics",
]

GENERIC = "generic"


@dataclass(frozen=True)
class Rule:
    """A fast rule: ``forms(module, x, g, K)`` maps one call's input ``x`` ``[N, ...]`` (the
    first positional argument) and the output gradients ``g`` ``[K N, ...]`` of ``K``
    backpropagated vectors to ``{local parameter name: Form}``. It serves instances of
    ``module_types`` (or of a class whose path ``module.qualname`` is in ``type_paths``) whose
    ``forward`` is that of the matching type."""

    name: str
    module_types: tuple[type[nn.Module], ...]
    forms: Callable[[nn.Module, Tensor, Tensor, int], dict[str, Form]]
    params: frozenset[str] = frozenset({"weight", "bias"})
    kronecker: Callable[[nn.Module, Tensor, Tensor, int, str], KronStats] | None = None
    type_paths: tuple[str, ...] = ()

    def _base(self, module: nn.Module) -> type | None:
        base = next((t for t in self.module_types if isinstance(module, t)), None)
        if base is None and self.type_paths:
            base = next(
                (
                    t
                    for t in type(module).__mro__
                    if f"{t.__module__}.{t.__qualname__}" in self.type_paths
                ),
                None,
            )
        return base

    def serves(self, module: nn.Module) -> bool:
        """Whether this rule serves ``module``: a matching type with its stock ``forward``
        and no trainable parameter the rule does not know."""
        base = self._base(module)
        if base is None or type(module).forward is not base.forward:
            return False
        own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        return own <= self.params


FAST_RULES: tuple[Rule, ...] = (
    Rule("linear", (nn.Linear,), linear_forms, kronecker=linear_kron),  # type: ignore[arg-type]
    Rule("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), conv_forms, kronecker=conv_kron),  # type: ignore[arg-type]
    Rule(
        "conv_transpose",
        (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
        conv_transpose_forms,  # type: ignore[arg-type]
        kronecker=conv_transpose_kron,  # type: ignore[arg-type]
    ),
    Rule(
        "transposed_linear",
        (),
        transposed_linear_forms,
        kronecker=transposed_linear_kron,
        type_paths=HF_CONV1D,
    ),
    Rule("embedding", (nn.Embedding,), embedding_forms, frozenset({"weight"}), embedding_kron),  # type: ignore[arg-type]
    Rule("layer_norm", (nn.LayerNorm,), layer_norm_forms),  # type: ignore[arg-type]
    Rule("rms_norm", (nn.RMSNorm,), rms_norm_forms, frozenset({"weight"})),
    Rule("group_norm", (nn.GroupNorm,), group_norm_forms),  # type: ignore[arg-type]
    Rule("batch_norm", (nn.modules.batchnorm._BatchNorm,), batch_norm_forms),  # type: ignore[arg-type]
)


def find_rule(module: nn.Module) -> Rule | None:
    """The fast rule serving ``module``, or ``None`` (the generic rule)."""
    for rule in FAST_RULES:
        if rule.serves(module):
            return rule
    return None
