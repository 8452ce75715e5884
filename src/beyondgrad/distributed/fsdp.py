"""DTensor helpers for ``torch.distributed.fsdp.fully_shard`` (FSDP2) models.

FSDP2 turns every parameter of a ``fully_shard``-ed module into a ``DTensor`` whose local
tensor is this rank's shard (dim 0 by default); gradients are ``DTensor`` shards too, already
averaged over the ranks by FSDP's reduce-scatter. The optimizers (:mod:`beyondgrad.optim`)
gather the full gradient of each parameter for a step and write back the local shard
(:func:`full_tensor`, :func:`local_shard`); their per-element state (momenta, the AdamW
fallback's moments) stays sharded (:func:`shard_like`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter, gradient or state shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` on every rank (collective: an all-gather), or ``t``
    itself for a plain tensor."""
    return t.full_tensor() if is_sharded(t) else t


def local_shard(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``full`` (a plain tensor of ``like``'s global shape) under
    ``like``'s mesh and placements (a view or copy, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    dt = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # type: ignore[attr-defined]
    return dt.to_local()


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` as a ``DTensor`` sharded like ``like`` (this rank keeps only its part)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_shard(full, like).clone(),
        like.device_mesh,  # type: ignore[attr-defined]
        like.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def local_nbytes(t: Tensor) -> int:
    """Bytes this rank holds for ``t``: its local shard for a ``DTensor`` (FSDP2 state),
    the whole tensor otherwise."""
    local = t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]
    return local.numel() * local.element_size()


def refuse_sharded(params: Iterable[Tensor], who: str) -> None:
    """Raise when a parameter is a ``DTensor`` (a ``fully_shard``-ed model) where ``who``
    needs whole parameters.

    Args:
        params: the parameters ``who`` would use.
        who: the caller, for the message.

    Raises:
        NotImplementedError: names ``who`` and the way out.
    """
    if any(is_sharded(p) for p in params):
        raise NotImplementedError(
            f"{who}: the model's parameters are DTensors (torch.distributed.fsdp.fully_shard); "
            f"{who} needs whole parameters. Build it on an unsharded copy of the model "
            "(e.g. loaded from a checkpoint with bg.distributed.checkpoint.load), or use "
            "bg.compute + bg.distributed.all_reduce_result, which work on FSDP2 models"
        )


__all__ = [
    "full_tensor",
    "is_sharded",
    "local_nbytes",
    "local_shard",
    "refuse_sharded",
    "shard_like",
]
