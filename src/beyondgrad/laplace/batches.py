"""The batches of a data set, read once: a plain ``DataLoader`` over tensors by slicing.

A ``DataLoader`` hands out each batch by indexing its dataset sample by sample and stacking the
samples again (``default_collate``): on small models that costs as much as the curvature itself.
For the loader a fit typically receives (a :class:`~torch.utils.data.TensorDataset`, sequential
order, the default collation, no workers, no pinned memory) the same batches are slices of the
dataset's tensors; every other iterable is read as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset
from torch.utils.data._utils.collate import default_collate


def read_batches(data: Iterable[Any]) -> list[Any]:
    """``list(data)``, with the same batches sliced from the tensors when ``data`` is a plain
    sequential ``DataLoader`` over a ``TensorDataset`` (:func:`sliceable`).

    Args:
        data: an iterable of batches (e.g. ``(X, y)`` pairs), read once.

    Returns:
        The batches; for a sliceable loader ``[t[a:b] for t in dataset.tensors]`` per batch
        (views of the dataset's tensors with the values and dtypes ``default_collate`` stacks).
    """
    if not sliceable(data):
        return list(data)
    tensors = data.dataset.tensors  # type: ignore[attr-defined]
    n, size = len(tensors[0]), data.batch_size
    assert size is not None
    stop = n - n % size if data.drop_last else n
    return [[t[a : min(a + size, n)] for t in tensors] for a in range(0, stop, size)]


def sliceable(data: Any) -> bool:
    """Whether ``data`` is a ``DataLoader`` whose batches are contiguous slices of a
    ``TensorDataset``'s tensors, in order: sequential sampler, automatic batching, the default
    collation, no workers, no memory pinning, no per-worker hooks."""
    if type(data) is not DataLoader or type(data.dataset) is not TensorDataset:
        return False
    return (
        data.batch_size is not None
        and type(data.sampler) is SequentialSampler
        and type(data.batch_sampler) is BatchSampler
        and data.collate_fn is default_collate
        and data.num_workers == 0
        and not data.pin_memory
        and len(data.dataset.tensors) > 0
    )


__all__ = ["read_batches", "sliceable"]
