"""A memory guard for backpropagating many vectors at once.

Every backpropagated vector leaves one gradient at every recorded layer output, all held until
the rules have read them, so ``K`` vectors cost about ``K`` times the layer outputs' size (plus
the vectorized backward pass's own buffers, about as much again). Monte-Carlo curvature with
many samples (``mc_samples=2000`` on a ResNet-18) can exceed the machine's memory; the guard
refuses before the backward pass instead of letting the process be killed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import result_pool


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CUDA: the allocator's free memory; CPU: the memory
    available without swapping, page cache the kernel can drop included), or ``None`` where
    unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        return result_pool.available_bytes()
    return None


def check_vector_memory(
    vectors: int, calls: Sequence[tuple[Any, Any]], output: Any, what: str
) -> None:
    """Raise ``MemoryError`` when ``vectors`` vectors per sample would not fit.

    Args:
        vectors: the number of vectors backpropagated at once (per sample).
        calls: the recorded ``(layer, call)`` pairs receiving gradients.
        output: the model output (its device, dtype and size count too).
        what: how to name the request in the message (e.g. ``"mc_samples=2000"``).
    """
    free = available_memory(output.device)
    if free is None:
        return
    per_vector = output.numel()
    for _, call in calls:
        for out, edge in zip(call.outputs, call.edges):
            if edge is not None and isinstance(out, torch.Tensor):
                per_vector += out.numel()
    need = 2 * vectors * per_vector * output.element_size()
    if need > free and output.device.type == "cpu":  # the result pool's kept mappings
        free += result_pool.release()
    if need > free:
        raise MemoryError(
            f"{what}: backpropagating {vectors} vectors per sample at once holds about "
            f"{need / 2**30:.1f} GiB of layer-output gradients, more than the "
            f"{free / 2**30:.1f} GiB available. Use fewer Monte-Carlo samples and average "
            "several computations (different generators), or a smaller batch."
        )
