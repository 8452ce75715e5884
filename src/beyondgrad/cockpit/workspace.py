"""Buffers the Cockpit reuses from one tracked step to the next."""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """Tensors reused from one tracked step to the next: a fresh allocation of the model's
    size costs page faults on every step (several times the arithmetic of one pass over it).
    Only the Cockpit's own intermediates live here; nothing logged aliases them."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A 1-d tensor of ``numel`` entries (uninitialized), the same one as last time when
        the size, dtype and device agree."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def flat(self, key: str, parts: list[Tensor]) -> Tensor:
        """``torch.cat([p.reshape(-1) for p in parts])`` in their promoted dtype, at least
        float32 (half-precision squares and sums lose too much), written into a reused buffer:
        one pass, no intermediate copies. Valid until the next call with ``key``."""
        numel = sum(p.numel() for p in parts)
        device = parts[0].device if parts else torch.device("cpu")
        dtype = torch.float32
        for p in parts:
            dtype = torch.promote_types(dtype, p.dtype)
        out = self.get(key, numel, dtype, device)
        start = 0
        for p in parts:
            out[start : start + p.numel()].copy_(p.reshape(-1))
            start += p.numel()
        return out


__all__ = ["Workspace"]
