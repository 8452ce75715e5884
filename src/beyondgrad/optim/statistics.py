"""Statistics an optimizer collects between two steps, and their reduction over ranks.

- :class:`KroneckerAccumulator` sums the Kronecker statistics of every ``capture`` block since
  the last step (gradient accumulation) and turns them, at the step, into per-sample averages
  ``A = sum A_n / N``, ``B = sum B_n / N`` over all blocks and all ranks (a sample-weighted
  average: each rank's sums and counts are all-reduced), checked to be finite
  (:func:`finite_flags`: one pass per factor, one host synchronization for all layers).
- :class:`BatchCounter` counts the samples of the forward passes recorded inside a block
  (SIRFShampoo's per-sample scale); the count is summed over ranks.
- :func:`distributed_world` and :func:`average_gradients_over_ranks` are the data-parallel
  plumbing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._engine import KroneckerSums


def distributed_world() -> int:
    """Number of ranks when ``torch.distributed`` is initialized, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients_over_ranks(params: Iterable[Tensor]) -> None:
    """Replace every ``.grad`` by its mean over ranks (no-op with one rank).

    Args:
        params: the parameters; those without a gradient are skipped (on every rank alike).
    """
    world = distributed_world()
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def sum_over_ranks(count: int) -> int:
    """``count`` summed over ranks (exact for counts below 2**53)."""
    if distributed_world() == 1:
        return count
    total = torch.tensor(float(count), dtype=torch.float64)
    dist.all_reduce(total)
    return int(total.item())


class KroneckerAccumulator:
    """Raw Kronecker sums per layer since the last step.

    Attributes:
        calls: the number of ``capture`` blocks recorded since the last step.
    """

    def __init__(self) -> None:
        self._sums: dict[str, KroneckerSums] = {}
        self.calls = 0

    def add(self, sums: dict[str, KroneckerSums]) -> None:
        """Add the sums of one ``capture`` block (layer name -> sums)."""
        self.calls += 1
        for name, part in sums.items():
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = KroneckerSums(
                    part.A, part.B, part.count, part.order, part.weight_perm
                )
            else:
                acc.add(part)

    def consume(self, layers: Iterable[str], owner: str) -> dict[str, tuple[Tensor, Tensor]]:
        """The averages ``(A, B)`` per layer over every sample of every block and rank; resets.

        Args:
            layers: the layers to reduce (others are dropped). With several ranks, a layer is
                kept only when every rank has statistics for it.
            owner: the optimizer's class name, for error messages.

        Returns:
            Layer name -> ``(A, B)``, each ``sum / count`` in the dtype of the sums.

        Raises:
            FloatingPointError: a non-finite average (nothing else was changed).
        """
        pending, self._sums, self.calls = self._sums, {}, 0
        names = sorted(layers)
        have = [n for n in names if n in pending]
        if distributed_world() > 1:  # every rank must reduce the same tensors
            flags = torch.tensor([n in pending for n in names], dtype=torch.float64)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            have = [n for n, f in zip(names, flags.tolist()) if f > 0]
        out = {name: _average(pending[name]) for name in have}
        factors = [t for pair in out.values() for t in pair]
        if factors and not bool(finite_flags(factors).all()):  # one host sync for all layers
            bad = next(n for n, pair in out.items() if not bool(finite_flags(pair).all()))
            raise FloatingPointError(
                f"{owner}: non-finite curvature statistics in layer '{bad}'; "
                "the optimizer state was left unchanged (lower the learning rate, clip "
                "gradients or check the data)"
            )
        return out


def _average(sums: KroneckerSums) -> tuple[Tensor, Tensor]:
    A_sum, B_sum = sums.A, sums.B
    count = torch.tensor(float(sums.count), dtype=A_sum.dtype, device=A_sum.device)
    if distributed_world() > 1:
        for t in (A_sum, B_sum, count):
            dist.all_reduce(t)
    return A_sum / count, B_sum / count


def finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """Whether each tensor's entries are all finite, as a bool tensor ``[len(tensors)]`` on
    the first tensor's device, without a host synchronization.

    One pass per tensor and no temporary of its size: the minimum and maximum (``aminmax``)
    are finite exactly when every entry is (a NaN propagates into both, an infinity shows in
    one). Empty tensors count as finite.

    Args:
        tensors: any shapes and floating dtypes (at least one tensor).
    """
    device = tensors[0].device
    work = torch.float32  # every minimum and maximum in one dtype: one isfinite for all
    for t in tensors:
        work = torch.promote_types(work, t.dtype)
    ends: list[Tensor] = []
    for t in tensors:
        if t.numel() == 0:
            ends += [torch.zeros((), dtype=work, device=device)] * 2
        else:
            ends += [e.to(device=device, dtype=work) for e in torch.aminmax(t)]
    return torch.isfinite(torch.stack(ends)).view(-1, 2).all(1)


class BatchCounter:
    """Counts samples: the leading axis of the first tensor argument of each forward call of a
    module made with gradients enabled, while :meth:`counting` is active.

    Attributes:
        count: samples counted since the last :meth:`take`.
    """

    def __init__(self) -> None:
        self.count = 0

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return
        for value in (*args, *kwargs.values()):
            if isinstance(value, Tensor) and value.ndim > 0:
                self.count += value.shape[0]
                return

    @contextmanager
    def counting(self, model: nn.Module) -> Iterator[None]:
        """A forward pre-hook on ``model`` for the duration of the block (removed on exit, also
        on errors): nothing is left on the model."""
        handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def take(self) -> int:
        """The count summed over ranks; resets it."""
        count, self.count = self.count, 0
        return sum_over_ranks(count)


__all__ = [
    "BatchCounter",
    "KroneckerAccumulator",
    "average_gradients_over_ranks",
    "distributed_world",
    "finite_flags",
    "sum_over_ranks",
]
