"""Leave the model as it was: the buffers a forward pass may update (BatchNorm running
statistics and batch counters, any module's running averages) are restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` on exit (also on errors): a buffer updated in place is
    copied back, a buffer replaced by another tensor is put back. Costs one copy of the
    buffers (BatchNorm statistics are tiny next to the activations of one batch)."""
    saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                saved.append((module, name, buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, copy in saved:
                if getattr(module, name, None) is not buf:
                    setattr(module, name, buf)
                # kernels update running statistics without bumping the version counter:
                # compare the values
                if not torch.equal(buf, copy):
                    buf.copy_(copy)
