"""Choosing the per-model merge weights ``lambda_i`` on data.

Matena & Raffel (2022) tune the weights of Fisher merging on held-out data; with equal weights a
diagonal Fisher tilts every layer towards the model whose Fisher is larger. The rule here: try
a set of weight vectors, merge with each, and keep the one whose merged model has the smallest
mean loss on ``validation`` (any data of the merged task that is not the test set: the union
of the models' training sets is the natural choice when no held-out split exists).

The default candidates for ``k`` models are the equal weights and, for every model ``i`` and
share ``s`` in :data:`SHARES`, ``lambda_i = s`` with the rest split equally (for two models:
``(s, 1 - s)``, ``s = 0.1, ..., 0.9``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from ..distributed import group as dist_group
from .curvature import as_batches, mean_loss
from .merge import merge_weights

#: the shares of one model in the default candidates
SHARES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def weight_candidates(count: int, shares: Sequence[float] = SHARES) -> list[tuple[float, ...]]:
    """The default candidate weight vectors (normalized by
    :func:`~beyondgrad.merging.merge_weights`, without duplicates, the equal weights first).

    Args:
        count: the number of models, at least 2.
        shares: the shares in ``(0, 1)`` one model gets while the others split the rest.

    Returns:
        Weight vectors of length ``count``.

    Raises:
        ValueError: fewer than two models, or a share outside ``(0, 1)``.
    """
    if count < 2:
        raise ValueError(f"need at least two models to weigh, got {count}")
    if any(not 0 < s < 1 for s in shares):
        raise ValueError(f"shares must lie in (0, 1), got {list(shares)}")
    raw = [[1.0] * count] + [
        [s if j == i else (1 - s) / (count - 1) for j in range(count)]
        for i in range(count)
        for s in shares
    ]
    return _distinct(tuple(merge_weights(w, count)) for w in raw)


def _distinct(vectors: Iterable[tuple[float, ...]], tol: float = 1e-9) -> list[tuple[float, ...]]:
    """The vectors in order, each dropped that is within ``tol`` of an earlier one."""
    out: list[tuple[float, ...]] = []
    for v in vectors:
        if all(max(abs(a - b) for a, b in zip(v, u)) > tol for u in out):
            out.append(v)
    return out


def select_weights(
    merge: Callable[[list[float]], nn.Module],
    loss_fn: nn.Module,
    validation: Any,
    count: int,
    candidates: Sequence[Sequence[float]] | None = None,
) -> tuple[list[float], dict[tuple[float, ...], float]]:
    """The merge weights whose merged model has the smallest mean loss on ``validation``.

    Args:
        merge: ``weights -> merged model`` (e.g. ``lambda w: bg.merging.fisher_merge(models,
            loss_fn, data, structure="diagonal", weights=w)``; to compute the Fishers once,
            merge with :func:`~beyondgrad.merging.fisher_average` from precomputed
            :func:`~beyondgrad.merging.diagonal_fisher` values). Called once per distinct
            candidate, with the normalized weights.
        loss_fn: the loss the merged models are scored with (:func:`mean_loss`: mean over
            examples, in evaluation mode).
        validation: ``(X, y)`` tensors or an iterable of ``(X, y)`` batches, read once (a
            generator works; a shuffling loader scores every candidate on the same batches);
            never the test set.
        count: the number of models.
        candidates: weight vectors to try (non-negative, normalized here; default
            :func:`weight_candidates`).

    Returns:
        ``(weights, {candidate: mean loss})``: the chosen normalized weights (the first
        candidate with the least finite loss: the equal weights on a tie among the default
        candidates) and each candidate's loss, keyed by the candidate as given (a tuple of
        floats; candidates equal after normalization share one merge and one loss).

    Raises:
        ValueError: no candidates, a candidate that is not ``count`` finite non-negative
            weights, or no candidate with a finite loss.
    """
    dist_group.refuse_rank_local("bg.merging.select_weights")  # no reduction over ranks
    given = weight_candidates(count) if candidates is None else candidates
    tried = [tuple(float(x) for x in c) for c in given]
    if len(tried) == 0:
        raise ValueError("need at least one candidate weight vector")
    normalized = {c: tuple(merge_weights(c, count)) for c in tried}  # checks every candidate
    batches = as_batches(validation)
    losses: dict[tuple[float, ...], float] = {}
    seen: dict[tuple[float, ...], float] = {}
    for c in tried:
        w = normalized[c]
        if w not in seen:
            seen[w] = mean_loss(merge(list(w)), loss_fn, batches)
        losses.setdefault(c, seen[w])
    finite = [c for c in losses if math.isfinite(losses[c])]
    if not finite:
        raise ValueError(f"no candidate gave a finite loss: {losses}")
    best = min(finite, key=losses.__getitem__)  # the first minimum: candidates' order
    return list(normalized[best]), losses
