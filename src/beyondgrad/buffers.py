"""Scratch buffers reused from one round of work to the next.

A monitor that recomputes the same large intermediates at every tracked step (the unfolded
inputs of convolutions, ``[N, S, C K]`` each) pays for a fresh allocation of that size every
time: page faults on first touch, and an unmapping when it is freed. Inside
``with pooled(pool):``, :func:`contiguous` copies into ``pool``'s tensors instead; a
:class:`BufferPool` gives the same tensors again, request by request, after
:meth:`BufferPool.new_round`. Outside such a block it is ``Tensor.contiguous``.

Only code that owns the pool's rounds may enter it: a tensor handed out in one round is
overwritten in the next, so nothing that outlives the round may alias it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_Key = tuple[tuple[int, ...], torch.dtype, torch.device]


class BufferPool:
    """Tensors reused across rounds, by shape, dtype and device.

    Memory is bounded by one round's requests: :meth:`new_round` keeps exactly the tensors
    handed out in the round it closes (those of earlier rounds that went unrequested are
    dropped).
    """

    def __init__(self) -> None:
        self._free: dict[_Key, list[Tensor]] = {}
        self._taken: list[tuple[_Key, Tensor]] = []

    def empty(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialized tensor of ``shape``, valid until the next :meth:`new_round`."""
        key = (tuple(int(s) for s in shape), dtype, torch.device(device))
        free = self._free.get(key)
        out = free.pop() if free else torch.empty(key[0], dtype=dtype, device=device)
        self._taken.append((key, out))
        return out

    def new_round(self) -> None:
        """Every tensor handed out so far may be handed out again."""
        free: dict[_Key, list[Tensor]] = {}
        for key, tensor in self._taken:
            free.setdefault(key, []).append(tensor)
        self._free, self._taken = free, []

    @property
    def nbytes(self) -> int:
        """Bytes held (handed out or free)."""
        held = [t for ts in self._free.values() for t in ts] + [t for _, t in self._taken]
        return sum(t.numel() * t.element_size() for t in held)


_POOL: ContextVar[BufferPool | None] = ContextVar("beyondgrad_buffer_pool", default=None)


@contextmanager
def pooled(pool: BufferPool) -> Iterator[BufferPool]:
    """Route :func:`contiguous` to ``pool`` inside the block (this thread/context only)."""
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)


def active_pool() -> BufferPool | None:
    """The pool :func:`contiguous` writes into here, if any (to run later work in it:
    ``with pooled(pool):``, within the same round)."""
    return _POOL.get()


def private_copy(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` that nothing else aliases: into a buffer of the active pool
    under the conditions of :func:`contiguous`, else ``t.clone()``."""
    pool = _POOL.get()
    usable = pool is not None and t.device.type == "cpu"
    if not usable or (torch.is_grad_enabled() and t.requires_grad):
        return t.clone(memory_format=torch.contiguous_format)
    return pool.empty(t.shape, t.dtype, t.device).copy_(t)  # type: ignore[union-attr]


def contiguous(t: Tensor) -> Tensor:
    """``t.contiguous()``, written into a buffer of the active :class:`BufferPool` when there is
    one, ``t`` is a CPU tensor that is not contiguous, and the copy will not be part of an
    autograd graph (a pooled tensor written in place in a later round would invalidate a graph
    that saved it). On accelerators the caching allocator already reuses memory: no pool."""
    pool = _POOL.get()
    if pool is None or t.is_contiguous() or (torch.is_grad_enabled() and t.requires_grad):
        return t.contiguous()
    if t.device.type != "cpu":  # accelerators' caching allocators already reuse memory
        return t.contiguous()
    return pool.empty(t.shape, t.dtype, t.device).copy_(t)


__all__ = ["BufferPool", "active_pool", "contiguous", "pooled", "private_copy"]
