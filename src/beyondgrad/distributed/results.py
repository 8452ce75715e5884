"""Sum :func:`beyondgrad.compute` results over the ranks of a process group.

Each rank computes ``bg.compute`` on its shard ``D_r`` (``N_r`` samples) of one batch
``D = D_1 + ... + D_W``. The loss of ``D`` is ``L = R sum_{n in D} l_n`` with ``R = 1/N`` for
a mean (``1/(N S)`` with ``S`` further averaged entries per sample) and 1 for a sum; rank
``r``'s loss has ``R_r``. A quantity linear in the loss (gradient, diagonals of the GGN,
Hessian, Fisher, KFAC's ``B``) of ``D`` is then ``sum_r (R / R_r) q_r``; the sum of squared
loss-gradient rows (``SumGradSquared``) carries ``R^2`` and is ``sum_r (R / R_r)^2 q_r``;
KFAC's ``A`` (a mean over the layer's input rows) is ``sum_r (N_r / N) A_r``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine import Result
from ..factors import DiagonalFactors, KroneckerFactors
from ..quantities import KFAC, DiagGGN, DiagHessian, Grad, SumGradSquared
from .group import all_reduce_tensors_, check_same, resolve_group, sum_count, world_size

#: quantity type -> the power of R its values carry
_POWERS: dict[type, int] = {Grad: 1, DiagGGN: 1, DiagHessian: 1, SumGradSquared: 2}


@dataclass(frozen=True)
class _Shares:
    """This rank's weights: ``w = R / R_r``, ``a = N_r / N``; ``N``, ``R``, the world size."""

    w: float
    a: float
    n: int
    R: float
    world: int


def _weights(res: Result, group: Any) -> _Shares:
    """This rank's :class:`_Shares`."""
    stats = res.stats
    if stats is None:
        raise ValueError(
            "all_reduce_result needs a result of bg.compute (with its statistics), got one "
            "without (e.g. HesScale)"
        )
    check_same(
        (stats.reduction, [repr(q) for q in res.quantities()], _signature(res)),
        "the computed quantities (types, settings, names, shapes) and the loss reduction",
        group,
    )
    n_local = stats.num_samples
    n_total = sum_count(n_local, group)
    world = world_size(group)
    if stats.reduction == "sum":
        return _Shares(1.0, n_local / n_total, n_total, 1.0, world)
    # 1/R counts the averaged entries: 1/R = sum_r 1/R_r
    inv = torch.tensor(1.0 / stats.reduction_factor, dtype=torch.float64, device=res.loss.device)
    inv_total = inv.clone()
    all_reduce_tensors_([inv_total], group)
    R = 1.0 / float(inv_total)
    return _Shares(R * float(inv), n_local / n_total, n_total, R, world)


def _signature(res: Result) -> list[Any]:
    out = []
    for q in res.quantities():
        for name, value in res[q].items():
            out.append((name, [tuple(t.shape) for t in _leaves(value)]))
    return out


def _leaves(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, KroneckerFactors):
        return [value.A, value.B]
    if isinstance(value, DiagonalFactors):
        return [value.diagonal[n] for n in value.diagonal]
    raise TypeError(f"all_reduce_result cannot reduce a {type(value).__name__}")


def _reducer(q: Any) -> Callable[[Any, _Shares], Any]:
    """The function mapping one value of ``q`` to this rank's weighted share."""
    if isinstance(q, KFAC):
        return _kfac_share
    power = next((p for t, p in _POWERS.items() if type(q) is t), None)
    if power is None:
        raise NotImplementedError(
            f"all_reduce_result: {type(q).__name__} cannot be summed over ranks (per-sample "
            "quantities stay with the rank that holds the samples; Variance and the low-rank "
            "GGN are not sums over samples): compute it on its own, or gather it yourself"
        )
    return lambda v, s: v * (s.w**power)


def _kfac_share(value: Any, s: _Shares) -> Any:
    if isinstance(value, DiagonalFactors):
        diag = {k: v * s.w for k, v in value.diagonal.items()}
        return DiagonalFactors(diag, value.fisher_type, s.R, s.n)
    if value.bias_block is not None:
        raise NotImplementedError("all_reduce_result: KFAC blocks with bias='separate'")
    # forward-only: B is the identity on every rank; the sum over the ranks keeps it
    B = value.B / s.world if value.fisher_type == "forward-only" else value.B * s.w
    return KroneckerFactors(
        value.A * s.a, B, value.order, value.params, value.bias, value.fisher_type,
        value.kfac_approx, s.R, s.n, None, value.weight_perm,
    )  # fmt: skip


def all_reduce_result(res: Result, process_group: Any = None) -> Result:
    """The result of one batch spread over the ranks, from every rank's result on its shard.

    Every rank calls it (collective) with the result of the same ``bg.compute`` call on its
    shard; every rank gets the result of the whole batch (``loss`` and each quantity),
    weighted by the sample counts and the loss reduction (see the module docstring), equal to
    one process over the whole batch to round-off. Supported: ``Grad``, ``SumGradSquared``,
    ``DiagGGN`` (exact and MC; MC draws differ from one process's), ``DiagHessian``,
    ``KFAC`` (``A`` averaged over the samples, ``B`` and diagonal blocks with the loss's
    scale; ``R`` and ``num_data`` of the whole batch). ``output`` stays the rank's own.

    Args:
        res: this rank's :class:`~beyondgrad.Result`.
        process_group: ``None`` (the default group when ``torch.distributed`` is initialized
            with several ranks), a ``ProcessGroup``, or ``"local"`` (returns ``res``).

    Returns:
        A new :class:`~beyondgrad.Result` (``stats`` is ``None``: the statistics are the
        rank's own), or ``res`` itself without a group.

    Raises:
        NotImplementedError: a quantity that is no sum over samples (per-sample quantities
            such as ``BatchGrad``, ``Variance``, ``SqrtGGN``, ``GGNEigen``, ``GGNSpectrum``).
        RuntimeError: ranks computed different quantities, names or shapes, or with
            different reductions.
    """
    group = resolve_group(process_group)
    if group is None:
        return res
    reducers = {q: _reducer(q) for q in res.quantities()}
    shares = _weights(res, group)
    values: dict[Any, dict[str, Any]] = {
        q: {k: f(v, shares) for k, v in res[q].items()} for q, f in reducers.items()
    }
    loss = res.loss * shares.w
    tensors = [loss] + [t for q in values for v in values[q].values() for t in _leaves(v)]
    all_reduce_tensors_(tensors, group)
    return Result(loss, res.output, values, res.rules, None, None)


__all__ = ["all_reduce_result"]
