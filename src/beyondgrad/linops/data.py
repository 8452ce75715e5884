"""One data-set plumbing for the operators: iterate the batches, count the samples, weight
the batches by the loss reduction.

The curvature of the data-set loss ``L = R_D sum_n l_n`` (``R_D = 1 / num_data`` for
``reduction="mean"``, 1 for ``"sum"``) is the sum over batches of the batch curvature times
``N_b / num_data`` (mean) or 1 (sum), where ``N_b`` is the batch's number of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, IterableDataset

from ..distributed import group as dist_group


def batch_size(X: Any) -> int:
    """The number of samples of a batch input: the leading length of its first tensor leaf
    (``X`` a tensor, tuple or dict as in :func:`beyondgrad.compute`)."""
    leaves = [t for t in tree_flatten(X)[0] if isinstance(t, Tensor) and t.ndim > 0]
    if not leaves:
        raise ValueError("a batch has no tensor with a leading sample axis")
    return leaves[0].shape[0]


def _sized(data: Any) -> bool:
    try:
        len(data)
    except TypeError:
        return False
    return True


def is_one_shot(data: Any) -> bool:
    """Whether ``data`` is an iterator (a generator, ``itertools.cycle``, ``iter(loader)``):
    it can be iterated once only, and may never end."""
    return isinstance(data, Iterator)


def require_reiterable(data: Any, who: str) -> None:
    """Raise unless ``data`` can be iterated again and again (a list, a ``DataLoader``)."""
    if is_one_shot(data):
        raise TypeError(
            f"{who} passes over the data once per product, but got a one-shot iterator "
            f"({type(data).__name__}: a generator, itertools.cycle or iter(loader)); pass a "
            "finite re-iterable collection (a list of batches, a DataLoader)"
        )


class DataSet:
    """Batches of ``(X, y)`` with their number of samples and reduction weights.

    Args:
        data: an iterable of ``(X, y)`` batches (a list, a ``DataLoader``; for one-pass
            consumers also a one-shot iterator, with ``num_data``).
        loss_fn: the loss module; its ``reduction`` gives the batch weights.
        num_data: the number of samples of the data set. ``None``: counted in the first
            complete pass (or a counting pass when it is needed earlier). Needed for a
            one-shot iterator (read until ``num_data`` samples) and for a ``DataLoader`` over
            an ``IterableDataset`` (which may never end: a pass that yields more samples
            raises instead of running forever).
        batch_size_fn: ``X -> N_b``; default: the leading length of the first tensor leaf.
        passes: ``"many"`` (the consumer iterates the data once per product: a one-shot
            iterator raises) or ``"one"`` (one streaming pass).
        who: the consumer's name, used in error messages.
        process_group: ``None`` (default: the default group when ``torch.distributed`` is
            initialized with several ranks), a ``ProcessGroup``, or ``"local"``. With a group,
            ``data`` is this rank's shard: ``num_data`` (given or counted) is the number of
            samples of *all* shards (local counts are summed over the ranks), and the
            consumers sum their per-rank results over :attr:`group` (see
            :mod:`beyondgrad.distributed`).

    Attributes:
        group: the process group to reduce over, or ``None`` (one process).

    Raises:
        TypeError: a one-shot iterator for ``passes="many"``.
        ValueError: ``num_data`` missing where it cannot be counted safely, an empty
            data set, or a ``DistributedSampler`` that does not match the group or pads its
            shards with duplicates.
        NotImplementedError: a one-shot iterator under a process group.
    """

    def __init__(
        self,
        data: Iterable[tuple[Any, Tensor]],
        loss_fn: Any,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        passes: str = "many",
        who: str = "the operator",
        process_group: Any = None,
    ):
        self.group = dist_group.resolve_group(process_group)
        dist_group.check_sampler(data, self.group, who)
        if self.group is not None and is_one_shot(data):
            raise NotImplementedError(
                f"{who}: a one-shot iterator cannot be sharded over a process group (its "
                "per-rank length is unknown); pass each rank's shard as a list or DataLoader"
            )
        if passes == "many":
            require_reiterable(data, who)
        self.data, self.who = data, who
        self.mean = getattr(loss_fn, "reduction", "mean") == "mean"
        self.batch_size_fn = batch_size_fn or batch_size
        self.one_shot, self.sized = is_one_shot(data), _sized(data)
        unbounded = isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset)
        if num_data is None and (self.one_shot or (unbounded and not self.sized)):
            raise ValueError(
                f"{who}: cannot count the samples of {type(data).__name__} (it may never "
                "end): pass num_data=... (a stream is read until num_data samples)"
            )
        if num_data is not None and num_data < 1:
            raise ValueError(f"{who}: the data set is empty")
        self.num_data = None if num_data is None else int(num_data)

    def batches(self) -> Iterator[tuple[Any, Tensor, int]]:
        """``(X, y, N_b)`` for each batch of one pass. A one-shot stream ends after
        ``num_data`` samples; an unsized collection that yields more than ``num_data`` samples
        in one pass raises (an endless loader). Without ``num_data``, a complete pass sets it."""
        seen = 0
        for X, y in self.data:
            N = self.batch_size_fn(X)
            seen += N
            if self.num_data is not None and seen > self.num_data and not self.sized:
                raise RuntimeError(
                    f"{self.who}: the data yielded more than num_data={self.num_data} samples "
                    "in one pass (an endless loader?); pass a finite collection or the right "
                    "num_data"
                )
            yield X, y, N
            if self.one_shot and seen == self.num_data:
                return
        if self.group is not None:  # every rank ends its pass here, whatever its shard
            self._set_total(dist_group.sum_count(seen, self.group))
        elif self.num_data is None:
            self.num_data = seen

    def _set_total(self, total: int) -> None:
        """Set ``num_data`` from a complete pass over all shards; a given one must agree."""
        if self.num_data is not None and self.num_data != total:
            raise ValueError(
                f"{self.who}: num_data={self.num_data}, but the shards of the {self.world} "
                f"ranks hold {total} samples in all"
            )
        self.num_data = total

    @property
    def world(self) -> int:
        """The number of ranks the data is sharded over (1: one process)."""
        return dist_group.world_size(self.group)

    def total(self) -> int:
        """``num_data``: given, set by a complete pass, or counted now (one pass reading only
        the batch sizes; under a process group the counts of all shards are summed)."""
        if self.num_data is None:
            local = sum(self.batch_size_fn(X) for X, _ in self.data)
            self.num_data = dist_group.sum_count(local, self.group)
        if self.num_data < 1:
            raise ValueError(f"{self.who}: the data set is empty")
        return self.num_data

    def weight(self, N: int) -> float:
        """A batch of ``N`` samples enters the data-set curvature with this factor
        (``N / num_data`` for mean losses, 1 for sum)."""
        return N / self.total() if self.mean else 1.0

    def normalizer(self) -> float:
        """The factor turning per-batch *sums* (batch curvature times ``N_b`` for mean
        losses) into the data-set curvature: ``1 / num_data`` (mean) or 1 (sum)."""
        return 1.0 / self.total() if self.mean else 1.0


__all__ = ["DataSet", "batch_size", "is_one_shot", "require_reiterable"]
