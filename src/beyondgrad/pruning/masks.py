"""Masks, sparsity targets and the result of a pruning method.

A mask is a boolean tensor of its parameter's shape, ``True`` where the weight is kept. Masks
plug into ``torch.nn.utils.prune`` (:func:`apply_masks` calls ``prune.custom_from_mask``).

Sparsity: the fraction of the *covered* weights (by default every weight with two or more
dimensions: Linear and convolution weights, not biases or normalization parameters) that is set
to zero. ``scope="global"``: one ranking of the scores over all covered weights, exactly
``round(sparsity * total)`` pruned; ``scope="layer"``: each covered tensor loses exactly
``round(sparsity * numel)`` of its own entries.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

SCOPES = ("global", "layer")


@dataclass
class PruningResult:
    """What a pruning method returns.

    Attributes:
        model: a deep copy of the input model whose pruned weights are zero (plain
            parameters; the remaining weights carry the method's compensating update, if any).
        masks: ``{parameter name: bool mask}`` of the covered parameters, ``True`` = kept.
        method: the method's name.
    """

    model: nn.Module
    masks: dict[str, Tensor]
    method: str

    @property
    def sparsity(self) -> float:
        """The fraction of the covered weights that were pruned."""
        return mask_sparsity(self.masks)

    def apply(self) -> nn.Module:
        """Reparametrize :attr:`model` with ``torch.nn.utils.prune.custom_from_mask`` (the
        masks then also hold during further training; ``prune.remove`` makes it permanent).

        Returns:
            :attr:`model`, reparametrized in place.
        """
        return apply_masks(self.model, self.masks)


def mask_sparsity(masks: Mapping[str, Tensor]) -> float:
    """The fraction of ``False`` entries over all masks.

    Args:
        masks: ``{name: bool mask}``.

    Returns:
        ``pruned / total`` (0 for no entries).
    """
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 0.0 if total == 0 else 1.0 - kept / total


def check_sparsity(sparsity: float, scope: str = "global") -> float:
    """Validate a sparsity target and a scope.

    Args:
        sparsity: the fraction to prune, in ``[0, 1]``.
        scope: ``"global"`` or ``"layer"``.

    Returns:
        ``sparsity`` as a float.

    Raises:
        ValueError: ``sparsity`` outside ``[0, 1]`` or not finite, or an unknown scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    s = float(sparsity)
    if not math.isfinite(s) or not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity!r}")
    return s


def prunable_parameters(model: nn.Module, params: Sequence[str] | None = None) -> list[str]:
    """The parameters a method covers.

    Args:
        model: the model.
        params: parameter names, or ``None`` for every trainable parameter with two or more
            dimensions (Linear, convolution and embedding weights).

    Returns:
        The names, in ``model.named_parameters()`` order.

    Raises:
        ValueError: an unknown or frozen name, or nothing to prune.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is None:
        out = [n for n, p in named.items() if p.ndim >= 2]
    else:
        unknown = sorted(set(params) - set(named))
        if unknown:
            raise ValueError(f"unknown or frozen parameters: {unknown}")
        out = [n for n in named if n in set(params)]
    if not out:
        raise ValueError("no parameter to prune")
    return out


def _lowest(flat: Tensor, k: int) -> Tensor:
    """A bool vector marking the ``k`` lowest entries (ties: the earlier entry)."""
    if torch.isnan(flat).any():
        raise ValueError("pruning scores contain NaN")
    pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    pruned[torch.sort(flat, stable=True).indices[:k]] = True
    return pruned


def masks_from_scores(
    scores: Mapping[str, Tensor], sparsity: float, scope: str = "global"
) -> dict[str, Tensor]:
    """Keep-masks that prune the lowest scores to the target sparsity.

    Args:
        scores: ``{parameter name: score}`` (parameter-shaped; lower = pruned first).
        sparsity: the fraction to prune, in ``[0, 1]``.
        scope: ``"global"`` (one ranking) or ``"layer"`` (per tensor).

    Returns:
        ``{name: bool mask}``, ``True`` = kept, with exactly ``round(sparsity * count)``
        pruned (over all tensors, or per tensor).
    """
    s = check_sparsity(sparsity, scope)
    if scope == "layer":
        return {
            n: ~_lowest(v.reshape(-1), round(s * v.numel())).reshape(v.shape)
            for n, v in scores.items()
        }
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in scores.values()])
    keep, start, out = ~_lowest(flat, round(s * flat.numel())), 0, {}
    for n, v in scores.items():
        out[n] = keep[start : start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """``torch.nn.utils.prune.custom_from_mask`` for every mask.

    Args:
        model: the model (modified in place).
        masks: ``{parameter name: mask}`` (``True``/1 = kept).

    Returns:
        ``model``.
    """
    for name, mask in masks.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        prune.custom_from_mask(module, attr, mask.to(getattr(module, attr).device))
    return model


def masked_copy(
    model: nn.Module, masks: Mapping[str, Tensor], values: Mapping[str, Tensor] | None = None
) -> nn.Module:
    """A deep copy of ``model`` with ``values`` written into its parameters (if given) and
    the masked entries set to zero.

    Args:
        model: the model.
        masks: ``{parameter name: bool mask}``.
        values: ``{parameter name: new value}`` (parameter-shaped), e.g. compensated weights.

    Returns:
        The copy.
    """
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in (values or {}).items():
            params[name].copy_(value)
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))
    return out
