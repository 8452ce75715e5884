"""Process-group plumbing: the library on ``torch.distributed`` process groups.

One convention everywhere: a ``process_group`` argument is

* ``None`` (default): the default group when ``torch.distributed`` is initialized with more
  than one rank, else no reduction (one process);
* a ``torch.distributed.ProcessGroup``: reduce over that group;
* ``"local"``: no reduction even under an initialized group (each rank holds the whole data
  set and computes alone).

With a group, **every rank's data is its shard of one data set**: operators, factors and
counts are summed over the ranks (sample counts all-reduced, so uneven shards are exact), and
every rank gets the same result, equal (to round-off) to one process over the whole data set.
What cannot be reduced exactly raises (a ``DistributedSampler`` that pads the shards with
duplicates, mismatched parameter shapes, different vectors on different ranks) instead of
returning a rank-local answer.

Helpers here are collective: every rank of the group must call them, in the same order.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

LOCAL = "local"
Group = Any  # a torch.distributed.ProcessGroup
_RANK_LOCAL: ContextVar[bool] = ContextVar("beyondgrad_rank_local", default=False)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any = None) -> Group | None:
    """The group to reduce over, or ``None`` for no reduction.

    Args:
        process_group: ``None`` (the default group when ``torch.distributed`` is initialized
            with more than one rank), a ``ProcessGroup``, or ``"local"`` (never reduce).

    Returns:
        The group (``dist.group.WORLD`` for the default one), or ``None`` when there is
        nothing to reduce (one rank, not initialized, or ``"local"``).

    Raises:
        ValueError: an unknown string.
        RuntimeError: a ``ProcessGroup`` passed while ``torch.distributed`` is not initialized.
    """
    if isinstance(process_group, str):
        if process_group != LOCAL:
            raise ValueError(
                f"process_group must be a ProcessGroup, None or 'local', got {process_group!r}"
            )
        return None
    if not _initialized():
        if process_group is not None:
            raise RuntimeError("process_group given, but torch.distributed is not initialized")
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def world_size(group: Group | None) -> int:
    """Ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def rank(group: Group | None) -> int:
    """This process's rank in ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


def all_reduce_sum_(tensor: Tensor, group: Group | None) -> Tensor:
    """Sum ``tensor`` over the ranks in place (no-op without a group); returns it."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def sum_count(count: int, group: Group | None) -> int:
    """``count`` summed over the ranks (exact below 2**53)."""
    if group is None:
        return int(count)
    t = torch.tensor(float(count), dtype=torch.float64, device=device_of(group))
    all_reduce_sum_(t, group)
    return int(t.item())


