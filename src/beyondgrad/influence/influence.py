"""Influence functions ``g_q^T (C + damping I)^{-1} g_i`` on the library's curvature.

Conventions:

* ``g_i`` is the gradient of training example ``i``'s own loss ``l_i``, where ``loss_fn`` with
  ``reduction="sum"`` is ``sum_i l_i`` (for cross-entropy with class indices this is the
  example's loss whatever ``loss_fn``'s reduction; for MSE it is the example's summed squared
  error; a sequence model's example sums over its tokens). ``g_q`` likewise for a query.
* ``C`` is the curvature of the *mean* training loss ``(1/N) sum_i l_i`` over the ``N``
  training examples: the GGN (``fisher_type="type-2"``; for losses that average over samples
  only, e.g. cross-entropy with class indices, exactly the matrix of
  ``bg.linops.GGN(model, loss_fn, train)``), or the MC / empirical Fisher, in a structure:
  ``"full"`` (dense, small models), ``"ekfac"``, ``"kfac"`` (Kronecker blocks ``B kron A`` per
  layer as in :mod:`beyondgrad.factors`, diagonal blocks for layers without Kronecker
  structure such as LayerNorm), ``"diag"``, or ``"identity"`` (no preconditioning: ``g_q^T
  g_i``; ``damping`` is ignored).
* Every trainable parameter is covered (or the subset ``params``): per-example gradients come
  from ``bg.compute(..., bg.BatchGrad())``, whose generic rule serves any module (attention,
  LayerNorm, embeddings).

Memory: factors are fitted once (:func:`fit_factors`, reusable, :meth:`InfluenceFactors.save`);
query gradients are preconditioned once (``[P, n_query]``); the training data is streamed batch
by batch (a batch is a chunk: only its per-example gradients are held) and scored parameter by
parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import group as dist_group
from ..engine import SamplesCoupledError, check_samples_independent, compute
from ..laplace.curvature import Curvature, curvature_from_state
from ..laplace.laplace import leading_size, sample_rows
from ..laplace.linops_adapter import build_curvature, sum_reduction
from ..quantities import BatchGrad

CURVATURES = ("full", "ekfac", "kfac", "diag", "identity")

#: the most per-example gradient entries held at once (``[chunk, P]``; 4 MiB in float32)
GRAD_BUDGET = 1 << 20

#: the most entries of one column block ``[P, chunk]`` solved at once in
#: :meth:`InfluenceFactors.precondition` (a Kronecker solve holds several such temporaries)
SOLVE_BUDGET = 1 << 18


def progress_bar(iterable: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` and tqdm is installed (else as is).

    Args:
        iterable: what to iterate over.
        enabled: whether to show a bar.
        desc: the bar's label.

    Returns:
        An iterable over the same items.
    """
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


def _names(model: nn.Module, params: Sequence[str] | None) -> list[str]:
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise ValueError(f"unknown or frozen parameters: {unknown}")
    return [n for n in named if n in set(params)]


