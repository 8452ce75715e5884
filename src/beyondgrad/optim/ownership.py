"""Owner-based preconditioner refresh (as in KAISA and Distributed Shampoo).

Replicated data parallelism refreshes every layer's preconditioner (KFAC: the
eigendecompositions of its factors; SINGD and SIRFShampoo: their inverse-free factor
updates) on every rank: the same work ``W`` times. With
:class:`Ownership` each due refresh runs on one *owner* rank only, and the results are
broadcast to the others (one packed broadcast per owner rank); the owners are chosen by a
cost-balanced greedy (largest cost first, to the least-loaded rank; cost of a layer
``~ sum_factors G d^3``), so each rank's refresh time falls towards ``1/W`` of the replicated
one, plus the broadcasts. ``broadcast_dtype=torch.bfloat16`` halves (float32) or quarters
(float64) that traffic; every rank, the owner included, then uses the rounded result, so the
ranks stay identical.

The statistics are still all-reduced (every rank holds the same factors); only the refresh is
owned. With float64 broadcasts the trajectory equals the replicated one bit for bit (the owner
computes what every rank would).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..distributed import group as dist_group
from .products import block_shape

Refresh = Callable[[], tuple[Tensor, ...]]
Store = Callable[[tuple[Tensor, ...]], None]


def assign_owners(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """Cost-balanced greedy owners: layers by decreasing cost (ties by name), each to the
    rank with the least total cost so far (ties: the lowest rank).

    Args:
        costs: layer name -> refresh cost (e.g. ``sum d^3`` over its factors).
        world: the number of ranks.

    Returns:
        Layer name -> owner rank in ``[0, world)``; deterministic, so every rank computes the
        same assignment.
    """
    load = [0.0] * world
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


class Ownership:
    """Run each due refresh on one owner rank and broadcast the result.

    Args:
        process_group: ``None`` (the default group when ``torch.distributed`` is
            initialized), a ``ProcessGroup``, or ``"local"`` (refresh everywhere: replicated).
        broadcast_dtype: the dtype the results travel in (``None``: their own; e.g.
            ``torch.bfloat16`` to cut the traffic; every rank then uses the rounded values).

    Usage (what :class:`~beyondgrad.optim.KFAC`, :class:`~beyondgrad.optim.SINGD` and
    :class:`~beyondgrad.optim.SIRFShampoo` do with ``ownership=...``): during a step,
    :meth:`defer` each due refresh; after all layers are updated, :meth:`flush` runs the
    owned refreshes and broadcasts them (collective: every rank calls it, with the same due
    layers).
    """

    def __init__(self, process_group: Any = None, broadcast_dtype: torch.dtype | None = None):
        self.group = dist_group.resolve_group(process_group)
        self.broadcast_dtype = broadcast_dtype
        self._pending: dict[str, tuple[float, Refresh, list[tuple[tuple[int, ...], Any]], Store]]
        self._pending = {}
        self.owners: dict[str, int] = {}

    @property
    def world(self) -> int:
        """The number of ranks sharing the refreshes (1: every refresh runs here)."""
        return dist_group.world_size(self.group)

    def defer(
        self,
        name: str,
        cost: float,
        refresh: Refresh,
        like: list[tuple[tuple[int, ...], Any]],
        store: Store,
    ) -> None:
        """Register a due refresh of layer ``name``.

        Args:
            name: the layer (the same on every rank).
            cost: its cost, for the owner assignment.
            refresh: computes the result tensors (run on the owner only).
            like: ``(shape, dtype)`` of each result tensor (for the receiving ranks).
            store: receives the result tensors (on every rank).
        """
        self._pending[name] = (float(cost), refresh, like, store)

    def flush(self) -> None:
        """Run the owned refreshes, broadcast every result from its owner, store them all.

        Collective over the group: every rank must call it with the same deferred layers.
        """
        pending, self._pending = self._pending, {}
        if not pending:
            return
        if self.group is None:
            for _, refresh, _, store in pending.values():
                store(self._rounded(refresh()))
            return
        dist_group.check_same(sorted(pending), "the layers due for a refresh", self.group)
        self.owners = assign_owners({n: p[0] for n, p in pending.items()}, self.world)
        me = dist_group.rank(self.group)
        # every owner refreshes all its layers BEFORE the first broadcast: refreshing inside the
        # broadcast loop made rank r wait for ranks < r, so the refreshes ran one after another
        mine, error = self._refresh_owned(pending, me)
        for owner in range(self.world):  # one broadcast per owner: all its layers, packed
            names = [n for n in sorted(pending) if self.owners[n] == owner]
            if not names:
                continue
            own = owner == me
            likes = [pending[n][2] for n in names]
            results = self._broadcast(
                owner, mine if own else None, likes, failed=own and error is not None
            )
            if own and error is not None:
                raise error
            if results is None:
                raise RuntimeError(
                    f"the owned refresh of {', '.join(names)} failed on its owner, rank "
                    f"{owner} of the process group (its error says why); the optimizer "
                    "state of the layers refreshed before it is updated, of the others not"
                )
            for name, result in zip(names, results):
                pending[name][3](result)

    def _refresh_owned(
        self, pending: dict[str, Any], me: int
    ) -> tuple[list[Any] | None, Exception | None]:
        """This rank's refresh results (its layers in sorted order) or the error that stopped
        them (raised at this rank's broadcast turn, so the others do not wait forever)."""
        names = [n for n in sorted(pending) if self.owners[n] == me]
        try:
            return [pending[n][1]() for n in names], None
        except Exception as err:
            return None, err

    def _rounded(self, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if self.broadcast_dtype is None:
            return tensors
        return tuple(t.to(self.broadcast_dtype).to(t.dtype) for t in tensors)

    def _broadcast(
        self,
        owner: int,
        mine: list[tuple[Tensor, ...]] | None,
        likes: list[list[tuple[tuple[int, ...], Any]]],
        failed: bool = False,
    ) -> list[tuple[Tensor, ...]] | None:
        """The owner's results, every tensor flattened into one buffer of the wire dtype
        (the widest of the results' dtypes unless ``broadcast_dtype``), broadcast, split
        again. The buffer's last element flags a refresh that failed on the owner (then
        ``None`` is returned on every rank)."""
        import torch.distributed as dist

        device = dist_group.device_of(self.group)
        flat_like = [like for layer in likes for like in layer]
        wire = self.broadcast_dtype or _widest(dtype for _, dtype in flat_like)
        sizes = [math.prod(shape) for shape, _ in flat_like]
        if mine is not None:
            parts = [t.reshape(-1).to(device=device, dtype=wire) for r in mine for t in r]
            buf = torch.cat([*parts, torch.zeros(1, dtype=wire, device=device)])
        else:
            buf = torch.zeros(sum(sizes) + 1, dtype=wire, device=device)
            if failed:
                buf[-1] = 1
        dist.broadcast(buf, src=dist.get_global_rank(self.group, owner), group=self.group)
        if buf[-1].item() != 0:
            return None
        pieces = iter(torch.split(buf[:-1], sizes))
        out = []
        for layer in likes:
            out.append(tuple(next(pieces).reshape(shape).to(dtype) for shape, dtype in layer))
        return out


def _widest(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype every one of ``dtypes`` converts to exactly (their promotion)."""
    out: torch.dtype | None = None
    for dtype in dtypes:
        out = dtype if out is None else torch.promote_types(out, dtype)
    assert out is not None
    return out


def defer_eigen_refresh(
    ownership: Ownership,
    state: dict[str, Any],
    decompose: Callable[[dict[str, Any], float], tuple[Tensor, ...]],
    damping: float,
    max_block: int | None = None,
) -> None:
    """Defer a KFAC layer's eigendecompositions (``state["eig"]``) to its owner.

    Args:
        ownership: the optimizer's :class:`Ownership`.
        state: the layer's state (factors ``A`` ``[(G,) a, a]``, ``B``, ``order``, ``params``).
        decompose: ``(state, damping) -> (values, vectors, values, vectors)`` of the left and
            right factors of the gradient matrix, ``[G, d]`` and ``[G, d, d]``.
        damping: the layer's damping.
        max_block: KFAC's ``max_block`` (sides wider than it come as diagonal blocks,
            ``[G, n, b]`` and ``[G, n, b, b]``).
    """
    A, B = state["A"], state["B"]
    groups = A.shape[0] if A.ndim == 3 else 1
    work = torch.promote_types(A.dtype, torch.float32)

    def like(d: int) -> list[tuple[tuple[int, ...], Any]]:
        if max_block is not None and d > max_block:
            n, b = block_shape(d, max_block)
            return [((groups, n, b), work), ((groups, n, b, b), work)]
        return [((groups, d), work), ((groups, d, d), work)]

    da, db = A.shape[-1], B.shape[-1]
    shapes = like(da) + like(db) if state["order"] == "A kron B" else like(db) + like(da)

    def store(result: tuple[Tensor, ...]) -> None:
        state["eig"] = tuple(t.to(A.device) for t in result)

    cost = groups * (da**3 + db**3)
    name = ",".join(state["params"])
    ownership.defer(name, cost, lambda: decompose(state, damping), shapes, store)


def _tensors(state: Mapping[str, Any], keys: tuple[str, ...]) -> list[Tensor]:
    """The tensors under ``keys`` of ``state`` (a key may hold a list of tensors)."""
    out: list[Tensor] = []
    for key in keys:
        value = state[key]
        out.extend(value if isinstance(value, (list, tuple)) else [value])
    return out


def defer_state_refresh(
    ownership: Ownership,
    name: str,
    state: dict[str, Any],
    keys: tuple[str, ...],
    update: Callable[[dict[str, Any]], None],
    cost: float,
) -> None:
    """Defer an in-place refresh of a layer's state tensors to the layer's owner (SINGD's
    ``K``, ``C``, ``m_K``, ``m_C``; SIRFShampoo's lists ``K`` and ``m``).

    The owner runs ``update`` on a scratch copy of ``state`` (the tensors under ``keys``
    cloned, everything else shared), so the owner computes exactly what every rank would;
    every rank then copies the broadcast tensors into its own in place (views of stacked
    factors stay valid) and marks the layer ``started`` (warm starts happen once).

    Args:
        ownership: the optimizer's :class:`Ownership`.
        name: the layer (the same on every rank).
        state: the layer's state.
        keys: the state keys ``update`` writes (each a tensor or a list of tensors).
        update: writes the refreshed tensors into the state it is given (in place or by
            replacing them); it may raise (e.g. non-finite values): then every rank raises.
        cost: the refresh's cost for the owner assignment (e.g. ``sum d^3``).
    """
    targets = _tensors(state, keys)

    def refresh() -> tuple[Tensor, ...]:
        scratch = dict(state)
        for key in keys:
            value = state[key]
            is_list = isinstance(value, (list, tuple))
            scratch[key] = [t.clone() for t in value] if is_list else value.clone()
        update(scratch)
        return tuple(_tensors(scratch, keys))

    def store(result: tuple[Tensor, ...]) -> None:
        for target, value in zip(targets, result):
            target.copy_(value)
        if "started" in state:
            state["started"] = True

    like = [(tuple(t.shape), t.dtype) for t in targets]
    ownership.defer(name, cost, refresh, like, store)


def make_ownership(ownership: Any) -> Ownership | None:
    """The :class:`Ownership` of an optimizer's ``ownership=`` knob.

    Args:
        ownership: ``None`` (replicated: every rank refreshes every layer), ``"owner"`` (an
            :class:`Ownership` over the default group, results broadcast in their own dtype),
            or an :class:`Ownership`.

    Returns:
        ``None`` (replicated) or the :class:`Ownership`.

    Raises:
        ValueError: another value.
    """
    if ownership is None or isinstance(ownership, Ownership):
        return ownership
    if ownership == "owner":
        return Ownership()
    raise ValueError(f"ownership must be None, 'owner' or an Ownership, got {ownership!r}")


__all__ = [
    "Ownership",
    "assign_owners",
    "defer_eigen_refresh",
    "defer_state_refresh",
    "make_ownership",
]