def device_of(group: Group | None) -> torch.device:
    """Where the group's collectives run: CUDA for NCCL, else CPU."""
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_same(value: Any, what: str, group: Group | None) -> None:
    """Raise unless ``value`` (any picklable object) is equal on every rank.

    Compares a digest of the pickled value (one small all-reduce).

    Args:
        value: what must agree (names and shapes of parameters, settings).
        what: its description, for the error message.
        group: the group (``None``: nothing to check).

    Raises:
        RuntimeError: the ranks disagree (the message names ``what``).
    """
    if group is None:
        return
    digest = hashlib.sha256(pickle.dumps(value)).digest()[:6]
    code = float(int.from_bytes(digest, "little"))  # 48 bits: exact in float64
    t = torch.tensor([code, -code], dtype=torch.float64, device=device_of(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if t[0].item() != -t[1].item():
        raise RuntimeError(
            f"the ranks of the process group disagree on {what}; every rank must pass the "
            "same model, loss and settings (only the data differs: each rank's shard)"
        )


def check_same_tensor(tensor: Tensor, what: str, group: Group | None) -> None:
    """Raise unless ``tensor`` is equal on every rank (compares a few checksums by one
    all-reduce; catches vectors drawn from an unseeded global generator).

    Raises:
        RuntimeError: the ranks hold different tensors.
    """
    if group is None:
        return
    t = tensor.detach().to(torch.float64)
    ramp = torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64, device=t.device)
    sums = torch.stack([t.sum(), (t.reshape(-1) * ramp).sum(), t.abs().sum()])
    both = torch.cat([sums, -sums]).to(device_of(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not bool((both[:3] == -both[3:]).all()):
        raise RuntimeError(
            f"{what} differ between the ranks of the process group: an operator reduced over "
            "ranks needs the same vectors on every rank. Random probes or start vectors must "
            "come from a torch.Generator seeded alike on every rank (generator=...), not "
            "from torch's global generator"
        )


def broadcast_seed(seed: int, group: Group | None) -> int:
    """Rank 0's ``seed`` on every rank (``seed`` itself without a group)."""
    if group is None:
        return int(seed)
    t = torch.tensor([int(seed)], dtype=torch.int64, device=device_of(group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t.item())


def check_sampler(data: Any, group: Group | None, who: str) -> None:
    """Check a ``DataLoader``'s ``DistributedSampler`` against ``group``.

    Raises:
        ValueError: the sampler shards over another number of ranks or another rank, or it
            pads the shards with duplicated samples (``drop_last=False`` and a data set size
            that the number of ranks does not divide) -- the reduced result would count
            those samples twice.
    """
    sampler = getattr(data, "sampler", None)
    if not isinstance(sampler, torch.utils.data.DistributedSampler):
        return
    if group is None:
        if sampler.num_replicas > 1:
            raise ValueError(
                f"{who}: the data is a DistributedSampler shard ({sampler.num_replicas} "
                "ranks), but no process group reduces the result over the ranks; pass "
                "process_group=... (or leave it None under an initialized torch.distributed)"
            )
        return
    if sampler.num_replicas != world_size(group) or sampler.rank != rank(group):
        raise ValueError(
            f"{who}: the DistributedSampler shards for rank {sampler.rank} of "
            f"{sampler.num_replicas}, the process group is rank {rank(group)} of "
            f"{world_size(group)}"
        )
    size = len(sampler.dataset)  # type: ignore[arg-type]
    if not sampler.drop_last and size % sampler.num_replicas:
        raise ValueError(
            f"{who}: DistributedSampler(drop_last=False) pads the shards with "
            f"{sampler.num_replicas - size % sampler.num_replicas} duplicated samples "
            f"({size} samples over {sampler.num_replicas} ranks), which would be counted "
            "twice. Shard the data yourself (uneven shards are fine: counts are summed over "
            "the ranks), or use drop_last=True (the curvature of the truncated data set)"
        )


@contextmanager
def rank_local() -> Iterator[None]:
    """Inside this context, the parts of the library that cannot reduce over a process group
    (they refuse under an initialized ``torch.distributed`` with several ranks, see
    :func:`refuse_rank_local`) compute on this rank's data alone: an explicit, rank-local
    answer (e.g. every rank holds the whole data set, or one rank monitors its own batches).

    Yields:
        Nothing; the flag is reset on exit (also on an error).

    Example::

        with bg.distributed.rank_local():
            result = bg.pruning.obd(model, loss_fn, data, 0.5)  # this rank's data only
    """
    token = _RANK_LOCAL.set(True)
    try:
        yield
    finally:
        _RANK_LOCAL.reset(token)


def refuse_rank_local(who: str) -> None:
    """Raise where ``who`` would silently compute a rank-local answer: under an initialized
    ``torch.distributed`` with several ranks, outside :func:`rank_local`.

    For the library's data-set loops that do not reduce over the ranks (pruning, merging
    curvatures, the Cockpit, the PINN optimizers): each rank would see only its shard.

    Args:
        who: the caller, for the message.

    Raises:
        NotImplementedError: names ``who``, what reduces instead and the way out.
    """
    if _RANK_LOCAL.get() or resolve_group(None) is None:
        return
    raise NotImplementedError(
        f"{who} does not reduce over the ranks of torch.distributed (initialized, "
        f"{dist.get_world_size()} ranks): on a sharded data set its result would be this "
        "rank's alone. Build it from the reduced operators (bg.linops with process_group, "
        "bg.distributed.all_reduce_result), or, if each rank's data is meant to be used "
        "alone (e.g. every rank holds the whole data set), call it inside "
        "`with bg.distributed.rank_local():`"
    )


def all_reduce_tensors_(tensors: Iterable[Tensor], group: Group | None) -> None:
    """Sum every tensor over the ranks in place (one collective per tensor)."""
    if group is None:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


__all__ = [
    "LOCAL",
    "all_reduce_sum_",
    "all_reduce_tensors_",
    "broadcast_seed",
    "check_same",
    "check_same_tensor",
    "check_sampler",
    "rank",
    "rank_local",
    "refuse_rank_local",
    "resolve_group",
    "sum_count",
    "world_size",
]