@dataclass
class InfluenceFactors:
    """Fitted curvature for influence scores. ``structure``: the curvature of the *summed*
    training loss in its closed-form structure (``None`` for ``"identity"``); ``C`` is it
    divided by ``num_data``. ``names``: the covered parameters (flat order)."""

    curvature: str
    names: list[str]
    num_data: int
    structure: Curvature | None

    def default_damping(self) -> float:
        """``0.1`` times the mean eigenvalue of ``C`` (``trace(C) / P``)."""
        if self.structure is None:
            return 0.0
        trace = float(self.structure.trace()) / self.num_data
        return 0.1 * trace / self.structure.num_params

    def precondition(self, M: Tensor, damping: float, chunk: int | None = None) -> Tensor:
        """``(C + damping I)^{-1} M`` for ``M`` ``[P, k]`` (``M`` itself for ``"identity"``),
        ``chunk`` columns at a time (default ``max(1, SOLVE_BUDGET // P)``): the structure's
        temporaries (rotations, layouts) stay at a few ``[P, chunk]`` blocks.

        Args:
            M: ``[P, k]``.
            damping: ``lambda >= 0``.
            chunk: columns per solve.

        Returns:
            ``[P, k]``.
        """
        if self.structure is None:
            return M
        scale = M.new_tensor(1.0 / self.num_data)
        prior = M.new_full((self.structure.num_params,), float(damping))
        step = chunk or max(1, SOLVE_BUDGET // max(1, M.shape[0]))
        if step >= M.shape[1]:
            return self.structure.solve(scale, prior, M)
        out = torch.empty_like(M)
        for start in range(0, M.shape[1], step):
            out[:, start : start + step] = self.structure.solve(
                scale, prior, M[:, start : start + step]
            )
        return out

    def save(self, path: str) -> None:
        """Write the factors to ``path`` (``torch.save`` of plain tensors and metadata)."""
        torch.save(
            {
                "curvature": self.curvature,
                "names": self.names,
                "num_data": self.num_data,
                "structure": None if self.structure is None else self.structure.state_dict(),
            },
            path,
        )

    @classmethod
    def load(cls, path: str, map_location: Any = None) -> InfluenceFactors:
        """Read factors written by :meth:`save`.

        Args:
            path: the file :meth:`save` wrote.
            map_location: passed to ``torch.load`` (e.g. ``"cpu"``); loading uses
                ``weights_only=True``.

        Returns:
            The :class:`InfluenceFactors`.
        """
        state = torch.load(path, map_location=map_location, weights_only=True)
        structure = state["structure"]
        return cls(
            state["curvature"],
            list(state["names"]),
            int(state["num_data"]),
            None if structure is None else curvature_from_state(structure),
        )


def fit_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    train: Iterable[tuple[Any, Tensor]],
    curvature: str = "ekfac",
    params: Sequence[str] | None = None,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    process_group: Any = None,
    grad_budget: int | None = GRAD_BUDGET,
) -> InfluenceFactors:
    """Fit the curvature ``C`` of the mean training loss once (see the module docstring).

    Args:
        model, loss_fn: the trained model and its loss (MSE, CE, BCE with logits).
        train: iterable of ``(X, y)`` batches.
        curvature: ``"full"``, ``"ekfac"``, ``"kfac"``, ``"diag"`` or ``"identity"``.
        params: parameter names (default: all trainable ones).
        fisher_type: ``"type-2"`` (GGN), ``"mc"`` or ``"empirical"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` (Kronecker structures).
        mc_samples, generator: for ``fisher_type="mc"``.
        process_group: ``None`` (under an initialized ``torch.distributed`` with several
            ranks, ``train`` is this rank's shard: curvature and count are summed over the
            ranks; see :mod:`beyondgrad.distributed`), a ``ProcessGroup``, or ``"local"``.
        grad_budget: EK-FAC's passes run on chunks of at most ``grad_budget // P`` examples
            (see :func:`chunks`; ``None``: the batches as given).

    Returns:
        :class:`InfluenceFactors`.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    names = _names(model, params)
    batches = list(train)
    # EK-FAC's correction pass holds per-example gradients: chunks of the same budget as the
    # scores (the sums over examples do not change); the other structures hold none
    budget = grad_budget if curvature == "ekfac" else None
    fit_batches = list(chunks(model, batches, names, budget))
    # under torch.distributed each rank passes its shard: counts summed over the ranks
    num_data = dist_group.sum_count(
        sum(y.shape[0] for _, y in batches), dist_group.resolve_group(process_group)
    )
    if curvature == "identity":
        return InfluenceFactors(curvature, names, num_data, None)
    structure = build_curvature(
        model,
        sum_reduction(loss_fn),
        fit_batches,
        names,
        curvature,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        mc_samples=mc_samples,
        generator=generator,
        process_group=process_group,
    )
    return InfluenceFactors(curvature, names, num_data, structure)


def example_gradients(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Any, Tensor]],
    names: Sequence[str],
    progress: bool = False,
    desc: str = "gradients",
    budget: int | None = GRAD_BUDGET,
) -> Iterator[dict[str, Tensor]]:
    """Per chunk of ``data``: the examples' own loss gradients, per parameter
    ``[chunk, *shape]`` (``bg.BatchGrad`` of the summed loss). A batch is split into chunks
    of at most ``budget // P`` examples (``P`` entries in ``names``; at least one example),
    so that one chunk's gradients hold at most ``budget`` entries, and the engine's state
    (activations, backpropagated vectors) shrinks with it; a model that couples its samples
    (e.g. BatchNorm in training mode) keeps its batches whole.

    Args:
        model: the model.
        loss_fn: the loss; a copy with ``reduction="sum"`` is used, so each row is the
            gradient of that example's own loss ``l_i`` (no ``1/N``).
        data: an iterable of ``(X, y)`` batches.
        names: the parameter names to return.
        progress: a tqdm bar over the batches (when tqdm is installed).
        desc: the bar's label.
        budget: the most gradient entries per chunk (``None``: whole batches).

    Yields:
        ``{name: [chunk, *shape]}`` per chunk, detached, in the order of ``data``.
    """
    loss_sum = sum_reduction(loss_fn)
    q = BatchGrad()
    for X, y in chunks(model, progress_bar(data, progress, desc), names, budget):
        result = compute(model, loss_sum, X, y, q)
        grads = {n: result[q][n].detach() for n in names}
        del result  # the engine's per-chunk state goes with it (no reference cycles)
        yield grads
        del grads


def chunks(
    model: nn.Module,
    data: Iterable[tuple[Any, Tensor]],
    names: Sequence[str],
    budget: int | None = GRAD_BUDGET,
) -> Iterator[tuple[Any, Tensor]]:
    """The batches of ``data`` split into chunks of at most ``max(1, budget // P)`` examples
    (``P`` entries in ``names``), in order; whole batches for ``budget=None`` or a model that
    couples its samples (e.g. BatchNorm in training mode).

    Args:
        model: the model.
        data: an iterable of ``(X, y)`` batches (``X`` a tensor, tuple or dict).
        names: the parameters whose per-example gradients a chunk holds.
        budget: the most gradient entries per chunk.

    Yields:
        ``(X, y)`` chunks.
    """
    named = dict(model.named_parameters())
    per_example = sum(named[n].numel() for n in names)
    step = None if budget is None else max(1, budget // max(1, per_example))
    if step is not None and not _independent(model):
        step = None
    for X, y in data:
        N = leading_size(X)
        if step is None or step >= N:
            yield X, y
            continue
        for start in range(0, N, step):
            stop = min(N, start + step)
            yield sample_rows(X, start, stop), y[start:stop]


def _independent(model: nn.Module) -> bool:
    try:
        check_samples_independent(model)
    except SamplesCoupledError:
        return False
    return True


def _flat(grads: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """``[P, k]`` from per-parameter ``[k, *shape]``."""
    return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], 1).T


def _resolve(
    model: nn.Module,
    loss_fn: nn.Module,
    train: Iterable[tuple[Any, Tensor]],
    factors: InfluenceFactors | None,
    fit_kwargs: dict[str, Any],
    damping: float | None,
) -> tuple[InfluenceFactors, float]:
    if factors is None:
        fit_kwargs["curvature"] = fit_kwargs["curvature"] or "ekfac"
        factors = fit_factors(model, loss_fn, train, **fit_kwargs)
    elif fit_kwargs.get("curvature") not in (None, factors.curvature):
        raise ValueError(
            f"factors were fitted for curvature={factors.curvature!r}, "
            f"not {fit_kwargs['curvature']!r}"
        )
    if damping is None:
        damping = factors.default_damping()
    if factors.structure is not None and damping < 0:
        raise ValueError("damping must be >= 0")
    return factors, float(damping)


def scores(
    model: nn.Module,
    loss_fn: nn.Module,
    train: Iterable[tuple[Any, Tensor]],
    query: Iterable[tuple[Any, Tensor]],
    curvature: str | None = None,
    damping: float | None = None,
    factors: InfluenceFactors | None = None,
    params: Sequence[str] | None = None,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    progress: bool = False,
    generator: torch.Generator | None = None,
    query_rank: int | None = None,
    grad_budget: int | None = GRAD_BUDGET,
) -> Tensor:
    """Influence of every training example on every query, ``[n_query, n_train]``:
    ``g_q^T (C + damping I)^{-1} g_i`` (module docstring).

    Args:
        model: the trained model.
        loss_fn: its loss.
        train: an iterable of ``(X, y)`` batches (a training batch is the chunk whose
            per-example gradients are held at once; the order defines the columns).
        query: an iterable of ``(X, y)`` batches (the order defines the rows).
        curvature: ``"full"``, ``"ekfac"``, ``"kfac"``, ``"diag"``, ``"identity"``; default
            ``"ekfac"``, or that of ``factors``.
        damping: ``lambda``; default ``0.1 * trace(C) / P``.
        factors: fitted :class:`InfluenceFactors` to reuse (then ``train`` is only scored).
        params: parameter names (default: all trainable ones).
        fisher_type: passed to :func:`fit_factors`.
        kfac_approx: passed to :func:`fit_factors`.
        generator: passed to :func:`fit_factors`.
        progress: tqdm bars over the data loops (when tqdm is installed).
        query_rank: per parameter, the preconditioned query gradients ``[size, n_query]`` as
            their best rank-``query_rank`` factorization (truncated SVD; ``None``: exact).
        grad_budget: the most per-example gradient entries held at once (batches are split
            into chunks of ``grad_budget // P`` examples; ``None``: whole batches).

    Returns:
        ``[n_query, n_train]`` scores.
    """
    fit_kwargs = dict(curvature=curvature, params=params, fisher_type=fisher_type)
    fit_kwargs.update(kfac_approx=kfac_approx, generator=generator)
    if query_rank is not None and query_rank < 1:
        raise ValueError(f"query_rank must be None or positive, got {query_rank}")
    factors, damping = _resolve(model, loss_fn, train, factors, fit_kwargs, damping)
    names = factors.names
    parts = _preconditioned_queries(
        model, loss_fn, query, factors, damping, query_rank, progress, grad_budget
    )
    columns = []  # a chunk's gradients are held no longer than the chunk
    for grads in example_gradients(model, loss_fn, train, names, progress, "train", grad_budget):
        k = grads[names[0]].shape[0]
        block = sum(
            _project(grads[n].reshape(k, -1), left, right) for n, (left, right) in zip(names, parts)
        )  # [k, n_query]
        columns.append(block.T)  # type: ignore[union-attr]
        del grads
    return torch.cat(columns, 1)


def _preconditioned_queries(
    model: nn.Module,
    loss_fn: nn.Module,
    query: Iterable[tuple[Any, Tensor]],
    factors: InfluenceFactors,
    damping: float,
    rank: int | None,
    progress: bool,
    budget: int | None = GRAD_BUDGET,
) -> list[tuple[Tensor, Tensor | None]]:
    """Per parameter, ``(C + damping I)^{-1} G_q`` restricted to it (``[size, n_query]``) as a
    product ``left @ right`` (see :func:`_compress`). The query gradients are preconditioned
    chunk by chunk (:func:`example_gradients`) into one ``[P, n_query]`` block: no second
    copy of all query gradients is held."""
    names = factors.names
    query = list(query)
    n_query = sum(leading_size(X) for X, _ in query)
    named = dict(model.named_parameters())
    sizes = [named[n].numel() for n in names]
    first = named[names[0]]
    pre = torch.empty(sum(sizes), n_query, dtype=first.dtype, device=first.device)
    start = 0
    for grads in example_gradients(model, loss_fn, query, names, progress, "query", budget):
        G = _flat(grads, names)  # [P, chunk]
        del grads
        pre[:, start : start + G.shape[1]] = factors.precondition(G, damping)
        start += G.shape[1]
        del G
    return [_compress(b, rank) for b in torch.split(pre, sizes, 0)]


def _project(G: Tensor, left: Tensor, right: Tensor | None) -> Tensor:
    return G @ left if right is None else (G @ left) @ right


def _compress(block: Tensor, rank: int | None) -> tuple[Tensor, Tensor | None]:
    """``block [size, n_query]`` as ``left @ right``: itself (``right=None``), or its best
    rank-``rank`` factorization (truncated SVD, ``left = U S``, ``right = V^T``)."""
    if rank is None or rank >= min(block.shape):
        return block, None
    U, S, Vh = torch.linalg.svd(block, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


def self_influence(
    model: nn.Module,
    loss_fn: nn.Module,
    train: Iterable[tuple[Any, Tensor]],
    curvature: str | None = None,
    damping: float | None = None,
    factors: InfluenceFactors | None = None,
    params: Sequence[str] | None = None,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    progress: bool = False,
    generator: torch.Generator | None = None,
    grad_budget: int | None = GRAD_BUDGET,
) -> Tensor:
    """``g_i^T (C + damping I)^{-1} g_i`` for every training example, ``[n_train]``
    (arguments as in :func:`scores`).

    Args:
        model: the trained model.
        loss_fn: its loss.
        train: an iterable of ``(X, y)`` batches (the order defines the entries).
        curvature: ``"full"``, ``"ekfac"``, ``"kfac"``, ``"diag"``, ``"identity"``; default
            ``"ekfac"``, or that of ``factors``.
        damping: ``lambda``; default ``0.1 * trace(C) / P``.
        factors: fitted :class:`InfluenceFactors` to reuse.
        params: parameter names (default: all trainable ones).
        fisher_type: passed to :func:`fit_factors`.
        kfac_approx: passed to :func:`fit_factors`.
        progress: tqdm bars over the data loops (when tqdm is installed).
        generator: passed to :func:`fit_factors`.
        grad_budget: the most per-example gradient entries held at once (as in
            :func:`scores`).

    Returns:
        ``[n_train]`` self-influence scores.
    """
    fit_kwargs = dict(
        curvature=curvature,
        params=params,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        generator=generator,
    )
    factors, damping = _resolve(model, loss_fn, train, factors, fit_kwargs, damping)
    out = []
    names = factors.names
    for grads in example_gradients(model, loss_fn, train, names, progress, "train", grad_budget):
        G = _flat(grads, factors.names)  # [P, k]
        out.append((G * factors.precondition(G, damping)).sum(0))
        del grads, G  # held no longer than their batch
    return torch.cat(out)


def top_k(influence: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """The ``k`` most (``largest=False``: least) influential training examples per query:
    ``(values [n_query, k], indices [n_query, k])`` of a ``[n_query, n_train]`` score matrix.

    Args:
        influence: ``[n_query, n_train]`` scores (e.g. from :func:`scores`).
        k: how many examples per query, ``1 <= k <= n_train``.
        largest: the highest scores (``True``) or the lowest.

    Returns:
        ``(values, indices)``, each ``[n_query, k]``, sorted along the last axis.
    """
    if not 1 <= k <= influence.shape[-1]:
        raise ValueError(f"k must be in [1, {influence.shape[-1]}], got {k}")
    result = torch.topk(influence, k, dim=-1, largest=largest)
    return result.values, result.indices


__all__ = [
    "CURVATURES",
    "GRAD_BUDGET",
    "InfluenceFactors",
    "chunks",
    "example_gradients",
    "fit_factors",
    "progress_bar",
    "scores",
    "self_influence",
    "top_k",
]
